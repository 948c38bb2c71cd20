"""Where a task instance's checkpoint goes, and with which credentials: config and connections.

This runs in the Airflow task process; what it returns, a
:class:`~airflow_ray._worker.checkpoint.CheckpointLocation`, is what a Ray worker needs to write
or read the checkpoint without Airflow. Airflow is imported inside the functions that use it.
"""

from __future__ import annotations

from typing import Any

from airflow_ray._worker.checkpoint import CheckpointLocation, checkpoint_uri, normalize_base
from airflow_ray._worker.checkpoint.filesystem import LOCAL_PROTOCOLS
from airflow_ray.checkpoint.credentials import S3_PROTOCOLS, connection_protocol, storage_options
from airflow_ray.version import __version__


def resolve_checkpoint_location(
    *,
    checkpoint_path: str | None,
    checkpoint_source: str | None,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int | None = -1,
) -> CheckpointLocation:
    """Resolve a task instance's checkpoint directory and credentials.

    The base, first match wins:

    1. ``checkpoint_path`` (``s3://bucket/prefix``, ``gs://...``, ``file:///dir`` or a local path);
    2. the ``checkpoint_source`` connection: extra ``checkpoint_path`` (a URI, or ``bucket/prefix``
       for a connection whose type implies the protocol), else extra ``bucket_name`` (or
       ``bucket``) plus optional ``prefix``, else the connection's ``host`` plus ``schema`` as
       bucket and prefix (so ``AIRFLOW_CONN_X='s3://key:secret@bucket/prefix'`` works), or extra
       ``path`` of a ``fs`` (File) connection;
    3. the ``[ray] checkpoint_path`` option (env ``AIRFLOW__RAY__CHECKPOINT_PATH``), with
       credentials from the ``[ray] checkpoint_conn_id`` connection if that option is set.

    Credentials come from ``checkpoint_source`` (else ``[ray] checkpoint_conn_id``), mapped to
    fsspec options for the base's protocol as :mod:`airflow_ray.checkpoint.credentials`
    describes. Without a connection the worker's own environment (instance role, env vars)
    applies. The location also names this airflow-ray version as the checkpoint's producer.

    :raises ValueError: when no base is configured, or the connection's store does not match it.
    """
    conn_id = checkpoint_source or _config_option("checkpoint_conn_id")
    conn = _get_connection(conn_id) if conn_id else None

    base = checkpoint_path
    if not base and checkpoint_source and conn is not None:
        base = _connection_base(conn)
    if not base:
        base = _config_option("checkpoint_path")
    if not base and conn is not None and not checkpoint_source:
        base = _connection_base(conn)
    if not base:
        raise ValueError(
            f"No checkpoint location for task {task_id!r} of DAG {dag_id!r}: pass checkpoint_path="
            "'s3://bucket/prefix' (or file:///dir), or checkpoint_source=<connection id> whose "
            "connection has extra 'checkpoint_path' or 'bucket_name', or set [ray] checkpoint_path "
            "(env AIRFLOW__RAY__CHECKPOINT_PATH)."
        )
    base = normalize_base(base)
    options = _options(conn, base)
    uri = checkpoint_uri(base, dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)
    return CheckpointLocation(
        uri=uri, storage_options=options, producer={"airflow_ray": __version__}, base=base
    )


def storage_options_for(uri: str, conn_id: str | None) -> dict[str, Any]:
    """fsspec options for reading ``uri`` with the credentials of ``conn_id``."""
    conn_id = conn_id or _config_option("checkpoint_conn_id")
    conn = _get_connection(conn_id) if conn_id else None
    return _options(conn, uri)


def _options(conn: Any, uri: str) -> dict[str, Any]:
    """The connection's fsspec options for ``uri``, with every request bounded in time.

    s3fs passes ``config_kwargs`` to botocore, whose connect and read timeouts hold per request
    (60 s each by default; a store that accepts and never answers is retried by botocore and
    s3fs, but no longer forever). ``[ray] storage_timeout_seconds`` fills the ones the
    connection's own ``config_kwargs`` leave unset. Other stores keep their own defaults.
    """
    protocol = _protocol_of(uri)
    options = storage_options(conn, protocol) if conn is not None else {}
    if protocol in S3_PROTOCOLS:
        from airflow_ray import config

        timeout = config.storage_timeout_seconds()
        bounds = {"connect_timeout": timeout, "read_timeout": timeout}
        options["config_kwargs"] = {**bounds, **options.get("config_kwargs", {})}
    return options


def _config_option(key: str) -> str | None:
    """``[ray] checkpoint_path`` / ``checkpoint_conn_id`` through the provider's accessors."""
    from airflow_ray import config

    return getattr(config, key)() or None


def _get_connection(conn_id: str) -> Any:
    """Fetch a connection through the Task SDK (task context, env vars, secrets backends)."""
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)


def _connection_base(conn: Any) -> str | None:
    """The base URI a connection names, or None (see resolve_checkpoint_location for the rules)."""
    extra = conn.extra_dejson
    protocol = connection_protocol(conn)
    explicit = extra.get("checkpoint_path")
    if explicit:
        if "://" in explicit or protocol is None:
            return explicit
        return f"{protocol}://{explicit.lstrip('/')}"
    bucket = extra.get("bucket_name") or extra.get("bucket")
    if bucket and protocol:
        prefix = (extra.get("prefix") or "").strip("/")
        return f"{protocol}://{bucket}/{prefix}" if prefix else f"{protocol}://{bucket}"
    if protocol == "file" and extra.get("path"):
        return str(extra["path"])
    host = conn.host or ""
    if host and protocol and "://" not in host and protocol not in LOCAL_PROTOCOLS:
        schema = (conn.schema or "").strip("/")
        return f"{protocol}://{host}/{schema}" if schema else f"{protocol}://{host}"
    return None


def _protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"
