"""The HIGGS DAGs run as Airflow DAGs (``dag.test()``) on the embedded Ray, through the Ray XCom.

The DAGs run in one subprocess with its own ``AIRFLOW_HOME``, so Airflow's configuration (XCom
backend, DAGs folder) is read fresh, exactly as ``airflow dags test`` would. The subprocess is
this file itself (see ``__main__`` below): it runs each DAG, then reads the final tasks' return
values back through ``RayXComBackend``, as a downstream plain task would receive them. Its
embedded cluster is the session's Ray head (the same ``[ray] local_cluster_dir``): one Airflow
import, no ``airflow db migrate`` and no second cold Ray start for the four DAGs (CI time).

``dag.test()`` runs every task in one process: it proves the pipeline and the data flow, not
cross-process object lifetime (the core's scheduler tests do that).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "examples" / "dags"
RESULT = "HIGGS_DAG_RESULT="

#: All four DAGs share one subprocess (the first test that asks waits for all of them).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def airflow_env(ray_cluster, tmp_path_factory) -> dict[str, str]:
    """A fresh Airflow home + metadata DB whose embedded Ray is the session's head."""
    from tests.conftest import new_airflow_home  # not at the top: __main__ must not run conftest

    home = new_airflow_home(tmp_path_factory.mktemp("airflow_home"))
    return {
        # Nothing inherited that could point Airflow or Ray elsewhere (e.g. the suite's conftest).
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_"))},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__XCOM_BACKEND": "airflow_ray.xcom.RayXComBackend",
        # The session's embedded cluster (found through its state file, not started anew).
        "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": os.environ["AIRFLOW__RAY__LOCAL_CLUSTER_DIR"],
        # Read by the Ray workers, which inherit the head's environment: the value that every
        # xdist worker shares (conftest's SHARED), whichever of them started the head.
        "AIRFLOW_RAY_EXAMPLES_STORAGE": os.environ["AIRFLOW_RAY_EXAMPLES_STORAGE"],
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture(scope="module")
def dag_runs(airflow_env, mlflow_server) -> dict[str, Any]:
    """Run every DAG of this module once, in one subprocess; results (or failures) by dag_id."""
    from tests.s3_server import _free_port

    mlflow_conf = {"n_rows": 5_000, "num_samples": 2, "max_rounds": 6, "report_every": 2}
    runs = [  # (dag_id, conf, task_ids whose return values the tests read)
        ("example_ray_basics", {}, ["summarize"]),
        ("higgs_xgboost", {"n_rows": 8_000, "num_boost_round": 20}, ["train", "evaluate"]),
        (
            "higgs_tune",
            {"n_rows": 8_000, "num_samples": 4, "max_rounds": 12, "report_every": 3},
            ["tune_xgboost", "score_best_model", "plot_learning_curves"],
        ),
        (
            "higgs_mlflow",
            {**mlflow_conf, "serve_port": _free_port()},
            ["tune", "register", "deploy", "compare_roc"],
        ),
    ]
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(runs)],
        env={**airflow_env, "MLFLOW_TRACKING_URI": mlflow_server.uri},
        capture_output=True,
        text=True,
        timeout=1450,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line.removeprefix(RESULT))
            results[result["dag_id"]] = result
            print(f"{result['dag_id']}: {result['seconds']} s")  # shown with -s or on failure
    output = f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return {"results": results, "output": output}


def _xcom(dag_runs: dict[str, Any], dag_id: str) -> dict[str, Any]:
    result = dag_runs["results"].get(dag_id)
    assert result is not None, f"{dag_id} did not run:\n{dag_runs['output']}"
    assert result.get("error") is None, f"{dag_id} failed: {result['error']}\n{dag_runs['output']}"
    assert result["state"] == "success", result
    return result["xcom"]


def _same_params(trained_with: dict[str, float], config: dict[str, float]) -> bool:
    return set(trained_with) == set(config) and all(
        math.isclose(trained_with[k], config[k], rel_tol=1e-6) for k in config
    )


def test_xgboost_dag_trains_a_useful_model(dag_runs, airflow_env):
    xcom = _xcom(dag_runs, "higgs_xgboost")

    metrics, model = xcom["evaluate"], xcom["train"]
    assert metrics["n_test"] == 1_600
    assert metrics["accuracy"] > 0.65 and metrics["auc"] > 0.70  # chance is ~0.52 / 0.5
    assert model["num_boost_round"] == 20
    storage = airflow_env["AIRFLOW_RAY_EXAMPLES_STORAGE"]
    assert metrics["model_uri"].startswith(storage) and metrics["model_uri"].endswith("/model.ubj")
    assert Path(metrics["model_uri"].removeprefix("file://")).is_file()


def test_tune_dag_trials_get_their_configs_and_best_model_is_loaded(dag_runs, airflow_env):
    xcom = _xcom(dag_runs, "higgs_tune")

    tuned, scored, plot = xcom["tune_xgboost"], xcom["score_best_model"], xcom["plot_learning_curves"]
    assert len(tuned["trials"]) == 4
    for trial in tuned["trials"]:
        assert _same_params(trial["trained_with"], trial["config"]), trial
    assert len({trial["config"]["eta"] for trial in tuned["trials"]}) == 4

    # The downstream task loaded the best trial's model (its booster carries the best config).
    assert _same_params(scored["trained_with"], tuned["best_config"])
    assert scored["rounds"] == tuned["best_metrics"]["rounds"]
    assert scored["accuracy"] > 0.62 and scored["auc"] > 0.68
    assert tuned["best_checkpoint"].startswith(airflow_env["AIRFLOW_RAY_EXAMPLES_STORAGE"])

    assert Path(plot.removeprefix("file://")).read_bytes()[:4] == b"\x89PNG"


def test_mlflow_dag_tunes_registers_deploys_and_plots(dag_runs, mlflow_server):
    """The MLflow example end to end: nested Tune runs, a champion, a smoke-tested Serve app, a PNG."""
    from mlflow import MlflowClient

    xcom = _xcom(dag_runs, "higgs_mlflow")

    tuned, decision, deployed = xcom["tune"], xcom["register"], xcom["deploy"]
    client = MlflowClient(mlflow_server.uri)
    assert decision["promoted"] and decision["candidate_score"] > 0.6  # the first model: no champion yet
    champion = client.get_model_version_by_alias("higgs", "champion")
    assert champion.version == decision["version"]
    assert deployed["model_uri"] == f"models:/higgs/{champion.version}"
    assert len(deployed["predictions"]) == 5 and all(0 < p < 1 for p in deployed["predictions"])

    tune_run = client.get_run(
        client.get_logged_model(tuned["model_uri"].removeprefix("models:/")).source_run_id
    )
    assert tune_run.data.tags["airflow.dag_id"] == "higgs_mlflow"
    trials = client.search_runs(
        [tune_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tune_run.info.run_id}'"
    )
    assert len(trials) == tuned["trials"] == 2

    run_id, path = xcom["compare_roc"].removeprefix("runs:/").split("/", 1)
    png = Path(client.download_artifacts(run_id, path))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_example_ray_basics_mixes_plain_ray_and_mapped_tasks(dag_runs):
    """The README's first example DAG, on the embedded Ray: plain -> mapped Ray -> Ray -> plain."""
    xcom = _xcom(dag_runs, "example_ray_basics")
    stats = xcom["summarize"]
    assert stats["n"] == 4 * 250_000  # every mapped shard's array reached the Ray consumer
    assert abs(stats["mean"]) < 0.01 and abs(stats["std"] - 1) < 0.01


def _main(runs: str) -> None:
    """Subprocess entry point: run each DAG with ``dag.test()``, print its tasks' return values.

    A DAG that raises is reported and the next one still runs. At the end Serve (the MLflow
    DAG's deployment) is shut down: the session's head must be left as the DAGs found it.
    """
    from airflow.dag_processing.dagbag import DagBag

    sys.path.insert(0, str(DAGS))  # as Airflow's CLI and DAG processor do for the DAGs folder
    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    try:
        for dag_id, conf, task_ids in json.loads(runs):
            started = time.monotonic()
            try:
                result = _run_one(bag, dag_id, conf, task_ids)
            except Exception:
                result = {"dag_id": dag_id, "error": traceback.format_exc()[-6000:]}
            result["seconds"] = round(time.monotonic() - started, 1)  # for whoever reads the log
            print(RESULT + json.dumps(result, default=str), flush=True)
    finally:
        import ray

        if ray.is_initialized():
            from ray import serve

            serve.shutdown()


def _run_one(bag: Any, dag_id: str, conf: dict[str, Any], task_ids: list[str]) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_ray.xcom import RayXComBackend

    run = bag.get_dag(dag_id).test(run_conf=conf)
    values = {}
    with create_session() as session:
        for task_id in task_ids:
            row = session.scalars(
                select(XComModel).where(
                    XComModel.dag_id == dag_id,
                    XComModel.run_id == run.run_id,
                    XComModel.task_id == task_id,
                    XComModel.key == "return_value",
                )
            ).one()
            values[task_id] = RayXComBackend.deserialize_value(row)
    return {"dag_id": dag_id, "state": str(run.state), "xcom": values}


if __name__ == "__main__":
    _main(*sys.argv[1:])
