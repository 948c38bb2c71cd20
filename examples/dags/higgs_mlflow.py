"""HIGGS with MLflow and Ray Serve: tune, register the best model if it beats the champion, deploy.

.. code-block:: text

    prepare_data ─train─> tune ──> register ──> deploy ──> compare_roc
         └──────test────────────────┴──────────────────────────┘

* ``tune``: Ray Tune + ASHA (:func:`higgs_training.tune_search`); every trial is an MLflow run
  nested under the task's run; the best model is logged there.
* ``register``: the best model becomes a new version of the registered model ``higgs`` with the
  alias ``champion`` only if its held-out AUC beats the current champion's, both scored now on the
  same rows; the decision is logged either way.
* ``deploy``: ``models:/higgs@champion`` as the Ray Serve app ``higgs``, smoke-tested over HTTP
  (rolled back if it fails).
* ``compare_roc``: ROC curves of the new model and the champion it was compared with, as a PNG
  logged to MLflow.

Every run carries the Airflow identity as tags (``airflow.dag_id``, ``airflow.run_id``...).
It needs an MLflow server; a local one (sqlite, artifacts in a local directory)::

    mlflow server --host 127.0.0.1 --port 5000 \\
        --backend-store-uri sqlite:////tmp/airflow_ray/mlflow/mlflow.db \\
        --artifacts-destination /tmp/airflow_ray/mlflow/artifacts
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # or an Airflow connection mlflow_default
    python examples/dags/higgs_mlflow.py                # dag.test(), on the embedded Ray

Then ``curl -d '{"inputs": [[...28 numbers...]]}' http://127.0.0.1:8000/higgs``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pendulum
from airflow.sdk import Param, dag
from higgs_data import DEFAULT_ROWS, FEATURES, LABEL, train_test
from higgs_training import load_booster, tune_search

from airflow_ray import ray_task
from airflow_ray.operators import RayServeDeployOperator
from airflow_ray.tracking import MlflowTracking, TrackedRun, register_if_better

EXPERIMENT = "higgs"
MODEL_NAME = "higgs"
APP = "higgs"
ROC_PNG = "roc_new_vs_champion.png"


# [START higgs_mlflow_tasks]
@ray_task(num_cpus=1, multiple_outputs=True)
def prepare_data(
    source: str | None = None, n_rows: int = DEFAULT_ROWS, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """HIGGS rows (the file at ``source``, else synthetic), split into training and held-out rows."""
    return train_test(source, n_rows=n_rows, seed=seed)


# [START howto_mlflow_tracking]
# Drives Tune only: the trials need the CPUs.
@ray_task(num_cpus=0)
def tune(
    train_df: pd.DataFrame,
    tracking: TrackedRun,
    num_samples: int = 4,
    max_rounds: int = 60,
    report_every: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Search with Tune (each trial a nested MLflow run), then log the best model in this run."""
    import mlflow
    import xgboost

    with tracking.start():
        tuned = tune_search(
            train_df,
            num_samples=num_samples,
            max_rounds=max_rounds,
            report_every=report_every,
            seed=seed,
            callbacks=[tracking.tune_callback()],
        )
        mlflow.log_params(tuned["best_config"])
        mlflow.log_metrics({f"best_{k}": v for k, v in tuned["best_metrics"].items()})
        logged = mlflow.xgboost.log_model(
            load_booster(tuned["best_checkpoint"]),
            name="model",
            # Stated, not inferred: inference re-loads the model in a subprocess (seconds).
            pip_requirements=[f"xgboost=={xgboost.__version__}"],
        )
    return {
        "model_uri": logged.model_uri,
        "best_config": tuned["best_config"],
        "trials": len(tuned["trials"]),
    }


# [END howto_mlflow_tracking]


# [START howto_register_if_better]
@ray_task(num_cpus=1)
def register(tuned: dict[str, Any], test_df: pd.DataFrame, tracking: TrackedRun) -> dict[str, Any]:
    """Promote the tuned model to ``higgs@champion`` if its held-out AUC beats the champion's."""

    def held_out_auc(model_uri: str) -> float:
        import mlflow.pyfunc
        from sklearn.metrics import roc_auc_score

        return float(
            roc_auc_score(test_df[LABEL], mlflow.pyfunc.load_model(model_uri).predict(test_df[FEATURES]))
        )

    with tracking.start():
        decision = register_if_better(
            tracking,
            model_name=MODEL_NAME,
            candidate_uri=tuned["model_uri"],
            score=held_out_auc,
            metric="test_auc",
        )
    rows = test_df[FEATURES].head(5)
    smoke = {"dataframe_split": {"columns": FEATURES, "data": rows.to_numpy().tolist()}}
    return {**decision.as_dict(), "smoke_request": smoke}


# [END howto_register_if_better]


@ray_task(num_cpus=1)
def compare_roc(
    tuned: dict[str, Any], decision: dict[str, Any], test_df: pd.DataFrame, tracking: TrackedRun
) -> str:
    """ROC curves of the new model and of the champion it was compared with; a PNG in MLflow."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt
    import mlflow
    import mlflow.pyfunc
    from sklearn.metrics import RocCurveDisplay

    tracking.use()
    models = {"new model": tuned["model_uri"]}
    if decision["champion_version"]:
        models[f"champion (version {decision['champion_version']})"] = (
            f"models:/{MODEL_NAME}/{decision['champion_version']}"
        )
    fig, ax = plt.subplots(figsize=(6, 6))
    for label, uri in models.items():
        proba = mlflow.pyfunc.load_model(uri).predict(test_df[FEATURES])
        RocCurveDisplay.from_predictions(test_df[LABEL], proba, name=label, ax=ax)
    verdict = "promoted" if decision["promoted"] else "not promoted"
    ax.set_title(f"HIGGS held-out ROC: new model {verdict}")
    with tracking.start():
        mlflow.log_figure(fig, ROC_PNG)
    plt.close(fig)
    return f"runs:/{tracking.run_id}/{ROC_PNG}"


# [END higgs_mlflow_tasks]


# [START higgs_mlflow_dag]
@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["airflow-ray", "example", "xgboost", "mlflow", "serve"],
    render_template_as_native_obj=True,
    params={
        "source": Param(None, type=["null", "string"], description="HIGGS.csv.gz path/URI; empty: synthetic"),
        "n_rows": Param(DEFAULT_ROWS, type="integer", minimum=1000),
        "seed": Param(0, type="integer"),
        "num_samples": Param(4, type="integer", minimum=1, description="Tune trials"),
        "max_rounds": Param(60, type="integer", minimum=1),
        "report_every": Param(10, type="integer", minimum=1),
        "serve_port": Param(
            8000, type="integer", description="Ray Serve HTTP port (if Serve is not running)"
        ),
    },
)
def higgs_mlflow():
    data = prepare_data(source="{{ params.source }}", n_rows="{{ params.n_rows }}", seed="{{ params.seed }}")
    # [START howto_mlflow_tracking_call]
    tuned = tune(
        data["train"],
        tracking=MlflowTracking(experiment=EXPERIMENT),
        num_samples="{{ params.num_samples }}",
        max_rounds="{{ params.max_rounds }}",
        report_every="{{ params.report_every }}",
        seed="{{ params.seed }}",
    )
    # [END howto_mlflow_tracking_call]
    decision = register(tuned, data["test"], tracking=MlflowTracking(experiment=EXPERIMENT))
    # [START howto_serve_deploy]
    deploy = RayServeDeployOperator(
        task_id="deploy",
        app_name=APP,
        model_uri=f"models:/{MODEL_NAME}@champion",
        smoke_request="{{ ti.xcom_pull(task_ids='register')['smoke_request'] }}",
        http_port="{{ params.serve_port }}",
        ray_actor_options={"num_cpus": 0.25},
    )
    # [END howto_serve_deploy]
    (
        decision
        >> deploy
        >> compare_roc(tuned, decision, data["test"], tracking=MlflowTracking(experiment=EXPERIMENT))
    )


higgs_mlflow_dag = higgs_mlflow()
# [END higgs_mlflow_dag]

if __name__ == "__main__":
    higgs_mlflow_dag.test()
