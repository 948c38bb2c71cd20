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
  credentials taken from the Airflow connection, :mod:`~airflow_ray.checkpoint.credentials`),
  and :func:`persist` runs the writes on Ray. These import Airflow and Ray inside the functions
  that need them, so importing this package imports neither.
* The worker side, :mod:`airflow_ray._worker.checkpoint`, re-exported here: :func:`write_checkpoint`,
  :func:`read_checkpoint` and the list and delete helpers run on a Ray worker next to the data,
  so a 1 GB output never passes through the Airflow process. They travel to Ray by value and need
  fsspec (plus s3fs/gcsfs for those stores), pyarrow, numpy/pandas for those types, never Airflow.

Stability: beta. The on-store layout and manifest keys are versioned by ``format_version``
(:data:`MANIFEST_FORMAT_VERSION`).
"""

from __future__ import annotations

import warnings
from typing import Any

from airflow_ray._worker.checkpoint import (
    CHECKSUM_ALGORITHM,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLocation,
    CheckpointNotFoundError,
    RunCheckpoints,
    checkpoint_uri,
    delete_checkpoint,
    delete_run_checkpoints,
    list_run_checkpoints,
    path_component,
    read_checkpoint,
    read_manifest,
    write_checkpoint,
)
from airflow_ray.checkpoint.location import resolve_checkpoint_location, storage_options_for

__all__ = [
    "CHECKSUM_ALGORITHM",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_NAME",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointLocation",
    "CheckpointNotFoundError",
    "RunCheckpoints",
    "checkpoint_uri",
    "delete_checkpoint",
    "delete_run_checkpoints",
    "list_run_checkpoints",
    "path_component",
    "persist",
    "read_checkpoint",
    "read_manifest",
    "resolve_checkpoint_location",
    "storage_options_for",
    "write_checkpoint",
]

_DEPRECATED = {"FORMAT_VERSION": "MANIFEST_FORMAT_VERSION"}


def persist(
    references: dict[str, Any], *, checkpoint_path: str | None, checkpoint_source: str | None
) -> dict[str, Any]:
    """Checkpoint one task instance's outputs before the task succeeds (Airflow side).

    ``references`` maps XCom keys to :class:`~airflow_ray.store.ObjectReference` of one task
    instance. Each write runs as a Ray task that receives the output's ObjectRef, so the data
    goes from the object store to storage without passing through this process. One directory
    per task instance (``<base>/<dag>/<run>/<task>/<map_index>/``, one subdirectory per key of
    ``multiple_outputs``) with stable names: a retry overwrites, never piles up. Returns the
    references with their ``checkpoint_uri``.
    """
    import dataclasses
    import logging

    import ray

    from airflow_ray import tasks

    first = next(iter(references.values()))
    base = resolve_checkpoint_location(
        checkpoint_path=checkpoint_path,
        checkpoint_source=checkpoint_source,
        dag_id=first.dag_id,
        run_id=first.run_id,
        task_id=first.task_id,
        map_index=first.map_index,
    )
    locations = {
        key: base if key == "return_value" else dataclasses.replace(base, uri=f"{base.uri}{key}/")
        for key in references
    }
    write = ray.remote(write_checkpoint).options(num_cpus=0)
    refs = tasks.resolve(list(references.values()))
    manifests = ray.get(
        [
            write.remote(ref, locations[key], blocks=bool(references[key].summary.get("dataset")))
            for key, ref in zip(references, refs, strict=True)
        ]
    )
    log = logging.getLogger(__name__)
    for key, manifest in zip(references, manifests, strict=True):
        log.info(
            "Checkpointed the output of %s to %s (%s bytes, %s)",
            references[key].describe(),
            locations[key].uri,
            manifest["bytes"],
            manifest["checksum"],
        )
    return {
        key: dataclasses.replace(ref, checkpoint_uri=locations[key].uri, checkpoint_source=checkpoint_source)
        for key, ref in references.items()
    }


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(
            f"airflow_ray.checkpoint.{name} is deprecated: use {new}, the version of the manifest format",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module 'airflow_ray.checkpoint' has no attribute {name!r}")
