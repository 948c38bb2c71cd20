"""Warm Ray workers on any cluster: the keeper (:mod:`airflow_ray.keeper`) of a non-embedded cluster.

The cluster is a ``ray start --head`` on loopback that airflow-ray did not start (no embedded
keeper), from a virtualenv without airflow-ray (the ``bare_cluster`` fixture): the keeper's driver
runs there from what :mod:`airflow_ray._worker` ships. Each "task process" is a fresh Python
process (``tests/scripts/warm_task.py``) that connects through the ``ray_remote`` connection and
runs one function on Ray through its owner, as a ``@ray_task`` does under the LocalExecutor, and
reports the pid of the Ray worker that ran it. Each case has its own Ray namespace, so its owners,
factory and keeper are its own.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TESTS
from tests.helpers import script_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def remote_env(bare_cluster):
    """The environment of a task process whose ``ray_remote`` connection is a non-embedded cluster."""
    return {
        **os.environ,
        "AIRFLOW_CONN_RAY_REMOTE": json.dumps({"conn_type": "ray", "host": bare_cluster["address"]}),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the cluster listens on loopback only
        "AIRFLOW__RAY__DEPLOYMENT_ID": "warm",
        "PYTHONPATH": str(TESTS.parent),
    }


def _task_process(env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, str(TESTS / "scripts" / "warm_task.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return script_report(proc, "WARM")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow_ray.cli", "cluster", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _keepers(env: dict[str, str]) -> list[dict]:
    proc = _cli(env, "status", "--connection", "ray_remote", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()  # Airflow may log to stdout before the JSON
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))["keepers"]


def test_without_a_factory_each_task_process_starts_a_new_ray_worker(remote_env):
    """The baseline the keeper removes: the owner belongs to the first task process's Ray job,
    which ends with it, so the next task process's function waits for a new worker process."""
    env = {**remote_env, "AIRFLOW__RAY__NAMESPACE": "cold", "AIRFLOW__RAY__KEEPER_ON_FIRST_USE": "False"}
    first, second = _task_process(env), _task_process(env)
    assert first["pid"] != second["pid"]
    assert _keepers(env) == []


def test_prepare_starts_one_keeper_and_task_processes_reuse_its_worker(remote_env):
    """``cluster prepare`` twice starts one keeper; the owners are then created through its
    factory, in its live Ray job, so separate task processes run in one warm Ray worker."""
    env = {**remote_env, "AIRFLOW__RAY__NAMESPACE": "prepared", "AIRFLOW__RAY__KEEPER_ON_FIRST_USE": "False"}
    first = _cli(env, "prepare", "--connection", "ray_remote")
    assert first.returncode == 0 and "started the keeper" in first.stdout, first.stderr[-3000:]
    again = _cli(env, "prepare", "--connection", "ray_remote")
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr[-3000:]
    keepers = {k["name"].split("-v")[0]: k for k in _keepers(env)}
    assert set(keepers) == {"airflow_ray_factory", "airflow_ray_keeper"}
    assert keepers["airflow_ray_keeper"]["ready"] and keepers["airflow_ray_keeper"]["starts"] == 1

    pids = [_task_process(env)["pid"] for _ in range(2)]
    assert len(set(pids)) == 1, pids

    stopped = _cli(env, "prepare", "--connection", "ray_remote", "--stop")
    assert stopped.returncode == 0 and "stopped airflow_ray_keeper-v" in stopped.stdout, stopped.stderr
    assert _keepers(env) == []  # the factory went with its driver


def test_first_use_starts_the_keeper(remote_env):
    """Without ``prepare``: the first task process that needs an owner starts the keeper and waits
    for its factory; later task processes find it and reuse the same Ray worker."""
    env = {**remote_env, "AIRFLOW__RAY__NAMESPACE": "first-use"}
    first, second = _task_process(env), _task_process(env)
    assert first["pid"] == second["pid"]
    assert [k["ready"] for k in _keepers(env) if "starts" in k] == [True]
    print(f"first task process {first['seconds']} s, second {second['seconds']} s")


def test_prepare_with_a_missing_connection_says_how_to_fix_it():
    proc = _cli(dict(os.environ), "prepare", "--connection", "no_such_conn")
    assert proc.returncode != 0
    assert "no Airflow connection 'no_such_conn'" in proc.stderr
    assert "airflow connections add no_such_conn --conn-type ray" in proc.stderr


def test_keeper_reports_why_its_driver_failed(ray_cluster):
    """A driver that dies (here: it raises) is reported with its output, not waited for in silence."""
    import ray
    import ray.cloudpickle as cloudpickle

    from airflow_ray._worker.factory import Keeper
    from airflow_ray.hooks import RayHook

    RayHook().connect()
    keeper = ray.remote(Keeper).options(num_cpus=0).remote(cloudpickle.dumps(functools.partial(exec, "1/0")))
    try:
        problem = ray.get(keeper.ready.remote(60), timeout=90)
        assert problem is not None
        assert "the factory's driver exited with status 1" in problem
        assert "ZeroDivisionError" in problem
    finally:
        ray.get(keeper.stop.remote())
        ray.kill(keeper)
