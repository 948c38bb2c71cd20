"""Where checkpoints live: the directory of each task instance, and how to reach it.

The layout is ``<base>/<dag_id>/<run_id>/<task_id>/<map_index>/``, with every id spelled by
:func:`path_component` so that it is a safe, portable directory name on every store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_.\-]+")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    """Where one task instance's checkpoint lives, and how to reach it.

    Built on the Airflow side by :func:`airflow_ray.checkpoint.resolve_checkpoint_location` and
    pickled to the Ray worker that writes or reads the data. ``storage_options`` are fsspec
    keyword arguments and may hold credentials: they are kept out of ``repr``/``str`` (so out of
    logs), out of equality and hashing; store only ``uri`` in XCom or the metadata DB, never the
    whole object. ``producer`` names the code that writes the checkpoint (``{"airflow_ray":
    "0.1.0"}``) for its manifest: the worker runs airflow-ray's code shipped by value, so only the
    Airflow side knows that version. ``base`` is the base URI the checkpoint lives under, when
    known: a write that claims the base for its deployment (:mod:`.marker`) needs it.

    >>> loc = CheckpointLocation("s3://bucket/ckpt/d/r/t/-1/", {"secret": "hunter2"})
    >>> loc
    CheckpointLocation(uri='s3://bucket/ckpt/d/r/t/-1/')
    """

    uri: str
    storage_options: dict[str, Any] = dataclasses.field(
        default_factory=dict, repr=False, compare=False, hash=False
    )
    producer: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False, hash=False)
    base: str | None = dataclasses.field(default=None, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.uri.endswith("/"):
            object.__setattr__(self, "uri", self.uri + "/")


def checkpoint_uri(
    base_uri: str, *, dag_id: str, run_id: str, task_id: str, map_index: int | None = -1
) -> str:
    """Return the checkpoint directory URI of one task instance under ``base_uri``.

    Each id is kept as is when it only has ``[A-Za-z0-9_.-]`` (Airflow dag and task ids do);
    anything else (``:`` and ``+`` in run ids) becomes ``_`` plus a short hash of the original, so
    the path stays readable, portable to every store, and distinct ids never share a directory.

    >>> checkpoint_uri("s3://b/ckpt", dag_id="etl", run_id="manual__2024-01-01T00:00:00+00:00",
    ...                task_id="extract", map_index=-1)
    's3://b/ckpt/etl/manual__2024-01-01T00_00_00_00_00-c87eaaa6/extract/-1/'
    """
    index = -1 if map_index is None else int(map_index)
    return f"{run_uri(base_uri, dag_id, run_id)}{path_component(task_id)}/{path_component(str(index))}/"


def run_uri(base_uri: str, dag_id: str, run_id: str) -> str:
    """The directory of one DAG run's checkpoints, ``<base>/<dag_id>/<run_id>/``."""
    return f"{normalize_base(base_uri)}/{path_component(dag_id)}/{path_component(run_id)}/"


def path_component(value: str) -> str:
    """How an id is spelled as a directory name in checkpoint paths (see :func:`checkpoint_uri`).

    The one sanitiser of every component below a base: dag, run and task ids, the map index and
    the keys of ``multiple_outputs``. Its result never holds a ``/`` nor starts with ``.``, so no
    id (``../../x`` included) reaches outside its parent directory.

    >>> path_component("../../x")
    '_.._x-9cdf6a50'
    """
    value = str(value)
    if _SAFE_COMPONENT.fullmatch(value) and not value.startswith("."):
        return value
    cleaned = _UNSAFE_CHARS.sub("_", value).lstrip(".") or "_"
    return f"{cleaned}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def normalize_base(base: str) -> str:
    """A base URI without trailing slash; plain local paths become absolute ``file://`` URIs."""
    base = base.strip()
    if "://" not in base:
        base = "file://" + os.path.abspath(os.path.expanduser(base))
    return base.rstrip("/")
