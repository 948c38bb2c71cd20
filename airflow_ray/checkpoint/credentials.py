"""Airflow connections as fsspec storage options, so Ray workers reach the store without Airflow.

An ``aws`` connection goes through the amazon provider's ``AwsBaseHook`` (login/password, role,
profile ... whatever Airflow resolves; endpoint from extra ``endpoint_url`` or
``service_config.s3.endpoint_url``; ``region_name``; extra ``config_kwargs``); a
``google_cloud_platform`` connection through ``keyfile_dict`` / ``key_path`` (read here, so the
worker needs no key file); any other connection with a login as S3 key/secret. Extra
``storage_options`` (a dict) is merged last, for any store.

Why not ``ObjectStoragePath``: it pickles to a bare path that drops the connection, and
unpickling it needs Airflow on the Ray worker; its filesystem object holds a live aiobotocore
session. Plain fsspec options derived from the same connection, through the same provider
hooks, pickle small and work on a worker without Airflow. Temporary credentials (assumed roles)
are frozen here, so they expire on their usual schedule.

Airflow and its providers are imported inside the functions that use them: importing
:mod:`airflow_ray.checkpoint` stays cheap.
"""

from __future__ import annotations

import json
from typing import Any

from airflow_ray._worker.checkpoint.filesystem import LOCAL_PROTOCOLS

S3_PROTOCOLS = frozenset({"s3", "s3a", "s3n"})
_GCS_PROTOCOLS = frozenset({"gs", "gcs"})
# Connection type -> fsspec protocol, for connections that name a bucket rather than a full URI.
_CONN_TYPE_PROTOCOLS = {
    "aws": "s3",
    "s3": "s3",
    "google_cloud_platform": "gs",
    "gcp": "gs",
    "gs": "gs",
    "fs": "file",
    "file": "file",
}


def connection_protocol(conn: Any) -> str | None:
    """The fsspec protocol a connection is for: extra ``protocol``, else implied by its type."""
    extra = conn.extra_dejson
    return extra.get("protocol") or _CONN_TYPE_PROTOCOLS.get(conn.conn_type or "")


def storage_options(conn: Any, protocol: str) -> dict[str, Any]:
    """fsspec options carrying the connection's credentials for ``protocol``.

    :raises ValueError: the connection is for another store than ``protocol``.
    """
    conn_protocol = connection_protocol(conn)
    if conn_protocol and _protocol_family(conn_protocol) != _protocol_family(protocol):
        raise ValueError(
            f"Checkpoint base uses {protocol}:// but connection {conn.conn_id!r} "
            f"(type {conn.conn_type!r}) is for {conn_protocol}://"
        )
    if protocol in S3_PROTOCOLS:
        options = _s3_options(conn)
    elif protocol in _GCS_PROTOCOLS:
        options = _gcs_options(conn)
    else:
        options = {}
    extra_options = conn.extra_dejson.get("storage_options")
    if isinstance(extra_options, str):
        extra_options = json.loads(extra_options)
    if extra_options:
        options.update(extra_options)
    return options


def _s3_options(conn: Any) -> dict[str, Any]:
    """s3fs options from an ``aws`` connection (via AwsBaseHook) or any login/password connection."""
    extra = conn.extra_dejson
    options: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if conn.conn_type == "aws":
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        hook = AwsBaseHook(aws_conn_id=conn.conn_id, client_type="s3")
        credentials = _aws_frozen_credentials(hook)
        if credentials is not None and credentials.access_key:
            options["key"] = credentials.access_key
            options["secret"] = credentials.secret_key
            if credentials.token:
                options["token"] = credentials.token
        conn_config = hook.conn_config
        endpoint_url = conn_config.get_service_endpoint_url("s3")
        region_name = conn_config.region_name
        config_kwargs = conn_config.extra_config.get("config_kwargs")
    else:
        if conn.login:
            options["key"] = conn.login
            options["secret"] = conn.password
        endpoint_url = extra.get("endpoint_url")
        region_name = extra.get("region_name")
        config_kwargs = extra.get("config_kwargs")
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region_name:
        client_kwargs["region_name"] = region_name
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    if config_kwargs:
        options["config_kwargs"] = dict(config_kwargs)
    return options


def _aws_frozen_credentials(hook: Any) -> Any:
    """Credentials Airflow resolves for the connection, or None when there are none.

    ``AwsBaseHook.get_credentials`` fails with AttributeError when boto finds no credentials;
    then the worker's own chain (instance role, env vars) applies. Secrets are masked in logs.
    """
    from airflow.sdk.log import mask_secret

    session_credentials = hook.get_session().get_credentials()
    if session_credentials is None:
        return None
    credentials = session_credentials.get_frozen_credentials()
    for secret in (credentials.secret_key, credentials.token):
        if secret:
            mask_secret(secret)
    return credentials


def _gcs_options(conn: Any) -> dict[str, Any]:
    """gcsfs options from a ``google_cloud_platform`` connection; the key file is read here."""
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        raise ImportError(
            f"Checkpoints on gs:// (connection {conn.conn_id!r}) need gcsfs on the Airflow workers "
            "and the Ray workers: pip install gcsfs"
        )
    extra = conn.extra_dejson

    def get(key: str) -> Any:
        return extra.get(key) or extra.get(f"extra__google_cloud_platform__{key}")

    options: dict[str, Any] = {}
    keyfile_dict, key_path = get("keyfile_dict"), get("key_path")
    if keyfile_dict:
        options["token"] = json.loads(keyfile_dict) if isinstance(keyfile_dict, str) else keyfile_dict
    elif key_path:
        with open(key_path) as f:
            options["token"] = json.load(f)
    else:
        options["token"] = "google_default"
    if project := get("project"):
        options["project"] = project
    return options


def _protocol_family(protocol: str) -> str:
    if protocol in S3_PROTOCOLS:
        return "s3"
    if protocol in _GCS_PROTOCOLS:
        return "gs"
    if protocol in LOCAL_PROTOCOLS:
        return "file"
    return protocol
