"""``RaySubmitJobOperator`` and ``RayJobTrigger`` against the session's real Ray head and Jobs API."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest

from airflow_ray.hooks.job import TERMINAL_STATES, RayJobHook
from airflow_ray.triggers.job import RayJobTrigger
from tests.dags import jobs


@pytest.fixture(scope="module")
def job_hook(ray_cluster) -> RayJobHook:
    return RayJobHook("no_such_connection")


def _jobs_of(hook: RayJobHook, run_id: str) -> list[dict]:
    return [j for j in hook.list_jobs() if (j.get("metadata") or {}).get("airflow_run_id") == run_id]


def _wait_terminal(hook: RayJobHook, submission_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (status := hook.get_job_status(submission_id)) not in TERMINAL_STATES:
        assert time.monotonic() < deadline, f"job {submission_id} still {status} after {timeout} s"
        time.sleep(0.5)
    return status


def test_job_succeeds_and_its_whole_log_reaches_the_task_log(run_dag, job_hook, capfd):
    result = run_dag(jobs.succeeds_dag)
    text = "".join(capfd.readouterr())
    assert result.states["emit"] == "success", text[-3000:]
    submission_id = result.xcom("emit")
    assert submission_id.startswith("airflow-job_succeeds.emit.") and submission_id.endswith("-try1")
    for i in range(1, 6):  # the templated entrypoint, run from the uploaded working_dir
        assert f"[ray job] job line {i} of 5" in text
    assert "[ray job] last line before exit 0" in text  # unflushed, no newline, still there
    assert text.count("[ray job] job line 3 of 5") == 1  # the tail and the final fetch never repeat
    (job,) = _jobs_of(job_hook, result.run_id)
    assert job["status"] == "SUCCEEDED"
    assert job["metadata"]["purpose"] == "test" and job["metadata"]["airflow_task_id"] == "emit"
    link = result.xcom_raw("emit", key="_link_RayDashboardLink")
    assert link == f"{job_hook.dashboard.url}/#/jobs/{submission_id}"


def test_failing_job_fails_the_task_with_the_log_tail(run_dag, job_hook, capfd):
    result = run_dag(jobs.fails_dag)
    text = "".join(capfd.readouterr())
    assert result.states["emit"] == "failed"
    assert "ended FAILED" in text
    error = text[text.index("ended FAILED") :]
    assert "Last 30 lines of the job log:" in error
    assert "job line 40 of 40" in error and "last line before exit 3" in error
    (job,) = _jobs_of(job_hook, result.run_id)
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 3


def test_execution_timeout_stops_the_job(run_dag, job_hook):
    result = run_dag(jobs.times_out_dag)
    assert result.states["emit"] == "failed"
    (job,) = _jobs_of(job_hook, result.run_id)
    assert _wait_terminal(job_hook, job["submission_id"]) == "STOPPED"


def test_deferrable_completes_through_the_trigger(run_dag, job_hook, capsys, caplog):
    """``dag.test()`` runs the trigger inline (serialized kwargs -> a new trigger -> ``run()``)."""
    result = run_dag(jobs.deferred_dag)
    text = capsys.readouterr().out  # the inline trigger logs through the test's sys.stdout
    assert result.states["emit"] == "success", text[-3000:]
    assert "[DAG TEST] running trigger in line" in caplog.text
    assert "[ray job] job line 3 of 3" in text and "[ray job] last line before exit 0" in text
    (job,) = _jobs_of(job_hook, result.run_id)
    assert job["status"] == "SUCCEEDED"


def test_retry_reattaches_to_the_running_job(run_dag, job_hook, capfd):
    result = run_dag(jobs.retried_dag)
    text = "".join(capfd.readouterr())
    assert result.states["emit"] == "success", text[-3000:]
    assert "simulated worker death" in text and "Reconnecting to existing job" in text
    (job,) = _jobs_of(job_hook, result.run_id)  # submitted once, by the first try
    assert job["metadata"]["airflow_try_number"] == "1" and job["status"] == "SUCCEEDED"
    assert result.xcom("emit") == job["submission_id"]


def test_trigger_serializes_without_the_token():
    trigger = RayJobTrigger(
        submission_id="s1", ray_conn_id="ray_x", dashboard_url="http://h:8265", local_token=True
    )
    assert trigger.serialize() == (
        "airflow_ray.triggers.job.RayJobTrigger",
        {
            "submission_id": "s1",
            "ray_conn_id": "ray_x",
            "dashboard_url": "http://h:8265",
            "local_token": True,
            "poll_interval": 2.0,
        },
    )


def test_trigger_on_kill_stops_the_job(job_hook):
    """Marking a deferred task failed makes the triggerer call ``on_kill``: the job stops."""
    submission_id = job_hook.submit_job(
        entrypoint="python -c 'import time; time.sleep(600)'", submission_id=f"on-kill-{time.time_ns()}"
    )
    dashboard = job_hook.dashboard
    trigger = RayJobTrigger(
        submission_id=submission_id,
        ray_conn_id="no_such_connection",
        dashboard_url=dashboard.url,
        local_token=dashboard.local_token,
    )
    asyncio.run(trigger.on_kill())
    assert _wait_terminal(job_hook, submission_id) == "STOPPED"


def test_deferral_timeout_stops_the_job(job_hook):
    """A deferral timeout resumes the task with ``__fail__``; the operator stops the job first."""
    from airflow.sdk.exceptions import TaskDeferralTimeout

    from airflow_ray.operators import RaySubmitJobOperator

    submission_id = job_hook.submit_job(
        entrypoint="python -c 'import time; time.sleep(600)'", submission_id=f"timeout-{time.time_ns()}"
    )
    op = RaySubmitJobOperator(task_id="t", entrypoint="unused", ray_conn_id="no_such_connection")
    context = {"task_state_store": {op.external_id_key: submission_id}}  # what the retry would read
    with pytest.raises(TaskDeferralTimeout):
        op.resume_execution("__fail__", {"error": "Trigger timeout"}, context)
    assert _wait_terminal(job_hook, submission_id) == "STOPPED"


def test_two_deployments_with_the_same_ids_each_run_their_own_job(job_hook, monkeypatch):
    """Two Airflow deployments on one cluster often have the same DAG, task and run ids
    (``etl``/``scheduled__…``). Each submits its own job, marked with its deployment: under one
    submission id, Ray would refuse the second deployment's job and fail its task."""
    from airflow_ray import config
    from airflow_ray.operators import RaySubmitJobOperator

    op = RaySubmitJobOperator(task_id="emit", entrypoint="true", ray_conn_id="no_such_connection")
    run_id = f"scheduled__{uuid.uuid4().hex}"  # the session's cluster keeps every job it ran
    ti = SimpleNamespace(dag_id="etl", task_id="emit", map_index=-1, run_id=run_id, try_number=1)
    submitted = {}
    try:
        for tenant in ("team-a", "team-b"):
            monkeypatch.setenv("AIRFLOW__RAY__DEPLOYMENT_ID", tenant)
            config.clear_caches()
            submitted[tenant] = op.submit_job({"ti": ti})  # type: ignore[typeddict-item]
    finally:
        monkeypatch.undo()
        config.clear_caches()
    assert submitted["team-a"] != submitted["team-b"]
    jobs = {job["metadata"]["airflow_deployment"]: job for job in _jobs_of(job_hook, run_id)}
    assert {tenant: job["submission_id"] for tenant, job in jobs.items()} == submitted
    for submission_id in submitted.values():
        assert _wait_terminal(job_hook, submission_id) == "SUCCEEDED"
