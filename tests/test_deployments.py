"""Deployments sharing one Ray cluster, and references read back from the XCom table.

Two Airflow deployments (two ``AIRFLOW_HOME``s, two metadata DBs) run the same DAG id, run id
and task ids with different data on the session's Ray head: each one's consumers, re-runs and
``gc`` see only its own outputs (issue 13, item 1). A reference that was edited after the
producing task wrote it is refused before anything touches Ray or storage (item 2).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import TESTS, new_airflow_home
from tests.dags import deployments
from tests.helpers import script_report


def _deployment(home, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(TESTS / "scripts" / "deployment.py"), *args],
        env={**os.environ, "AIRFLOW_HOME": str(home), "PYTHONPATH": str(TESTS.parent)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=home,  # Ray puts the driver's working directory on its workers' sys.path
    )
    return script_report(proc, "DEPLOYMENT")


def _rerun_consumer(home, run_id: str) -> str:
    """``airflow tasks test`` of the plain consumer, as an operator re-runs one task by hand."""
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "tasks", "test", "shared_ids", "consume", run_id],
        env={**os.environ, "AIRFLOW_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=home,
    )
    consumed = [line for line in (proc.stdout + proc.stderr).splitlines() if "CONSUMED=" in line]
    assert proc.returncode == 0 and consumed, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return consumed[-1].split("CONSUMED=")[1].strip()


@pytest.mark.slow
def test_two_deployments_on_one_cluster_never_see_each_others_outputs(ray_cluster, tmp_path):
    homes = {value: new_airflow_home(tmp_path / f"deployment-{value}") for value in (1, 2)}
    # The second deployment then runs gc: its XCom rows refer to none of the first one's objects.
    runs = {1: _deployment(homes[1], "1"), 2: _deployment(homes[2], "2", "gc")}

    assert runs[1]["deployment"] != runs[2]["deployment"]
    assert runs[1]["run_id"] == runs[2]["run_id"]  # same DAG, run and task ids
    assert runs[1]["owner"] != runs[2]["owner"]
    for value, run in runs.items():
        assert set(run["states"].values()) == {"success"}, run["states"]
        assert run["consume"] == run["consume_on_ray"] == [value, value * 10]

    # gc in the second deployment saw its own outputs (all still referenced) and none of the first
    # one's; then a re-run of the first deployment's consumer, after the second one ran and
    # collected: its own data (one re-run proves both: CI time).
    assert runs[2]["gc"]["freed"] == 0 and runs[2]["gc"]["kept"] >= 1, runs[2]["gc"]
    assert _rerun_consumer(homes[1], runs[1]["run_id"]) == "1,10"
    assert _rerun_consumer(homes[2], runs[2]["run_id"]) == "2,20"


def test_an_edited_reference_is_refused_by_every_consumer(run_dag, capfd):
    result = run_dag(deployments.forged_reference_dag)
    text = "".join(capfd.readouterr())

    assert result.states["produce"] == result.states["forge"] == "success"
    assert result.states["consume"] == result.states["consume_on_ray"] == "failed"
    refusal = (
        "The XCom value that refers to the output of task 'produce' of DAG 'some_other_dag'"
        f", run '{result.run_id}', key 'return_value' does not carry a valid signature"
    )
    assert text.count(refusal) >= 2, text[-5000:]  # both consumers, before touching Ray or storage


def test_deployment_command_creates_the_identity_once(tmp_path):
    home = new_airflow_home(tmp_path / "new-deployment")
    twice = "from airflow_ray.cli import main; main(['deployment']); main(['deployment'])"
    proc = subprocess.run(
        [sys.executable, "-c", twice],
        env={**os.environ, "AIRFLOW_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("deployment id: ")]
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    first, second = lines
    assert first.endswith("airflow_ray_deployment_secret: created)")
    assert second.endswith("airflow_ray_deployment_secret: set)")
    assert first.split()[2] == second.split()[2]  # the same id


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"AIRFLOW__RAY__DEPLOYMENT_ID": "Prod Team"},
            "[ray] deployment_id is 'Prod Team': a deployment id is 1-40 characters",
            id="bad-deployment-id",
        ),
        pytest.param(
            {"AIRFLOW_VAR_AIRFLOW_RAY_DEPLOYMENT_SECRET": "not-hex"},
            "The Airflow Variable airflow_ray_deployment_secret must hold 64 hex characters",
            id="bad-secret",
        ),
    ],
)
def test_a_bad_identity_is_a_clear_error(monkeypatch, env, message):
    from airflow_ray import config, deployment

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config.clear_caches()
    try:
        with pytest.raises(ValueError) as error:
            deployment.current()
        assert message in str(error.value)
    finally:
        monkeypatch.undo()
        config.clear_caches()


def test_a_configured_deployment_id_names_the_owners(monkeypatch):
    from airflow_ray import config, owners

    monkeypatch.setenv("AIRFLOW__RAY__DEPLOYMENT_ID", "staging-2")
    config.clear_caches()
    try:
        names = owners.owner_names()
        assert [owners.parse_owner_name(name).deployment for name in names] == ["staging-2"] * len(names)
    finally:
        monkeypatch.undo()
        config.clear_caches()
