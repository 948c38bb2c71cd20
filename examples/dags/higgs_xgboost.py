"""HIGGS XGBoost on Ray Train, as an Airflow DAG: the notebook's functions with ``@ray_task`` on top.

``examples/notebooks/higgs_xgboost.ipynb`` defines the same four functions with the same bodies (a
test checks it); this file only adds decorators and the ``@dag`` wiring. Run it once, here:

.. code-block:: bash

    python examples/dags/higgs_xgboost.py            # dag.test(): every task in this process
    airflow dags test higgs_xgboost                   # the same, through the CLI

and the last task prints something like::

    Held-out accuracy 0.7479, AUC 0.8267 on 40,000 rows; model: file:///tmp/airflow_ray/.../model.ubj

The DataFrames (tens of MB) go from task to task through Ray's object store (the airflow-ray XCom
backend); the metadata DB only holds small references. Trigger with a config to change the size,
e.g. ``{"n_rows": 1000000}``, or ``{"source": "s3://bucket/HIGGS.csv.gz"}`` for the real data.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pendulum
from airflow.sdk import Param, dag
from higgs_data import DEFAULT_ROWS, FEATURES, LABEL, load_higgs, make_synthetic_higgs
from higgs_training import checkpoint_uri, load_booster, report_every_n_rounds, storage_uri

from airflow_ray import ray_task


# [START higgs_xgboost_tasks]
@ray_task(num_cpus=1)
def load_data(source: str | None = None, n_rows: int = DEFAULT_ROWS, seed: int = 0) -> pd.DataFrame:
    """HIGGS rows: the UCI file at ``source`` (a path or any fsspec URI), else synthetic ones.

    The real data set cannot be downloaded everywhere, so ``source=None`` makes a synthetic set
    with the same columns and a comparable signal (``higgs_data.make_synthetic_higgs``).
    """
    if source:
        return load_higgs(source, n_rows=n_rows)
    return make_synthetic_higgs(n_rows, seed=seed)


@ray_task(num_cpus=1, multiple_outputs=True)
def split(df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Shuffle and split into training and held-out rows, stratified on the label.

    Random and seeded: a head/tail cut would bake any ordering of the file into the test set,
    and the seed makes a rerun (or a retried task) see the same split.
    """
    from sklearn.model_selection import train_test_split

    train_df, test_df = train_test_split(df, test_size=test_fraction, random_state=seed, stratify=df[LABEL])
    return {"train": train_df.reset_index(drop=True), "test": test_df.reset_index(drop=True)}


# This task only drives Ray Train: the training workers need the CPUs, so it asks for none.
@ray_task(num_cpus=0)
def train(
    train_df: pd.DataFrame,
    num_workers: int = 2,
    cpus_per_worker: int = 1,
    num_boost_round: int = 100,
    report_every: int = 0,
    params: dict[str, Any] | None = None,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Train XGBoost data-parallel with Ray Train; return where the model went and its metrics.

    Each of ``num_workers`` workers gets a shard of the rows and xgboost's collective combines
    their histograms, so the model is the one a single process would build. Results are reported
    to Ray Train every ``report_every`` rounds (0: only at the end): each report costs seconds.
    The model is a Ray checkpoint under ``storage_path``; its URI is what this returns.
    """
    import time
    import uuid

    import ray.data
    import ray.train
    import xgboost
    from ray.train.xgboost import XGBoostTrainer

    params = {
        "objective": "binary:logistic",
        "eval_metric": ["logloss", "error"],
        "tree_method": "hist",
        "max_depth": 6,
        "eta": 0.1,
        "nthread": cpus_per_worker,
        **(params or {}),
    }

    def train_loop_per_worker(config: dict[str, Any]) -> None:
        shard = ray.train.get_dataset_shard("train").materialize().to_pandas()
        dtrain = xgboost.DMatrix(shard[FEATURES], label=shard[LABEL])
        xgboost.train(
            config["params"],
            dtrain,
            num_boost_round=config["num_boost_round"],
            evals=[(dtrain, "train")],
            verbose_eval=False,
            callbacks=[report_every_n_rounds(config["every"])],
        )

    # A fresh name per run: Ray Train V2 resumes a run whose name it finds in storage.
    run_name = f"higgs_xgboost_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    trainer = XGBoostTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params, "num_boost_round": num_boost_round, "every": report_every},
        datasets={"train": ray.data.from_pandas(train_df)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path or storage_uri("higgs_xgboost")
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    return {
        "checkpoint_uri": checkpoint_uri(result.checkpoint),
        "train_metrics": {name: float(value) for name, value in result.metrics.items()},
        "train_seconds": round(time.perf_counter() - started, 1),
        "num_boost_round": num_boost_round,
        "params": params,
    }


@ray_task(num_cpus=1)
def evaluate(model: dict[str, Any], test_df: pd.DataFrame) -> dict[str, Any]:
    """Score the trained model on the held-out rows: accuracy, log loss and ROC AUC."""
    import xgboost
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    booster = load_booster(model["checkpoint_uri"])
    proba = booster.predict(xgboost.DMatrix(test_df[FEATURES]))
    y = test_df[LABEL]
    metrics = {
        "accuracy": float(accuracy_score(y, proba > 0.5)),
        "logloss": float(log_loss(y, proba)),
        "auc": float(roc_auc_score(y, proba)),
        "n_test": len(test_df),
        "model_uri": f"{model['checkpoint_uri']}/model.ubj",
    }
    print(
        f"Held-out accuracy {metrics['accuracy']:.4f}, AUC {metrics['auc']:.4f} "
        f"on {len(test_df):,} rows; model: {metrics['model_uri']}"
    )
    return metrics


# [END higgs_xgboost_tasks]


# [START higgs_xgboost_dag]
@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["airflow-ray", "example", "xgboost"],
    # "{{ params.n_rows }}" renders to the int, not the string "200000".
    render_template_as_native_obj=True,
    params={
        "source": Param(None, type=["null", "string"], description="HIGGS.csv.gz path/URI; empty: synthetic"),
        "n_rows": Param(DEFAULT_ROWS, type="integer", minimum=1000),
        "seed": Param(0, type="integer"),
        "test_fraction": Param(0.2, type="number", exclusiveMinimum=0, exclusiveMaximum=1),
        "num_workers": Param(2, type="integer", minimum=1),
        "num_boost_round": Param(100, type="integer", minimum=1),
        "report_every": Param(0, type="integer", minimum=0, description="Report to Ray Train every N rounds"),
    },
)
def higgs_xgboost():
    df = load_data(source="{{ params.source }}", n_rows="{{ params.n_rows }}", seed="{{ params.seed }}")
    data = split(df, test_fraction="{{ params.test_fraction }}", seed="{{ params.seed }}")
    model = train(
        data["train"],
        num_workers="{{ params.num_workers }}",
        num_boost_round="{{ params.num_boost_round }}",
        report_every="{{ params.report_every }}",
    )
    evaluate(model, data["test"])


higgs_xgboost_dag = higgs_xgboost()
# [END higgs_xgboost_dag]

if __name__ == "__main__":
    higgs_xgboost_dag.test()
