"""Checkpoints of task outputs: the part that runs on Ray workers, next to the data.

:mod:`airflow_ray.checkpoint` is the public face (and the Airflow side: where a task's
checkpoints go, with which credentials); what it re-exports from here is shipped to Ray by value
with the rest of :mod:`airflow_ray._worker`, so a cluster needs fsspec and the data libraries,
not airflow-ray. One concept per module:

* :mod:`.io`: write, read, list and delete checkpoints.
* :mod:`.paths`: where a checkpoint lives (:class:`CheckpointLocation`, directory names).
* :mod:`.formats`: how a value is stored (Parquet, Arrow IPC, ``.npy``, cloudpickle).
* :mod:`.manifest`: the manifest that makes a directory a complete checkpoint.
* :mod:`.marker`: the marker that says which deployment owns a base (gc deletes only there).
* :mod:`.streams`: streaming in large blocks, checksummed on the way.
* :mod:`.filesystem`: the fsspec operations used; :mod:`.errors`: what is raised.
"""

from .errors import (
    CheckpointBaseError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
)
from .io import (
    RunCheckpoints,
    delete_checkpoint,
    delete_run_checkpoints,
    list_run_checkpoints,
    read_checkpoint,
    read_manifest,
    write_checkpoint,
)
from .manifest import MANIFEST_FORMAT_VERSION, MANIFEST_NAME
from .marker import BASE_MARKER, check_base, claim_base
from .paths import CheckpointLocation, checkpoint_uri, normalize_base, path_component
from .streams import CHECKSUM_ALGORITHM

__all__ = [
    "BASE_MARKER",
    "CHECKSUM_ALGORITHM",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_NAME",
    "CheckpointBaseError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointLocation",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointTimeoutError",
    "RunCheckpoints",
    "check_base",
    "checkpoint_uri",
    "claim_base",
    "delete_checkpoint",
    "delete_run_checkpoints",
    "list_run_checkpoints",
    "normalize_base",
    "path_component",
    "read_checkpoint",
    "read_manifest",
    "write_checkpoint",
]
