"""Test DAGs for MLflow tracking: a tracked XGBoost training, a tracked Tune search, and
register-if-better, each logging from a Ray worker into the run Airflow created for it.

The data is tiny and made here (a seeded ``make_classification``), so a run takes seconds.
``params.label_noise`` makes a deliberately worse model: the fraction of training labels flipped.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag

from airflow_ray import ray_task
from airflow_ray.tracking import MlflowTracking, TrackedRun, register_if_better, xgboost_callback

EXPERIMENT = "airflow-ray-tests"
#: Every variable through which MLflow finds its server and credentials.
MLFLOW_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def mlflow_environ() -> dict[str, str]:
    """The MLflow variables set in this process."""
    import os

    return {name: os.environ[name] for name in MLFLOW_VARIABLES if name in os.environ}


def make_data(seed: int = 0) -> dict[str, Any]:
    """Train and held-out rows of a small, learnable binary problem (the same for every run)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=3000, n_features=8, n_informative=5, random_state=seed)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def held_out_auc(model_uri: str) -> float:
    """The score register_if_better compares: ROC AUC of the logged model on the held-out rows."""
    import mlflow.pyfunc
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    data = make_data()
    model = mlflow.pyfunc.load_model(model_uri)
    return float(roc_auc_score(data["y_test"], model.predict(pd.DataFrame(data["x_test"]))))


@dag(
    dag_id="mlflow_tracked",
    schedule=None,
    params={"rounds": 8, "label_noise": 0.0, "model_name": "tests-classifier"},
)
def mlflow_tracked():
    @ray_task(num_cpus=1)
    def train(tracking: TrackedRun, params: dict | None = None) -> dict:
        import mlflow
        import numpy as np
        import xgboost

        data = make_data()
        y_train = data["y_train"].copy()
        flip = np.random.default_rng(1).random(len(y_train)) < params["label_noise"]
        y_train[flip] = 1 - y_train[flip]
        booster_params = {"objective": "binary:logistic", "eval_metric": "auc", "max_depth": 3, "nthread": 1}
        with tracking.start():
            mlflow.log_params({**booster_params, **params})
            booster = xgboost.train(
                booster_params,
                xgboost.DMatrix(data["x_train"], label=y_train),
                num_boost_round=params["rounds"],
                evals=[(xgboost.DMatrix(data["x_test"], label=data["y_test"]), "valid")],
                verbose_eval=False,
                callbacks=[xgboost_callback()],
            )
            mlflow.xgboost.log_model(booster, name="model")
        return {"model_uri": tracking.model_uri("model"), "run_id": tracking.run_id}

    @ray_task(num_cpus=1)
    def register(trained: dict, tracking: TrackedRun, params: dict | None = None) -> dict:
        with tracking.start():
            decision = register_if_better(
                tracking,
                model_name=params["model_name"],
                candidate_uri=trained["model_uri"],
                score=held_out_auc,
                metric="auc",
            )
        return decision.as_dict()

    register(
        train(tracking=MlflowTracking(experiment=EXPERIMENT)),
        tracking=MlflowTracking(experiment=EXPERIMENT),
    )


@dag(dag_id="mlflow_tune", schedule=None)
def mlflow_tune():
    # [START howto_mlflow_tune]
    # Drives Tune only: the trials need the CPUs.
    @ray_task(num_cpus=0)
    def search(tracking: TrackedRun) -> dict:
        from ray import tune

        def trial(config: dict) -> None:
            for step in range(1, 4):
                tune.report({"score": config["x"] * step, "step": step})

        with tracking.start():
            results = tune.Tuner(
                tune.with_resources(trial, {"cpu": 0.5}),
                param_space={"x": tune.grid_search([1.0, 2.0, 3.0])},
                tune_config=tune.TuneConfig(metric="score", mode="max"),
                run_config=tune.RunConfig(callbacks=[tracking.tune_callback()], verbose=0),
            ).fit()
        return {"best_x": results.get_best_result().config["x"], "trials": len(results)}

    search(tracking=MlflowTracking(experiment=EXPERIMENT))
    # [END howto_mlflow_tune]


@dag(dag_id="mlflow_scoped", schedule=None)
def mlflow_scoped():
    """A tracked task that leaves MLflow set up process-wide, then an untracked one after it."""

    @ray_task(num_cpus=1)
    def tracked(tracking: TrackedRun) -> dict:
        import os

        import mlflow

        tracking.use()  # process-wide: the runner must take it back when the call ends
        with tracking.start():
            mlflow.log_param("scoped", True)
        return {"pid": os.getpid(), "during": mlflow_environ()}

    @ray_task(num_cpus=1)
    def later(previous: dict) -> dict:
        import os

        import mlflow

        return {"pid": os.getpid(), "seen": mlflow_environ(), "tracking_uri": mlflow.get_tracking_uri()}

    later(tracked(tracking=MlflowTracking(experiment=EXPERIMENT)))


mlflow_tracked_dag = mlflow_tracked()
mlflow_tune_dag = mlflow_tune()


@dag(dag_id="mlflow_unresponsive", schedule=None)
def mlflow_unresponsive():
    """Logs one metric: run with MLFLOW_TRACKING_URI pointing at a server that never answers."""

    @ray_task(num_cpus=0)
    def log_one(tracking: TrackedRun) -> str:
        import mlflow

        with tracking.start():
            mlflow.log_metric("one", 1.0)
        return tracking.run_id

    log_one(tracking=MlflowTracking(experiment=EXPERIMENT))


mlflow_unresponsive_dag = mlflow_unresponsive()
mlflow_scoped_dag = mlflow_scoped()
