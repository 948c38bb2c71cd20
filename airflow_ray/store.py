"""Ray's object store as Airflow sees it: references, handles, and the owners that hold them.

Three small types cross the Airflow/Ray boundary:

* :class:`ObjectReference`: the JSON document stored in the XCom table instead of the data. It
  is readable in the UI (type, shape, rows, bytes) and never contains pickled bytes.
* :class:`ObjectHandle`: what a ``@ray_task`` consumer receives for an upstream output while
  Airflow renders its arguments. The handle, not the data, is sent to the Ray worker, where
  Ray resolves it zero-copy; the Airflow process never loads the data.
* :class:`RayResult`: what a ``@ray_task`` returns to Airflow when the Ray XCom backend is on:
  a description of objects already owned by the owner actor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

MARKER = "__airflow_ray__"
FORMAT_VERSION = 1

OWNER_PREFIX = "airflow_ray_owner-v"

_owner_cache: dict[str, Any] = {}


@dataclass(frozen=True)
class ObjectReference:
    """Where an XCom value lives in Ray. Serialised as a small JSON dict (well under 1 KB)."""

    owner: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key: str
    object_id: str
    summary: dict[str, Any] = field(default_factory=dict)
    ray_conn_id: str = "ray_default"
    checkpoint_uri: str | None = None
    checkpoint_source: str | None = None

    @property
    def entry_key(self) -> tuple[str, str, str, int, str]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index, self.key)

    def describe(self) -> str:
        index = "" if self.map_index < 0 else f"[{self.map_index}]"
        return f"task '{self.task_id}'{index} of DAG '{self.dag_id}', run '{self.run_id}', key '{self.key}'"

    def to_json(self) -> dict[str, Any]:
        return {MARKER: FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectReference:
        fields = {k: v for k, v in data.items() if k != MARKER}
        return cls(**fields)

    @staticmethod
    def is_reference(data: Any) -> bool:
        return isinstance(data, dict) and data.get(MARKER) == FORMAT_VERSION and "object_id" in data


class ObjectHandle:
    """An upstream output handed to a Ray consumer unresolved, optionally indexed.

    Indexing (``handle[3]``, ``handle["train"]``) records a path that the Ray worker applies
    after resolving the object; that is how ``.expand()`` over a list stored in Ray gives each
    mapped task its element without loading the list in Airflow.
    """

    def __init__(self, reference: ObjectReference, path: tuple[Any, ...] = ()) -> None:
        self.reference = reference
        self.path = path

    def __getitem__(self, item: Any) -> ObjectHandle:
        return ObjectHandle(self.reference, (*self.path, item))

    def __repr__(self) -> str:
        path = "".join(f"[{p!r}]" for p in self.path)
        return f"<Ray object {self.reference.object_id[:12]}… {_short(self.reference.summary)}>{path}"


class SequenceHandle(ObjectHandle, Sequence):
    """An :class:`ObjectHandle` to a list/tuple: Airflow's mapping code checks ``Sequence``."""

    def __len__(self) -> int:
        return int(self.reference.summary.get("length", 0))

    def __iter__(self) -> Iterator[ObjectHandle]:
        return (self[i] for i in range(len(self)))


def handle_for(reference: ObjectReference) -> ObjectHandle:
    if reference.summary.get("type") in ("list", "tuple"):
        return SequenceHandle(reference)
    return ObjectHandle(reference)


@dataclass(frozen=True)
class RayResult:
    """A ``@ray_task`` output already in the object store, on its way to the XCom backend."""

    reference: ObjectReference

    def __repr__(self) -> str:
        return f"RayResult({_short(self.reference.summary)}, object {self.reference.object_id[:12]}…)"


class RaySequenceResult(RayResult, Sequence):
    """A list output: Airflow calls ``len()`` on it when mapped tasks depend on it."""

    def __len__(self) -> int:
        return int(self.reference.summary.get("length", 0))

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("A Ray task's list output is resolved by its consumers, not in Airflow")


def result_for(reference: ObjectReference) -> RayResult:
    if reference.summary.get("type") in ("list", "tuple"):
        return RaySequenceResult(reference)
    return RayResult(reference)


def owner_name(dag_id: str, run_id: str) -> str:
    """The versioned name of the owner actor that holds a DAG run's objects.

    The name carries the package version and a hash of the Ray-side code, so any change to
    that code (an upgrade, a patch) gets a fresh actor instead of an old one by name.
    """
    from airflow_ray import config
    from airflow_ray._worker.owner import shard_for

    return owner_names()[shard_for(dag_id, run_id, config.owner_shards())]


def owner_names() -> list[str]:
    """The names of all owner shards of this version of the code, shard 0 first."""
    from airflow_ray import config
    from airflow_ray.version import __version__

    prefix = f"{OWNER_PREFIX}{__version__}-{_ray_side_code_hash()}"
    return [f"{prefix}-{shard}" for shard in range(config.owner_shards())]


def get_owner(name: str, *, create: bool = False) -> Any:
    """Handle of a named owner actor; with ``create`` start it (detached, on the head node)."""
    import ray

    from airflow_ray import config

    if (cached := _owner_cache.get(name)) is not None:
        return cached
    ship_ray_side_code()
    if create:
        from airflow_ray._worker.owner import Owner

        handle = (
            ray.remote(Owner)
            .options(
                name=name,
                namespace=config.namespace(),
                lifetime="detached",
                get_if_exists=True,
                max_concurrency=1000,
                num_cpus=0,
                resources={"node:__internal_head__": 0.001},
            )
            .remote(config.object_ttl_seconds(), config.max_objects())
        )
    else:
        handle = ray.get_actor(name, namespace=config.namespace())
    _owner_cache[name] = handle
    return handle


def forget_owners() -> None:
    """Drop cached actor handles (after reconnecting to another cluster)."""
    _owner_cache.clear()


def ship_ray_side_code() -> None:
    """Send the Ray-side package by value, so clusters need only Ray, not airflow-ray."""
    import ray.cloudpickle as cloudpickle

    from airflow_ray import _worker, checkpoint

    for module in (_worker, checkpoint):
        cloudpickle.register_pickle_by_value(module)


@cache
def _ray_side_code_hash() -> str:
    """A hash of every source file of :mod:`airflow_ray._worker` (names and contents)."""
    from airflow_ray import _worker

    root = Path(_worker.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]


def _short(summary: dict[str, Any]) -> str:
    parts = [summary.get("type", "?")]
    if "shape" in summary:
        parts.append("x".join(map(str, summary["shape"])))
    if "rows" in summary:
        parts.append(f"{summary['rows']} rows")
    if "length" in summary:
        parts.append(f"len {summary['length']}")
    if "bytes" in summary:
        parts.append(_human_bytes(summary["bytes"]))
    return " ".join(parts)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
