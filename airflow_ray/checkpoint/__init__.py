"""Durable checkpoints of task outputs, written and read where the data lives.

A checkpoint is one directory per task instance, ``<base>/<dag_id>/<run_id>/<task_id>/<map_index>/``,
holding one data file with a stable name and a ``manifest.json`` written last::

    >>> import tempfile
    >>> import pandas as pd
    >>> from airflow_ray.checkpoint import (
    ...     CheckpointLocation, checkpoint_uri, read_checkpoint, write_checkpoint)
    >>> base = tempfile.mkdtemp()  # or "s3://bucket/prefix", with storage_options
    >>> loc = CheckpointLocation(checkpoint_uri(base, dag_id="etl", run_id="manual__1", task_id="extract"))
    >>> loc.uri.endswith("/etl/manual__1/extract/-1/")
    True
    >>> manifest = write_checkpoint(pd.DataFrame({"x": [1, 2]}), loc)
    >>> manifest["format"], manifest["data_file"], manifest["rows"]
    ('parquet', 'data.parquet', 2)
    >>> read_checkpoint(loc).equals(pd.DataFrame({"x": [1, 2]}))
    True

Two halves with different homes:

* The Airflow side, in this package: :func:`resolve_checkpoint_location` (module
  :mod:`~airflow_ray.checkpoint.location`) turns ``checkpoint_path`` / ``checkpoint_source`` /
  the ``[ray] checkpoint_path`` option into a :class:`CheckpointLocation` (URI plus fsspec
  credentials taken from the Airflow connection, :mod:`~airflow_ray.checkpoint.credentials`).
  They import Airflow inside the functions that need it, so importing this package does not.
  (Running the writes on Ray for a task's outputs is :func:`airflow_ray.outputs.persist`.)
* The worker side, :mod:`airflow_ray._worker.checkpoint`, re-exported here: :func:`write_checkpoint`,
  :func:`read_checkpoint` and the list and delete helpers run on a Ray worker next to the data
  (the base marker, :func:`claim_base` / :func:`check_base`, says which deployment owns a base),
  so a 1 GB output never passes through the Airflow process. They travel to Ray by value and need
  fsspec (plus s3fs/gcsfs for those stores), pyarrow, numpy/pandas for those types, never Airflow.

Stability: beta. The on-store layout and manifest keys are versioned by ``format_version``
(:data:`MANIFEST_FORMAT_VERSION`).
"""

from __future__ import annotations

from airflow_ray._api import deprecated_aliases, public_api
from airflow_ray._worker.checkpoint import (
    BASE_MARKER,
    CHECKSUM_ALGORITHM,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointBaseError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLocation,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    RunCheckpoints,
    check_base,
    checkpoint_uri,
    claim_base,
    delete_checkpoint,
    delete_run_checkpoints,
    list_run_checkpoints,
    path_component,
    read_checkpoint,
    read_manifest,
    write_checkpoint,
)
from airflow_ray.checkpoint.location import resolve_checkpoint_location, storage_options_for

# The worker side cannot import Airflow-side code, so its public names are marked here, where they
# become public (the mark sets an attribute and a docstring line on the objects themselves).
for _public in (
    CheckpointLocation,
    CheckpointError,
    CheckpointBaseError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    checkpoint_uri,
    write_checkpoint,
    read_checkpoint,
    read_manifest,
    delete_checkpoint,
    delete_run_checkpoints,
    list_run_checkpoints,
    claim_base,
    check_base,
    resolve_checkpoint_location,
):
    public_api("beta")(_public)

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
    "path_component",
    "read_checkpoint",
    "read_manifest",
    "resolve_checkpoint_location",
    "storage_options_for",
    "write_checkpoint",
]

__getattr__ = deprecated_aliases(
    __name__, {"FORMAT_VERSION": ("MANIFEST_FORMAT_VERSION", ", the version of the manifest format")}
)
