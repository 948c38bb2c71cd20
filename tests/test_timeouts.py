"""Every network call gives up on a server that accepts the connection and never answers.

The server (:mod:`tests.silent_server`) is a real socket on 127.0.0.1: the kernel completes
the TCP handshake, nothing ever replies. ``[ray] http_timeout_seconds`` and
``[ray] storage_timeout_seconds`` are 1 s here; each call must fail with an error naming the
server, the operation and the option to raise. Without the bounds these calls block forever:
the pytest-timeout below is only the safety net that turns such a hang into a failure.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from airflow_ray import config
from airflow_ray.exceptions import ServiceTimeoutError
from airflow_ray.hooks.job import RayJobHook
from airflow_ray.triggers.job import RayJobTrigger
from tests.silent_server import SilentServer, unresponsive_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)

OPTION = "[ray] http_timeout_seconds"


@pytest.fixture(autouse=True)
def one_second(monkeypatch):
    """Both bounds at 1 s; MLflow's own retries off (they multiply the bound, and are MLflow's)."""
    monkeypatch.setenv("AIRFLOW__RAY__HTTP_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("AIRFLOW__RAY__STORAGE_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config.clear_caches()
    yield
    monkeypatch.undo()
    config.clear_caches()


def _assert_names(error: BaseException, server: str, operation: str, option: str = OPTION) -> None:
    message = str(error)
    assert server in message and operation in message and option in message, message


# --- the Ray Jobs API ---------------------------------------------------------------------------


@pytest.fixture
def silent_hook(unresponsive_server: SilentServer) -> RayJobHook:  # noqa: F811
    return RayJobHook("no_such_connection", dashboard_url=unresponsive_server.url)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda hook: hook.submit_job(entrypoint="true", submission_id="s1"), id="submit"),
        pytest.param(lambda hook: hook.get_job_status("s1"), id="status"),
        pytest.param(lambda hook: hook.stop_job("s1"), id="stop"),
    ],
)
def test_jobs_api_blocking_calls_give_up(silent_hook, unresponsive_server, call):  # noqa: F811
    """Ray's job client checks the server's version before anything else: that request is bounded
    like every other one (``compat.job_submission_client``)."""
    with pytest.raises(ServiceTimeoutError) as error:
        call(silent_hook)
    _assert_names(error.value, f"Ray Jobs API at {unresponsive_server.url}", "the version check")


@pytest.mark.parametrize(
    ("call", "operation"),
    [
        pytest.param(lambda hook: hook.a_get_job_info("s1"), "GET /api/jobs/s1", id="status"),
        pytest.param(lambda hook: hook.a_stop_job("s1"), "POST /api/jobs/s1/stop", id="stop"),
    ],
)
def test_jobs_api_async_calls_give_up(silent_hook, unresponsive_server, call, operation):  # noqa: F811
    with pytest.raises(ServiceTimeoutError) as error:
        asyncio.run(call(silent_hook))
    _assert_names(error.value, f"Ray Jobs API at {unresponsive_server.url}", operation)


def test_trigger_fires_one_error_event(unresponsive_server):  # noqa: F811
    """The triggerer's wait ends with an error event (the task fails) instead of polling forever."""
    trigger = RayJobTrigger(
        submission_id="s1", ray_conn_id="no_such_connection", dashboard_url=unresponsive_server.url
    )

    async def collect() -> list:
        return [event async for event in trigger.run()]

    events = asyncio.run(collect())
    assert len(events) == 1 and events[0].payload["status"] == "error", events
    _assert_names(events[0].payload["message"], unresponsive_server.url, "GET /api/jobs/s1")
    with pytest.raises(ServiceTimeoutError) as error:  # marking the deferred task failed
        asyncio.run(trigger.on_kill())
    _assert_names(error.value, unresponsive_server.url, "POST /api/jobs/s1/stop")


def test_operator_on_kill_gives_up(unresponsive_server, monkeypatch, caplog, capfd):  # noqa: F811
    """A killed task stops its job; a dashboard that never answers must not keep the kill waiting."""
    from airflow_ray.operators import RaySubmitJobOperator

    connection = {"conn_type": "ray", "extra": {"dashboard_url": unresponsive_server.url}}
    monkeypatch.setenv("AIRFLOW_CONN_RAY_UNRESPONSIVE", json.dumps(connection))
    op = RaySubmitJobOperator(task_id="t", entrypoint="unused", ray_conn_id="ray_unresponsive")
    op.submission_id = "s1"
    op.on_kill()  # logs the failure: a kill never raises
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Could not stop Ray job s1" in logged
    _assert_names(logged, unresponsive_server.url, "the version check")


# --- MLflow -------------------------------------------------------------------------------------


def test_mlflow_run_creation_gives_up(run_dag, unresponsive_server, monkeypatch, capfd):  # noqa: F811
    """The Airflow side creates the task's MLflow run while it renders the task: bounded too."""
    from tests.dags import tracked

    monkeypatch.setenv("MLFLOW_TRACKING_URI", unresponsive_server.url)
    result = run_dag(tracked.mlflow_unresponsive_dag)
    assert result.states == {"log_one": "failed"}
    _assert_names(
        capfd.readouterr().out,
        f"MLflow tracking server at {unresponsive_server.url}",
        "creating a run in experiment",
    )


def test_mlflow_logging_gives_up(unresponsive_server):  # noqa: F811
    """What a Ray worker does with its TrackedRun (here in this process, which is the same code)."""
    from airflow_ray.tracking import TrackedRun

    tracking = TrackedRun(
        tracking_uri=unresponsive_server.url,
        experiment="e",
        experiment_id="1",
        run_id="0123456789abcdef",
        tags={},
        timeout_s=config.http_timeout_seconds(),
    )
    with pytest.raises(Exception) as error, tracking.start():
        pass
    notes = "\n".join(getattr(error.value, "__notes__", []))
    _assert_names(notes, f"MLflow tracking server at {unresponsive_server.url}", "within 1 s")


# --- Serve ----------------------------------------------------------------------------------------


def test_serve_smoke_test_gives_up(unresponsive_server):  # noqa: F811
    from airflow_ray.operators import RayServeDeployOperator

    op = RayServeDeployOperator(
        task_id="deploy",
        app_name="silent",
        model_uri="models:/m/1",
        smoke_request={"inputs": [[1.0]]},
        serve_url=unresponsive_server.url,
    )
    with pytest.raises(ServiceTimeoutError) as error:
        op._smoke_test([0.5])
    proxy = f"Serve's HTTP proxy at {unresponsive_server.url}/silent"
    _assert_names(error.value, proxy, "smoke-test request")


# --- object storage -------------------------------------------------------------------------------


@pytest.fixture
def unresponsive_s3(unresponsive_server, monkeypatch) -> str:  # noqa: F811
    """An aws connection whose endpoint never answers, each request tried once.

    botocore's retries are off through the connection's ``config_kwargs`` (which a connection may
    always set); s3fs's (5 tries, a class attribute) through the class, for this test only: both
    multiply the bound this test is about, the one on each request.
    """
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    connection = {
        "conn_type": "aws",
        "login": "key",
        "password": "secret",
        "extra": {
            "endpoint_url": unresponsive_server.url,
            "region_name": "us-east-1",
            "bucket_name": "checkpoints",
            "config_kwargs": {"retries": {"max_attempts": 1}},
        },
    }
    monkeypatch.setenv("AIRFLOW_CONN_SILENT_S3", json.dumps(connection))
    return "silent_s3"


def test_s3_checkpoint_write_and_read_give_up(unresponsive_s3):
    from airflow_ray.checkpoint import (
        CheckpointTimeoutError,
        read_checkpoint,
        resolve_checkpoint_location,
        write_checkpoint,
    )

    location = resolve_checkpoint_location(
        checkpoint_path=None, checkpoint_source=unresponsive_s3, dag_id="d", run_id="r", task_id="t"
    )
    assert location.storage_options["config_kwargs"] == {
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "retries": {"max_attempts": 1},
    }
    with pytest.raises(CheckpointTimeoutError) as error:
        write_checkpoint({"a": 1}, location)
    _assert_names(error.value, location.uri, "Writing the checkpoint", "[ray] storage_timeout_seconds")
    with pytest.raises(CheckpointTimeoutError) as error:
        read_checkpoint(location)
    _assert_names(error.value, location.uri, "Reading the checkpoint", "[ray] storage_timeout_seconds")
