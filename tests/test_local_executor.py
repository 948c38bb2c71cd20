"""Cross-process hand-off under a real scheduler + LocalExecutor (each task its own process).

``dag.test()`` runs every task in the test process, so it cannot show that objects outlive
the process that produced them. Here the api-server, scheduler and dag-processor run as
real services on loopback, each task instance is its own short-lived process, and the Ray
objects must survive their producers' exit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from tests.conftest import TESTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_services(ray_cluster, tmp_path_factory):
    home = tmp_path_factory.mktemp("local-executor")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(TESTS / "dags" / "cross_process.py", dags / "cross_process.py")
    port = _free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": "local-executor-test-secret",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "PYTHONPATH": str(TESTS.parent),
    }
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    logs = home / "service-logs"
    logs.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "airflow", *cmd],
            env=env,
            stdout=open(logs / f"{cmd[0]}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for cmd in (["api-server", "--port", str(port)], ["scheduler"], ["dag-processor"])
    ]
    try:
        yield {"env": env, "db": home / "airflow.db", "logs": logs}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_objects_outlive_their_producers(airflow_services):
    from airflow_ray.hooks import RayHook
    from airflow_ray.store import get_owner, owner_name

    env, db = airflow_services["env"], airflow_services["db"]
    _wait(
        lambda: _scalar(db, "select count(*) from dag where dag_id='cross_process'"),
        "the DAG to be parsed",
        240,
    )
    _airflow(env, "dags", "trigger", "cross_process", "--run-id", "xp1")
    _wait_for_run(db, "xp1", airflow_services["logs"])
    result = _xcom(db, "xp1", "consume")
    assert result["sum"] == float(2 * np.arange(2_000_000, dtype=np.float64).sum())
    assert result["producer_pid"] != result["consumer_pid"] != os.getpid()  # separate processes
    raw = _xcom(db, "xp1", "produce", key="data")
    assert raw["__airflow_ray__"] == 1 and len(json.dumps(raw)) <= 1024

    RayHook().connect()
    owner = get_owner(owner_name("cross_process", "xp1"))
    held = {e["object_id"] for e in ray.get(owner.entries.remote()) if e["key"][1] == "xp1"}
    assert raw["object_id"] in held, "the owner holds the run's objects after every producer exited"


def test_clear_rerun_and_delete_return_the_object_store_to_baseline(airflow_services, ray_cluster):
    """Object store bytes as the raylet reports them: a re-run replaces, a deleted run is freed."""
    from airflow_ray import cluster

    env, db, logs = airflow_services["env"], airflow_services["db"], airflow_services["logs"]
    _wait(lambda: _scalar(db, "select count(*) from dag where dag_id='cross_process'"), "the DAG", 240)

    def used() -> int:
        return cluster.status(ray_cluster)["object_store_used_bytes"]

    baseline = used()
    run_bytes = 2 * 16_000_000  # produce's array and transform's doubled array
    _airflow(env, "dags", "trigger", "cross_process", "--run-id", "xp2")
    _wait_for_run(db, "xp2", logs)
    first = _xcom(db, "xp2", "produce", key="data")["object_id"]
    after_run = used()
    assert after_run >= baseline + run_bytes

    # Clear 'produce' and its downstream tasks, as the UI's "Clear" does; the scheduler re-runs them.
    _airflow_python(
        env,
        "from airflow.utils.cli import get_db_dag;"
        "dag = get_db_dag(None, 'cross_process');"
        "dag.partial_subset(['produce'], include_downstream=True).clear(run_id='xp2')",
    )
    _wait_for_run(db, "xp2", logs)
    assert _xcom(db, "xp2", "produce", key="data")["object_id"] != first  # a new object
    _wait(lambda: used() <= after_run + run_bytes // 4, "the re-run's old objects to be freed", 30)

    with sqlite3.connect(db, timeout=30) as conn:  # what deleting the run in the UI does
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("delete from dag_run where run_id='xp2'")
    _airflow_ray(env, "gc")
    _wait(lambda: used() <= baseline + run_bytes // 8, "the deleted run's objects to be freed", 30)


# --- helpers -------------------------------------------------------------------------------


def _airflow(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "airflow", *args], env=env, check=True, capture_output=True)


def _airflow_python(env: dict[str, str], code: str) -> None:
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def _airflow_ray(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "airflow_ray.cli", *args], env=env, check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scalar(db: Path, sql: str):
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute(sql).fetchone()
    return row[0] if row else None


def _wait(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(1)


def _wait_for_run(db: Path, run_id: str, logs: Path) -> None:
    def done():
        return _scalar(
            db, f"select state from dag_run where dag_id='cross_process' and run_id='{run_id}'"
        ) in (
            "success",
            "failed",
        )

    _wait(done, f"run {run_id}", 420)
    state = _scalar(db, f"select state from dag_run where run_id='{run_id}'")
    if state != "success":
        with sqlite3.connect(db) as conn:
            tis = conn.execute(f"select task_id, state from task_instance where run_id='{run_id}'").fetchall()
        scheduler_log = (logs / "scheduler.log").read_text()[-3000:]
        pytest.fail(f"run {run_id} ended {state}: {tis}\n{scheduler_log}")


def _xcom(db: Path, run_id: str, task_id: str, key: str = "return_value"):
    value = _scalar(
        db, f"select value from xcom where run_id='{run_id}' and task_id='{task_id}' and key='{key}'"
    )
    return json.loads(value) if isinstance(value, (str, bytes)) else value
