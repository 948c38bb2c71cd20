"""RayServeDeployOperator on the session's Ray head (token auth on) with a real MLflow registry.

Real models (xgboost, logged and registered in the test MLflow server), a real Serve application
answering HTTP on a free loopback port, the DAGs run through Airflow's ``dag.test()``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.dags import served, tracked
from tests.s3_server import _free_port

MODEL = "served-model"


@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    """Serve started on a free loopback port, shut down at the end; the cluster stays usable."""
    import ray
    from ray import serve

    from airflow_ray.hooks import RayHook

    RayHook().connect()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    assert (
        ray.get(ray.remote(lambda: "still usable").options(num_cpus=0).remote(), timeout=60) == "still usable"
    )


BROKEN_MODEL = """
import mlflow


class Broken(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        raise RuntimeError("this model version is broken: its weights are missing")

    def predict(self, context, model_input):
        return model_input


mlflow.models.set_model(Broken())
"""


@pytest.fixture(scope="module")
def versions(mlflow_server, tmp_path_factory) -> dict[str, dict]:
    """Three registered versions: 1 a good model, 2 a different (label-flipped) one, 3 one that
    fails to load. ``pip_requirements`` given: MLflow would otherwise spend seconds inferring them."""
    import mlflow
    import numpy as np
    import xgboost

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("serve-tests")
    data = tracked.make_data()
    out = {}
    for name, labels in (("good", data["y_train"]), ("flipped", 1 - data["y_train"])):
        booster = xgboost.train(
            {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
            xgboost.DMatrix(data["x_train"], label=labels),
            num_boost_round=5,
        )
        with mlflow.start_run(run_name=name):
            logged = mlflow.xgboost.log_model(booster, name="model", pip_requirements=["xgboost"])
        version = mlflow.register_model(logged.model_uri, MODEL).version
        predictions = booster.predict(xgboost.DMatrix(np.array(served.SMOKE_ROWS))).tolist()
        out[name] = {"uri": f"models:/{MODEL}/{version}", "predictions": predictions}
    code = tmp_path_factory.mktemp("broken_model") / "broken_model.py"
    code.write_text(BROKEN_MODEL)
    with mlflow.start_run(run_name="broken"):
        logged = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=[])
    out["broken"] = {"uri": f"models:/{MODEL}/{mlflow.register_model(logged.model_uri, MODEL).version}"}
    mlflow.MlflowClient(mlflow_server.uri).set_registered_model_alias(MODEL, "champion", "1")
    return out


@pytest.fixture(autouse=True)
def _tracking_uri(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)


def _deploy(run_dag, serve_url: str, model_uri: str, expected: list | None = None):
    conf = {"model_uri": model_uri, "expected": expected, "serve_url": serve_url}
    return run_dag(served.serve_model_dag, run_conf=conf)


def _post(url: str) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps({"inputs": served.SMOKE_ROWS}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_deploys_the_champion_and_answers_http_with_its_predictions(run_dag, serve_url, versions):
    result = _deploy(run_dag, serve_url, f"models:/{MODEL}@champion")  # expected: the model's own answer
    assert result.state == "success", result.states

    deployed = result.xcom("deploy")
    assert deployed["model_uri"] == versions["good"]["uri"]  # the alias, pinned to its version
    started = time.perf_counter()
    answer = _post(f"{serve_url}/{served.APP}")
    latency_ms = 1000 * (time.perf_counter() - started)
    assert answer["model_uri"] == versions["good"]["uri"]
    assert answer["predictions"] == pytest.approx(versions["good"]["predictions"], rel=1e-5)
    assert latency_ms < 5000

    again = _deploy(run_dag, serve_url, versions["good"]["uri"])  # a retry: nothing to redeploy
    assert again.state == "success", again.states
    assert again.xcom("deploy")["previous_model_uri"] == versions["good"]["uri"]


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        pytest.param("broken", "cannot load", id="model-does-not-load"),
        pytest.param("flipped", "wrong answer", id="smoke-test-answer-wrong"),
    ],
)
def test_failed_deploy_rolls_back_and_previous_version_keeps_serving(
    run_dag, serve_url, versions, version, reason
):
    good = versions["good"]
    assert _deploy(run_dag, serve_url, good["uri"]).state == "success"

    # "flipped" loads and answers, but not what the DAG expects of a correct model.
    result = _deploy(run_dag, serve_url, versions[version]["uri"], expected=good["predictions"])
    assert result.state == "failed", reason
    assert result.states["deploy"] == "failed"

    answer = _post(f"{serve_url}/{served.APP}")
    assert answer["model_uri"] == good["uri"]
    assert answer["predictions"] == pytest.approx(good["predictions"], rel=1e-5)


def test_teardown_removes_the_app_and_is_idempotent(run_dag, serve_url, versions):
    from ray import serve

    assert _deploy(run_dag, serve_url, versions["good"]["uri"]).state == "success"
    for _ in range(2):  # the second run finds nothing to delete
        result = run_dag(served.serve_teardown_dag)
        assert result.state == "success", result.states
        assert served.APP not in serve.status().applications
    with pytest.raises(urllib.error.HTTPError) as error:
        _post(f"{serve_url}/{served.APP}")
    assert error.value.code == 404


RECORDING_MODEL = """
import os

import mlflow


class Recording(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.loaded_with = os.environ.get("MLFLOW_TRACKING_USERNAME")

    def predict(self, context, model_input):
        return [self.loaded_with] * len(model_input)


mlflow.models.set_model(Recording())
"""


def test_replica_has_the_credentials_while_loading_only(serve_url, mlflow_server, tmp_path):
    """The model server's replica loads the model with the MLflow credentials; afterwards its
    environment (where every request runs) holds none of MLflow's variables."""
    import mlflow
    from ray import serve

    from airflow_ray._worker import serving
    from airflow_ray.owners import ship_worker_code

    code = tmp_path / "recording_model.py"
    code.write_text(RECORDING_MODEL)
    with mlflow.start_run(run_name="recording"):
        model_uri = mlflow.pyfunc.log_model(
            name="model", python_model=str(code), pip_requirements=[]
        ).model_uri

    class Probe(serving.MlflowModelServer):
        def environment(self) -> dict[str, str]:
            import os

            return {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")}

        def loaded_with(self) -> list:
            return serving.predict(self.model, {"inputs": [[0]]})

    ship_worker_code()
    credentials = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cret"}
    app = serve.deployment(name="probe", ray_actor_options={"num_cpus": 0.25})(Probe)
    handle = serve.run(
        app.bind(model_uri, mlflow_server.uri, credentials),
        name="secrets-probe",
        route_prefix="/secrets-probe",
    )
    try:
        assert handle.loaded_with.remote().result(timeout_s=60) == ["alice"]
        assert handle.environment.remote().result(timeout_s=60) == {}
    finally:
        serve.delete("secrets-probe")
