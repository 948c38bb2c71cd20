"""Tune XGBoost on HIGGS with Ray Tune and ASHA, then load the best model downstream.

.. code-block:: text

    prepare_data ──train──> tune_xgboost ──> score_best_model   (held-out accuracy/AUC of the best model)
         └────────test─────────────────────────────┘         └> plot_learning_curves  (PNG artifact)

* Each trial trains with *its own* sampled ``max_depth``, ``min_child_weight``, ``subsample`` and
  ``eta``, and proves it: every report carries the parameters read back from the booster
  (``booster_max_depth``...), and the task returns them next to the sampled config.
* Results live under ``RunConfig(storage_path=...)`` on shared storage (``file://`` by default,
  ``s3://...`` via ``AIRFLOW_RAY_EXAMPLES_STORAGE``), so the best checkpoint can be read by the
  downstream task on whatever node it runs.
* The best config and metrics go to XCom; ``score_best_model`` loads the best checkpoint and
  scores the held-out rows; ``plot_learning_curves`` writes the trials' curves as a PNG.

Run it with ``python examples/dags/higgs_tune.py`` (``dag.test()``) or ``airflow dags test higgs_tune``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pendulum
from airflow.sdk import Param, dag, task
from higgs_data import DEFAULT_ROWS, FEATURES, LABEL, train_test
from higgs_training import METRIC, booster_params, load_booster, tune_search

from airflow_ray import ray_task


# [START higgs_tune_tasks]
@ray_task(num_cpus=1, multiple_outputs=True)
def prepare_data(
    source: str | None = None, n_rows: int = DEFAULT_ROWS, seed: int = 0, test_fraction: float = 0.2
) -> dict[str, pd.DataFrame]:
    """Load HIGGS (the file at ``source``, else synthetic) and split off the held-out test rows."""
    return train_test(source, n_rows=n_rows, seed=seed, test_fraction=test_fraction)


# This task only drives Tune: the trials (1 CPU each) need the CPUs, so it asks for none.
@ray_task(num_cpus=0)
def tune_xgboost(
    train_df: pd.DataFrame,
    num_samples: int = 8,
    max_rounds: int = 100,
    report_every: int = 10,
    seed: int = 0,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Search max_depth, min_child_weight, subsample and eta with ASHA; return the best trial.

    The search itself is :func:`higgs_training.tune_search` (shared with ``higgs_mlflow.py``).
    """
    return tune_search(
        train_df,
        num_samples=num_samples,
        max_rounds=max_rounds,
        report_every=report_every,
        seed=seed,
        storage_path=storage_path,
    )


@ray_task(num_cpus=1)
def score_best_model(tuned: dict[str, Any], test_df: pd.DataFrame) -> dict[str, Any]:
    """Load the best trial's model from its checkpoint and score it on the held-out rows."""
    import xgboost
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    booster = load_booster(tuned["best_checkpoint"])
    proba = booster.predict(xgboost.DMatrix(test_df[FEATURES]))
    y = test_df[LABEL]
    metrics = {
        "accuracy": float(accuracy_score(y, proba > 0.5)),
        "logloss": float(log_loss(y, proba)),
        "auc": float(roc_auc_score(y, proba)),
        "n_test": len(test_df),
        "rounds": booster.num_boosted_rounds(),
        "trained_with": booster_params(booster),
        "model_uri": f"{tuned['best_checkpoint']}/model.ubj",
    }
    print(
        f"Best model on held-out rows: accuracy {metrics['accuracy']:.4f}, AUC {metrics['auc']:.4f} "
        f"({metrics['rounds']} rounds, {metrics['trained_with']}); model: {metrics['model_uri']}"
    )
    return metrics


# A plain Airflow task: it only reads the trials' results from storage and draws.
@task
def plot_learning_curves(tuned: dict[str, Any]) -> str:
    """Draw every trial's validation log loss per boosting round; write a PNG next to the results."""
    import io
    import logging

    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt
    import pyarrow.fs
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(tuned["experiment_uri"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for trial in analysis.trials:
        curve = analysis.trial_dataframes[trial.trial_id]
        is_best = trial.config == tuned["best_config"]
        label = ("best: " if is_best else "") + ", ".join(f"{k}={v:.3g}" for k, v in trial.config.items())
        ax.plot(curve["rounds"], curve[METRIC], marker="o", lw=3 if is_best else 1, label=label)
    ax.set(xlabel="boosting rounds", ylabel=METRIC, title="HIGGS: ASHA trials (stopped ones end early)")
    ax.legend(fontsize=6)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    uri = f"{tuned['experiment_uri']}/learning_curves.png"
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    with filesystem.open_output_stream(path) as out:
        out.write(png.getvalue())
    logging.getLogger(__name__).info("Learning curves of %d trials: %s", len(analysis.trials), uri)
    return uri


# [END higgs_tune_tasks]


# [START higgs_tune_dag]
@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["airflow-ray", "example", "xgboost", "tune"],
    render_template_as_native_obj=True,
    params={
        "source": Param(None, type=["null", "string"], description="HIGGS.csv.gz path/URI; empty: synthetic"),
        "n_rows": Param(DEFAULT_ROWS, type="integer", minimum=1000),
        "seed": Param(0, type="integer"),
        "num_samples": Param(8, type="integer", minimum=1, description="Tune trials"),
        "max_rounds": Param(100, type="integer", minimum=1),
        "report_every": Param(10, type="integer", minimum=1, description="Rounds between reports"),
    },
)
def higgs_tune():
    data = prepare_data(source="{{ params.source }}", n_rows="{{ params.n_rows }}", seed="{{ params.seed }}")
    tuned = tune_xgboost(
        data["train"],
        num_samples="{{ params.num_samples }}",
        max_rounds="{{ params.max_rounds }}",
        report_every="{{ params.report_every }}",
        seed="{{ params.seed }}",
    )
    score_best_model(tuned, data["test"])
    plot_learning_curves(tuned)


higgs_tune_dag = higgs_tune()
# [END higgs_tune_dag]

if __name__ == "__main__":
    higgs_tune_dag.test()
