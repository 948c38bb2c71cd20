"""The HIGGS DAGs run as Airflow DAGs (``dag.test()``) on the embedded Ray, through the Ray XCom.

Each DAG runs in a subprocess with its own ``AIRFLOW_HOME``, so Airflow's configuration (XCom
backend, DAGs folder) is read fresh, exactly as ``airflow dags test`` would. The subprocess is
this file itself (see ``__main__`` below): it runs the DAG, then reads the final tasks' return
values back through ``RayXComBackend``, as a downstream plain task would receive them.

``dag.test()`` runs every task in one process: it proves the pipeline and the data flow, not
cross-process object lifetime (the core's scheduler tests do that).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "examples" / "dags"
RESULT = "HIGGS_DAG_RESULT="

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """A fresh Airflow home + metadata DB, and an embedded 2-CPU Ray that is stopped afterwards."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        # Nothing inherited that could point Airflow or Ray elsewhere (e.g. the suite's conftest).
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_"))},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__XCOM_BACKEND": "airflow_ray.xcom.RayXComBackend",
        "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": str(home / "ray"),
        "AIRFLOW__RAY__LOCAL_CLUSTER_NUM_CPUS": "2",
        "AIRFLOW__RAY__LOCAL_CLUSTER_OBJECT_STORE_BYTES": str(500 * 1024**2),
        "AIRFLOW_RAY_EXAMPLES_STORAGE": (home / "storage").as_uri(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    yield env
    subprocess.run(
        [sys.executable, "-c", "from airflow_ray import cluster; cluster.stop()"],
        env=env,
        capture_output=True,
    )


def _run_dag(env: dict[str, str], dag_id: str, conf: dict[str, Any], *task_ids: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, dag_id, json.dumps(conf), *task_ids],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0 and lines, f"{dag_id} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1].removeprefix(RESULT))
    assert result["state"] == "success", result
    return result["xcom"]


def _same_params(trained_with: dict[str, float], config: dict[str, float]) -> bool:
    return set(trained_with) == set(config) and all(
        math.isclose(trained_with[k], config[k], rel_tol=1e-6) for k in config
    )


def test_xgboost_dag_trains_a_useful_model(airflow_env):
    xcom = _run_dag(
        airflow_env, "higgs_xgboost", {"n_rows": 8_000, "num_boost_round": 20}, "train", "evaluate"
    )

    metrics, model = xcom["evaluate"], xcom["train"]
    assert metrics["n_test"] == 1_600
    assert metrics["accuracy"] > 0.65 and metrics["auc"] > 0.70  # chance is ~0.52 / 0.5
    assert model["num_boost_round"] == 20
    storage = airflow_env["AIRFLOW_RAY_EXAMPLES_STORAGE"]
    assert metrics["model_uri"].startswith(storage) and metrics["model_uri"].endswith("/model.ubj")
    assert Path(metrics["model_uri"].removeprefix("file://")).is_file()


def test_tune_dag_trials_get_their_configs_and_best_model_is_loaded(airflow_env):
    conf = {"n_rows": 8_000, "num_samples": 4, "max_rounds": 12, "report_every": 3}
    xcom = _run_dag(
        airflow_env, "higgs_tune", conf, "tune_xgboost", "score_best_model", "plot_learning_curves"
    )

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


def test_mlflow_dag_tunes_registers_deploys_and_plots(airflow_env, mlflow_server):
    """The MLflow example end to end: nested Tune runs, a champion, a smoke-tested Serve app, a PNG."""
    from mlflow import MlflowClient

    from tests.s3_server import _free_port

    env = {**airflow_env, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    conf = {"n_rows": 5_000, "num_samples": 2, "max_rounds": 6, "report_every": 2, "serve_port": _free_port()}
    xcom = _run_dag(env, "higgs_mlflow", conf, "tune", "register", "deploy", "compare_roc")

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


def test_example_ray_basics_mixes_plain_ray_and_mapped_tasks(airflow_env):
    """The README's first example DAG, on the embedded Ray: plain -> mapped Ray -> Ray -> plain."""
    xcom = _run_dag(airflow_env, "example_ray_basics", {}, "summarize")
    stats = xcom["summarize"]
    assert stats["n"] == 4 * 250_000  # every mapped shard's array reached the Ray consumer
    assert abs(stats["mean"]) < 0.01 and abs(stats["std"] - 1) < 0.01


def _main(dag_id: str, conf: str, *task_ids: str) -> None:
    """Subprocess entry point: run the DAG with ``dag.test()``, print the tasks' return values."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_ray.xcom import RayXComBackend

    sys.path.insert(0, str(DAGS))  # as Airflow's CLI and DAG processor do for the DAGs folder
    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    run = bag.get_dag(dag_id).test(run_conf=json.loads(conf))
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
    print(RESULT + json.dumps({"state": str(run.state), "xcom": values}, default=str), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])
