"""Provider configuration, declared once and read through small cached accessors.

Every option lives in the ``[ray]`` section of ``airflow.cfg`` (or ``AIRFLOW__RAY__<OPTION>``
environment variables); :data:`OPTIONS` is the single declaration that ``get_provider_info()``
publishes and that the accessors fall back to, so a default can never drift between the docs
and the code. Tests clear the caches with :func:`clear_caches`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

SECTION = "ray"
T = TypeVar("T")

OPTIONS: dict[str, dict[str, Any]] = {
    "xcom_threshold_bytes": {
        "description": "Values whose serialized size is below this stay in the metadata DB as usual; "
        "larger ones go to Ray's object store. 0 sends every value to the object store.",
        "type": "integer",
        "example": "65536",
        "default": "65536",
    },
    "xcom_conn_id": {
        "description": "Ray connection of the XCom backend for plain tasks (which have no ray_conn_id "
        "of their own): where their large outputs are adopted and where their inputs are read.",
        "type": "string",
        "example": "ray_default",
        "default": "ray_default",
    },
    "object_ttl_seconds": {
        "description": "Objects of a DAG run are freed this long after they were produced, even if "
        "their XCom row still exists. Use checkpoints to keep outputs longer.",
        "type": "integer",
        "example": "86400",
        "default": "86400",
    },
    "max_objects": {
        "description": "Upper bound on the number of objects the owner registry holds. Beyond it the "
        "oldest DAG runs' objects are freed first.",
        "type": "integer",
        "example": "100000",
        "default": "100000",
    },
    "owner_shards": {
        "description": "Number of detached owner actors. A DAG run's objects always live in one shard.",
        "type": "integer",
        "example": "2",
        "default": "1",
    },
    "deployment_id": {
        "description": "This Airflow deployment's name on shared Ray clusters (lowercase letters, "
        "digits, '-'; at most 40). Owner actors, registry entries, Ray Job submission ids and the "
        "scope of airflow-ray gc carry it, so deployments sharing a cluster never read, replace "
        "or free each other's outputs. Empty: derived from the deployment's secret (the Airflow Variable "
        "airflow_ray_deployment_secret), stable for as long as the metadata DB.",
        "type": "string",
        "example": "prod",
        "default": "",
    },
    "namespace": {
        "description": "Ray namespace of the owner actors.",
        "type": "string",
        "example": "airflow_ray",
        "default": "airflow_ray",
    },
    "infeasible_task_timeout": {
        "description": "Seconds a task may wait for resources that no node of the cluster has before "
        "it fails. Raise it for autoscaling clusters that add such nodes on demand.",
        "type": "integer",
        "example": "600",
        "default": "60",
    },
    "http_timeout_seconds": {
        "description": "Seconds one HTTP request may take to connect and to answer: the Ray Jobs API "
        "(submit, status, logs, stop), the MLflow tracking server and the Serve smoke test. A server "
        "that accepts the connection and never answers fails the call after this long instead of "
        "hanging the task or the triggerer. MLflow retries such a request itself "
        "(MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default).",
        "type": "integer",
        "example": "120",
        "default": "60",
    },
    "storage_timeout_seconds": {
        "description": "Seconds one s3:// request (checkpoint reads and writes, gc) may take to connect "
        "and to answer, per request, not per transfer (botocore's connect and read timeouts). The "
        "connection's own config_kwargs win. s3fs and botocore retry a timed-out request "
        "(config_kwargs ``retries`` bounds botocore's). Other stores keep their own timeouts.",
        "type": "integer",
        "example": "120",
        "default": "60",
    },
    "checkpoint_path": {
        "description": "Default base URI for task checkpoints (``s3://bucket/prefix``, "
        "``file:///path``) when a task sets ``checkpoint=True`` without a path or connection.",
        "type": "string",
        "example": "s3://my-bucket/airflow-ray",
        "default": "",
    },
    "checkpoint_conn_id": {
        "description": "Connection whose credentials read and write checkpoints when a task names "
        "no checkpoint_source (e.g. an aws connection for an s3:// checkpoint_path).",
        "type": "string",
        "example": "aws_default",
        "default": "",
    },
    "checkpoint_allow_pickle": {
        "description": "Write and read cloudpickle checkpoints (values that are no Parquet-safe pandas "
        "DataFrame, pyarrow Table or numpy array). Even when allowed, a checkpoint is unpickled only "
        "when its XCom reference recorded a pickle write. False refuses both: a task whose checkpointed "
        "output needs pickle fails, and so does a restore of a pickle checkpoint.",
        "type": "boolean",
        "example": "False",
        "default": "True",
    },
    "checkpoint_retention_seconds": {
        "description": "Checkpoints of a DAG run are deleted this long after they were written "
        "(by ``airflow-ray gc``). Keep it longer than ``object_ttl_seconds``.",
        "type": "integer",
        "example": "604800",
        "default": "604800",
    },
    "gc_grace_seconds": {
        "description": "``airflow-ray gc`` never frees an object nor deletes a checkpoint younger "
        "than this: an output is registered before its XCom row is written, and a checkpoint is "
        "written file by file. Keep it longer than any task takes to push its outputs.",
        "type": "integer",
        "example": "600",
        "default": "600",
    },
    "preload_in_scheduler": {
        "description": "Import Ray in the scheduler before a LocalExecutor forks its workers, so "
        "every task process they fork starts with Ray imported (about 1 s less per Ray task). Only "
        "with the fork start method (Linux before Python 3.14); costs the scheduler Ray's memory.",
        "type": "boolean",
        "example": "False",
        "default": "True",
    },
    "local_cluster_dir": {
        "description": "Where the embedded local Ray cluster keeps its state file, lock and logs.",
        "type": "string",
        "example": "/opt/airflow/ray",
        "default": "~/.airflow_ray",
    },
    "local_cluster_num_cpus": {
        "description": "CPUs of the embedded local cluster (empty: all of the machine's).",
        "type": "integer",
        "example": "4",
        "default": "",
    },
    "local_cluster_object_store_bytes": {
        "description": "Object store size of the embedded local cluster (empty: Ray's default, "
        "30% of memory).",
        "type": "integer",
        "example": "4000000000",
        "default": "",
    },
    "local_cluster_dashboard": {
        "description": "Start the Ray dashboard with the embedded local cluster (on 127.0.0.1).",
        "type": "boolean",
        "example": "True",
        "default": "False",
    },
    "local_cluster_log_monitor": {
        "description": "Start Ray's log monitor with the embedded local cluster. It tails every Ray "
        "worker's log for the drivers that print their workers' output (log_to_driver): a Ray "
        "Job's script, whose remote tasks' output reaches the job log (and the Airflow task log) "
        "only through it, or a notebook's ray.init(address=...). airflow-ray's own drivers never "
        "ask for it: turn it off where no such driver runs to save its CPU (~3% of a core per "
        "cluster, measured under the test suite).",
        "type": "boolean",
        "example": "False",
        "default": "True",
    },
    "local_cluster_keeper": {
        "description": "Start the keeper with the embedded local cluster: a driver that creates the "
        "owner actors and stays connected, so Ray reuses its worker processes between Airflow task "
        "processes (about 0.5-2 s less per Ray task under the LocalExecutor).",
        "type": "boolean",
        "example": "False",
        "default": "True",
    },
    "keeper_on_first_use": {
        "description": "On a cluster where no keeper runs this version of airflow-ray (any cluster "
        "but the embedded one, or the embedded one after an upgrade), the first task that needs an "
        "owner starts one: a detached actor on the head node whose child process is a driver that "
        "stays connected and creates the owners, so Ray reuses their worker processes between "
        "Airflow task processes. The first task waits for it (a few seconds, once per cluster). "
        "False: only ``airflow-ray cluster prepare`` starts it.",
        "type": "boolean",
        "example": "False",
        "default": "True",
    },
}


def _get(option: str) -> str:
    """Read an option: environment first (cheap, works in Ray workers), then Airflow config.

    An unset or empty option reads as its declared default, so accessors never repeat one.
    """
    default = OPTIONS[option]["default"]
    value = os.environ.get(f"AIRFLOW__{SECTION.upper()}__{option.upper()}")
    if value is None:
        try:
            from airflow.sdk.configuration import conf

            value = str(conf.get(SECTION, option, fallback=default))
        except Exception:  # Airflow not configured (e.g. the CLI on a bare machine)
            value = default
    return value.strip() or default


def _get_int(option: str) -> int:
    return int(_get(option))


def _get_optional_int(option: str) -> int | None:
    """An integer option declared with an empty default, which means "Ray decides"."""
    value = _get(option)
    return int(value) if value else None


def _get_flag(option: str) -> bool:
    return _get(option).lower() in {"1", "true", "yes", "on"}


#: ``cache_clear`` of every accessor, filled by :func:`_accessor`.
_CACHE_CLEARS: list[Callable[[], None]] = []


def _accessor(read: Callable[[], T]) -> Callable[[], T]:
    """Cache an option accessor (read once per process) and register it for :func:`clear_caches`."""
    cached = cache(read)
    _CACHE_CLEARS.append(cached.cache_clear)
    return cached


@_accessor
def xcom_threshold_bytes() -> int:
    return _get_int("xcom_threshold_bytes")


@_accessor
def xcom_conn_id() -> str:
    return _get("xcom_conn_id")


@_accessor
def object_ttl_seconds() -> int:
    return _get_int("object_ttl_seconds")


@_accessor
def max_objects() -> int:
    return _get_int("max_objects")


@_accessor
def owner_shards() -> int:
    return max(1, _get_int("owner_shards"))


@_accessor
def deployment_id() -> str | None:
    return _get("deployment_id") or None  # validated by airflow_ray.deployment


@_accessor
def namespace() -> str:
    return _get("namespace")


@_accessor
def infeasible_task_timeout() -> float:
    return float(_get_int("infeasible_task_timeout"))


@_accessor
def http_timeout_seconds() -> float:
    return float(_get_int("http_timeout_seconds"))


@_accessor
def storage_timeout_seconds() -> float:
    return float(_get_int("storage_timeout_seconds"))


@_accessor
def checkpoint_path() -> str | None:
    return _get("checkpoint_path") or None


@_accessor
def checkpoint_conn_id() -> str | None:
    return _get("checkpoint_conn_id") or None


@_accessor
def checkpoint_allow_pickle() -> bool:
    return _get_flag("checkpoint_allow_pickle")


@_accessor
def checkpoint_retention_seconds() -> int:
    return _get_int("checkpoint_retention_seconds")


@_accessor
def gc_grace_seconds() -> int:
    return _get_int("gc_grace_seconds")


@_accessor
def preload_in_scheduler() -> bool:
    return _get_flag("preload_in_scheduler")


@_accessor
def local_cluster_dir() -> Path:
    return Path(_get("local_cluster_dir")).expanduser()


@_accessor
def local_cluster_num_cpus() -> int | None:
    return _get_optional_int("local_cluster_num_cpus")


@_accessor
def local_cluster_object_store_bytes() -> int | None:
    return _get_optional_int("local_cluster_object_store_bytes")


@_accessor
def local_cluster_dashboard() -> bool:
    return _get_flag("local_cluster_dashboard")


@_accessor
def local_cluster_log_monitor() -> bool:
    return _get_flag("local_cluster_log_monitor")


@_accessor
def local_cluster_keeper() -> bool:
    return _get_flag("local_cluster_keeper")


@_accessor
def keeper_on_first_use() -> bool:
    return _get_flag("keeper_on_first_use")


def clear_caches() -> None:
    """Forget cached option values (tests change the environment between cases)."""
    for cache_clear in _CACHE_CLEARS:
        cache_clear()
