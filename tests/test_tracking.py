"""MLflow tracking from Ray tasks, against a real ``mlflow server`` and the session's Ray head.

The functions log from Ray worker processes that never saw ``MLFLOW_TRACKING_URI`` (it is set
only in this test process, after the workers started): what reaches them is the TrackedRun.
"""

from __future__ import annotations

import json

import pytest

from airflow_ray.tracking import XCOM_KEY, tracking_server
from tests.dags import tracked


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.uri


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


def _identity(result, task_id: str) -> dict[str, str]:
    return {
        "airflow.dag_id": result.dag_id,
        "airflow.run_id": result.run_id,
        "airflow.task_id": task_id,
        "airflow.try_number": "1",
        "airflow.map_index": "-1",
    }


def test_run_carries_airflow_identity_params_metrics_and_model(run_dag, mlflow_uri, client):
    result = run_dag(tracked.mlflow_tracked_dag, run_conf={"rounds": 6})
    assert result.state == "success", result.states

    run_id = result.xcom(task_id="train", key=XCOM_KEY)
    assert result.xcom("train")["run_id"] == run_id  # the worker logged into the run Airflow made
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {k: v for k, v in run.data.tags.items() if k.startswith("airflow.")} == _identity(result, "train")
    assert run.data.params["rounds"] == "6" and run.data.params["max_depth"] == "3"
    history = client.get_metric_history(run_id, "valid-auc")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # one point per boosting round
    assert history[-1].value > 0.85
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert "model/MLmodel" in artifacts
    # The model loads back from the server and predicts probabilities.
    assert 0.85 < tracked.held_out_auc(f"runs:/{run_id}/model") <= 1.0


def test_register_if_better_promotes_only_better_models(run_dag, mlflow_server, client, monkeypatch):
    # This time through an Airflow connection (generic http type: host + port), not the env var.
    host, port = mlflow_server.uri.removeprefix("http://").split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "http", "host": host, "port": int(port)})
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def register(label_noise: float) -> dict:
        conf = {"rounds": 8, "label_noise": label_noise, "model_name": "registry-test"}
        result = run_dag(tracked.mlflow_tracked_dag, run_conf=conf)
        assert result.state == "success", result.states
        decision = result.xcom("register")
        run = client.get_run(result.xcom(task_id="register", key=XCOM_KEY))
        assert run.data.metrics["candidate_auc"] == pytest.approx(decision["candidate_score"])
        assert run.data.tags["promotion"].startswith("promoted" if decision["promoted"] else "kept")
        return decision

    weak = register(label_noise=0.4)  # no champion yet: promoted whatever its score
    assert weak["promoted"] and weak["champion_version"] is None

    strong = register(label_noise=0.0)
    assert strong["promoted"] and strong["champion_version"] == weak["version"]
    assert strong["candidate_score"] > strong["champion_score"] == pytest.approx(weak["candidate_score"])

    worse = register(label_noise=0.4)
    assert not worse["promoted"]
    assert worse["candidate_score"] < worse["champion_score"] == pytest.approx(strong["candidate_score"])

    champion = client.get_model_version_by_alias("registry-test", "champion")
    assert champion.version == strong["version"] == worse["version"]
    versions = client.search_model_versions("name='registry-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # the worse model was not registered
    assert champion.tags["airflow.task_id"] == "register"


def test_tune_trials_are_nested_runs_under_the_task_run(run_dag, mlflow_uri, client):
    result = run_dag(tracked.mlflow_tune_dag)
    assert result.state == "success", result.states

    parent_id = result.xcom(task_id="search", key=XCOM_KEY)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    trials = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(float(t.data.params["x"]) for t in trials) == [1.0, 2.0, 3.0]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert {k: v for k, v in trial.data.tags.items() if k.startswith("airflow.")} == _identity(
            result, "search"
        )
        history = client.get_metric_history(trial.info.run_id, "score")
        x = float(trial.data.params["x"])
        assert [m.value for m in history] == [x, 2 * x, 3 * x]  # every report, in order


def test_tracking_server_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_TEST",
        json.dumps(
            {
                "conn_type": "http",
                "host": "mlflow.example.com",
                "schema": "https",
                "port": 8443,
                "password": "s3cr3t-token",
            }
        ),
    )
    server = tracking_server("mlflow_test")
    assert server.uri == "https://mlflow.example.com:8443"
    assert server.credentials == {"MLFLOW_TRACKING_TOKEN": "s3cr3t-token"}
    assert "s3cr3t" not in repr(server)
    with pytest.raises(ValueError, match="No MLflow tracking server"):
        tracking_server("mlflow_missing")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    with pytest.raises(ValueError, match="relative path"):
        tracking_server("mlflow_missing")


def test_credentials_are_set_for_the_call_only(run_dag, mlflow_server, monkeypatch):
    """After a tracked @ray_task that set MLflow up process-wide, the next task on the same Ray
    worker finds none of it, and the Airflow task process's environment is as before."""
    host, port = mlflow_server.uri.removeprefix("http://").split(":")
    conn = {"conn_type": "http", "host": host, "port": int(port), "login": "alice", "password": "s3cret"}
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps(conn))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = tracked.mlflow_environ()

    result = run_dag(tracked.mlflow_scoped_dag)

    assert result.state == "success", result.states
    during, after = result.xcom("tracked"), result.xcom("later")
    assert during["during"] == {
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
    }
    assert after["pid"] == during["pid"], "the second task ran on another worker: nothing to check"
    assert after["seen"] == {}
    assert after["tracking_uri"] != mlflow_server.uri  # MLflow's own setting is back too
    assert tracked.mlflow_environ() == before
