"""The base marker: which Airflow deployment owns a checkpoint base.

``airflow-ray gc`` deletes whole run directories, ``<base>/<dag>/<run>/``. Without a mark of
ownership it would do so under any base it is given: a mistyped base (``s3://bucket`` for
``s3://bucket/ckpt``) or another deployment's base would lose data that is not its to judge. So
the first checkpoint a deployment writes under a base leaves ``<base>/.airflow-ray-base.json``
naming it, and gc deletes only under bases whose marker names its own deployment.

The same marker keeps two deployments off one base: their dag and run ids collide (both have
``etl``/``scheduled__2026-01-01…``), so their checkpoints would overwrite each other. A write under
a base that another deployment has claimed is refused.

>>> import tempfile
>>> base = "file://" + tempfile.mkdtemp()
>>> claim_base(base, {}, "prod")
>>> check_base(base, {}, "prod")
True
>>> try:
...     claim_base(base, {}, "staging")
... except CheckpointBaseError as exc:
...     print("refused:", "belongs to the Airflow deployment 'prod'" in str(exc))
refused: True
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from typing import TYPE_CHECKING, Any

from .errors import CheckpointBaseError
from .filesystem import display, is_local, open_fs
from .paths import normalize_base

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

#: The marker's file name, directly under the base (a dot file: no dag id can be spelled so).
BASE_MARKER = ".airflow-ray-base.json"
_MARKER_VERSION = 1


def claim_base(base_uri: str, storage_options: dict[str, Any], deployment_id: str) -> None:
    """Make sure ``base_uri`` belongs to ``deployment_id``: write the marker if there is none.

    Cheap when the marker exists (one small read), so every checkpoint write calls it. Two
    deployments claiming a fresh base at the same moment: on a local disk the first claim wins
    and the other is refused; on an object store both write, then read back what is stored, and
    the one whose marker lost is refused, except when both read back between the two writes (a
    window of milliseconds, once per base; object stores offer no portable create-if-absent).

    :raises CheckpointBaseError: the base belongs to another deployment, or its marker is malformed.
    """
    fs, root = open_fs(normalize_base(base_uri), storage_options)
    owner = _read(fs, root)
    if owner is None:
        created = datetime.datetime.now(datetime.UTC).isoformat()
        marker = {"format_version": _MARKER_VERSION, "deployment": deployment_id, "created_at": created}
        _create(fs, f"{root}/{BASE_MARKER}", json.dumps(marker).encode())
        owner = _read(fs, root)
    if owner != deployment_id:
        raise CheckpointBaseError(
            f"Checkpoint base {display(fs, root)} belongs to the Airflow deployment {owner!r} "
            f"(its {BASE_MARKER} says so), not to this one ({deployment_id!r}): two deployments "
            "must not share a base, their dag and run ids would overwrite each other's checkpoints. "
            "Give this deployment a base of its own (checkpoint_path, the checkpoint_source "
            "connection, or [ray] checkpoint_path).",
            display(fs, root),
        )


def check_base(base_uri: str, storage_options: dict[str, Any], deployment_id: str) -> bool:
    """Whether ``airflow-ray gc`` of ``deployment_id`` may delete under ``base_uri``.

    True when the base's marker names that deployment; False when the base holds nothing (it does
    not exist yet: nothing to delete, and no reason to fail a sweep that runs before the first
    checkpoint); otherwise an error, and nothing is deleted.

    :raises CheckpointBaseError: the base holds data but no marker (a mistyped base?), or its
        marker names another deployment, or is malformed.
    """
    fs, root = open_fs(normalize_base(base_uri), storage_options)
    owner = _read(fs, root)
    if owner == deployment_id:
        return True
    if owner is None:
        try:
            if not fs.ls(root, detail=False):
                return False
        except FileNotFoundError:
            return False
        why = (
            f"it has no {BASE_MARKER}, which the first checkpoint a deployment writes under a base "
            "leaves there: it is no checkpoint base of this deployment (a mistyped base?), or its "
            "checkpoints were written before airflow-ray marked its bases"
        )
    else:
        why = f"its {BASE_MARKER} says it belongs to the Airflow deployment {owner!r}"
    raise CheckpointBaseError(
        f"Not expiring checkpoints under {display(fs, root)}: {why}. This deployment is "
        f"{deployment_id!r}; nothing was deleted. Check the base (--checkpoints, [ray] checkpoint_path): "
        "gc expires checkpoints only under bases this deployment wrote checkpoints to.",
        display(fs, root),
    )


def _create(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write the marker so that no reader ever sees part of it.

    The writes of one task's outputs run in parallel and all claim the base; a plain local write
    (truncate, then write) let one of them read an empty marker and fail as "malformed" (seen
    in CI). Locally the marker is written aside and linked into place, which also keeps the first
    claim (a link does not replace). An object store's PUT replaces an object whole, so readers see
    one marker or the other, never a torn one; the read-back in :func:`claim_base` settles which.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    aside = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(aside, "wb") as f:
        f.write(data)
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # another writer claimed the base first: claim_base reads back whose it is
    finally:
        os.unlink(aside)


def _read(fs: AbstractFileSystem, root: str) -> str | None:
    path = f"{root}/{BASE_MARKER}"
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(raw)["deployment"]
        if not isinstance(owner, str):
            raise TypeError(f"'deployment' is {owner!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointBaseError(
            f"Checkpoint base marker {display(fs, path)} is malformed ({type(exc).__name__}: {exc}): "
            "airflow-ray writes it as JSON naming the deployment that owns the base. Delete it only "
            "if this base is this deployment's; the next checkpoint written here recreates it.",
            display(fs, path),
        ) from exc
    return owner
