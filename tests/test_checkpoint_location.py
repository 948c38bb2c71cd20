# ruff: noqa: F811  (pytest fixtures imported from tests.s3_server are redefined as arguments)
"""Where checkpoints go, resolved on the Airflow side: paths, config and connections.

Connections come from ``AIRFLOW_CONN_*`` env vars: outside a task, Airflow 3.3's Task SDK
``BaseHook.get_connection`` reads them (and secrets backends) without a metadata DB.
"""

from __future__ import annotations

import json

import pytest

from airflow_ray import config
from airflow_ray.checkpoint import resolve_checkpoint_location
from tests.s3_server import aws_connection, s3_server  # noqa: F401

SECRET = "testing-secret-key-do-not-log"


@pytest.fixture(autouse=True)
def _clean_config(monkeypatch: pytest.MonkeyPatch):
    for name in ("AIRFLOW__RAY__CHECKPOINT_PATH", "AIRFLOW__RAY__CHECKPOINT_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    config.clear_caches()
    yield
    config.clear_caches()


def _resolve(**kwargs):
    args = {"checkpoint_path": None, "checkpoint_source": None, "dag_id": "d", "run_id": "r", "task_id": "t"}
    return resolve_checkpoint_location(**(args | kwargs))


def _set_conn(monkeypatch, conn_id: str, **fields) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    return conn_id


def test_resolution_checkpoint_path_wins(monkeypatch, aws_connection, s3_server):
    monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_PATH", "file:///from/config")
    loc = _resolve(checkpoint_path="s3://explicit/base", checkpoint_source=aws_connection, map_index=2)
    assert loc.uri == "s3://explicit/base/d/r/t/2/"
    # Credentials still come from the connection.
    assert loc.storage_options["key"] == s3_server.access_key
    assert loc.storage_options["secret"] == SECRET
    assert loc.storage_options["client_kwargs"] == {
        "endpoint_url": s3_server.endpoint_url,
        "region_name": "us-east-1",
    }
    assert SECRET not in repr(loc)


def test_resolution_connection_before_config(monkeypatch, aws_connection, s3_server):
    monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_PATH", "file:///from/config")
    loc = _resolve(checkpoint_source=aws_connection)
    assert loc.uri == f"s3://{s3_server.bucket}/ckpt/d/r/t/-1/"


def test_resolution_config_when_nothing_else(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_PATH", f"{tmp_path.as_uri()}/cfg/")
    loc = _resolve(map_index=None)
    assert loc.uri == f"{tmp_path.as_uri()}/cfg/d/r/t/-1/"
    assert loc.storage_options == {}


def test_resolution_error_says_what_to_set():
    with pytest.raises(ValueError, match="checkpoint_path") as info:
        _resolve()
    assert "AIRFLOW__RAY__CHECKPOINT_PATH" in str(info.value) and "checkpoint_source" in str(info.value)


def test_connection_without_location_falls_back_to_config_keeping_credentials(monkeypatch):
    monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_PATH", "s3://cfg-bucket/base")
    conn_id = _set_conn(
        monkeypatch,
        "s3_creds_only",
        conn_type="aws",
        login="AKIA-only",
        password=SECRET,
        extra={"endpoint_url": "http://127.0.0.1:1"},
    )
    loc = _resolve(checkpoint_source=conn_id)
    assert loc.uri == "s3://cfg-bucket/base/d/r/t/-1/"
    assert loc.storage_options["key"] == "AKIA-only"
    assert loc.storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:1"


def test_config_conn_id_supplies_credentials_for_config_path(monkeypatch):
    monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_PATH", "s3://cfg-bucket/base")
    monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_CONN_ID", "cfg_conn")
    _set_conn(
        monkeypatch,
        "cfg_conn",
        conn_type="aws",
        login="AKIA-cfg",
        password=SECRET,
        extra={"service_config": {"s3": {"endpoint_url": "http://127.0.0.1:2"}}},
    )
    loc = _resolve()
    assert loc.uri == "s3://cfg-bucket/base/d/r/t/-1/"
    assert loc.storage_options["key"] == "AKIA-cfg"
    assert loc.storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:2"


def test_connection_extra_forms(monkeypatch, tmp_path):
    explicit = _set_conn(monkeypatch, "explicit", conn_type="aws", extra={"checkpoint_path": "bkt/pre/"})
    assert _resolve(checkpoint_source=explicit).uri == "s3://bkt/pre/d/r/t/-1/"
    generic = _set_conn(
        monkeypatch,
        "generic_s3",
        conn_type="generic",
        host="bkt",
        schema="pre",
        login="AKIA-generic",
        password=SECRET,
        extra={"protocol": "s3", "endpoint_url": "http://127.0.0.1:3", "storage_options": {"use_ssl": False}},
    )
    loc = _resolve(checkpoint_source=generic)
    assert loc.uri == "s3://bkt/pre/d/r/t/-1/"
    assert loc.storage_options == {
        "key": "AKIA-generic",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:3"},
        "use_ssl": False,
        "config_kwargs": {"connect_timeout": 60.0, "read_timeout": 60.0},  # [ray] storage_timeout_seconds
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_URI_FORM", f"s3://AKIA-uri:{SECRET}@bkt/pre?endpoint_url=http%3A%2F%2Fh%3A9"
    )
    loc = _resolve(checkpoint_source="uri_form")
    assert loc.uri == "s3://bkt/pre/d/r/t/-1/"
    assert loc.storage_options["key"] == "AKIA-uri" and loc.storage_options["secret"] == SECRET
    assert loc.storage_options["client_kwargs"] == {"endpoint_url": "http://h:9"}
    local = _set_conn(monkeypatch, "local_fs", conn_type="fs", extra={"path": str(tmp_path)})
    loc = _resolve(checkpoint_source=local)
    assert loc.uri == f"{tmp_path.as_uri()}/d/r/t/-1/" and loc.storage_options == {}


def test_connection_for_another_store_is_refused(monkeypatch, aws_connection):
    with pytest.raises(ValueError, match="is for s3://"):
        _resolve(checkpoint_path="gs://bucket/base", checkpoint_source=aws_connection)


def test_gcp_connection_maps_to_gcsfs_options(monkeypatch):
    key = {"type": "service_account", "project_id": "p", "private_key": SECRET}
    conn_id = _set_conn(
        monkeypatch,
        "gcp",
        conn_type="google_cloud_platform",
        extra={"keyfile_dict": json.dumps(key), "project": "p", "bucket_name": "gbkt"},
    )
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install gcsfs"):
            _resolve(checkpoint_source=conn_id)
    else:
        loc = _resolve(checkpoint_source=conn_id)
        assert loc.uri == "gs://gbkt/d/r/t/-1/"
        assert loc.storage_options == {"token": key, "project": "p"}
        assert SECRET not in repr(loc)
