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
from higgs_data import DEFAULT_ROWS, FEATURES, LABEL, load_higgs, make_synthetic_higgs
from higgs_training import (
    TUNED_PARAMS,
    booster_params,
    checkpoint_uri,
    load_booster,
    storage_uri,
    tune_report,
)

from airflow_ray import ray_task

METRIC = "valid-logloss"


# [START higgs_tune_tasks]
@ray_task(num_cpus=1, multiple_outputs=True)
def prepare_data(
    source: str | None = None, n_rows: int = DEFAULT_ROWS, seed: int = 0, test_fraction: float = 0.2
) -> dict[str, pd.DataFrame]:
    """Load HIGGS (the file at ``source``, else synthetic) and split off the held-out test rows."""
    from sklearn.model_selection import train_test_split

    df = load_higgs(source, n_rows=n_rows) if source else make_synthetic_higgs(n_rows, seed=seed)
    train_df, test_df = train_test_split(df, test_size=test_fraction, random_state=seed, stratify=df[LABEL])
    return {"train": train_df.reset_index(drop=True), "test": test_df.reset_index(drop=True)}


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

    Trials are plain ``xgboost.train`` on 1 CPU each (what Tune + ASHA wants: many small
    independent runs), validated on a slice of the training rows (the test rows stay unseen),
    reporting every ``report_every`` rounds so that ASHA can stop the weak ones early.
    """
    import time
    import uuid

    import xgboost
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator
    from sklearn.model_selection import train_test_split

    fit_df, valid_df = train_test_split(train_df, test_size=0.2, random_state=seed, stratify=train_df[LABEL])

    def trial(config: dict[str, Any], fit_df: pd.DataFrame, valid_df: pd.DataFrame) -> None:
        # The sampled config goes into the booster's params: that is the whole point of a trial.
        params = {
            "objective": "binary:logistic",
            "eval_metric": ["logloss", "error"],
            "tree_method": "hist",
            "nthread": 1,
            **config,
        }
        xgboost.train(
            params,
            xgboost.DMatrix(fit_df[FEATURES], label=fit_df[LABEL]),
            num_boost_round=max_rounds,
            evals=[(xgboost.DMatrix(valid_df[FEATURES], label=valid_df[LABEL]), "valid")],
            verbose_eval=False,
            callbacks=[tune_report(every=report_every)],
        )

    search_space = {
        "max_depth": tune.randint(2, 10),
        "min_child_weight": tune.loguniform(1, 100),
        "subsample": tune.uniform(0.5, 1.0),
        "eta": tune.loguniform(0.01, 0.5),
    }
    run_name = f"higgs_tune_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    storage = storage_path or storage_uri("higgs_tune")
    tuner = tune.Tuner(
        # with_parameters puts the frames in the object store once, not into every trial's config.
        tune.with_resources(tune.with_parameters(trial, fit_df=fit_df, valid_df=valid_df), {"cpu": 1}),
        param_space=search_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=seed),
            # Rungs in boosting rounds: a trial must be among the best third at 2, 6, 18... reports.
            scheduler=ASHAScheduler(
                time_attr="rounds", max_t=max_rounds, grace_period=2 * report_every, reduction_factor=3
            ),
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage,
            verbose=1,  # one status line per update, not a table per trial
            # Keep every checkpoint (small files): the best one may not be a trial's last.
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_score_attribute=METRIC, checkpoint_score_order="min"
            ),
        ),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} of {len(results)} Tune trials failed: {results.errors[0]}")

    best = results.get_best_result(scope="all")  # the best report of any trial, not just its last
    best_checkpoint, best_metrics = min(best.best_checkpoints, key=lambda pair: pair[1][METRIC])
    trials = [
        {
            "config": result.config,
            "trained_with": {name: result.metrics[f"booster_{name}"] for name in TUNED_PARAMS},
            "rounds": result.metrics["rounds"],
            METRIC: result.metrics[METRIC],
        }
        for result in results
    ]
    print(f"Best of {len(trials)} trials: {METRIC} {best_metrics[METRIC]:.4f} with {best.config}")
    return {
        "best_config": best.config,
        "best_metrics": {name: best_metrics[name] for name in (METRIC, "valid-error", "rounds")},
        "best_checkpoint": checkpoint_uri(best_checkpoint),
        "experiment_uri": f"{storage}/{run_name}",
        "trials": trials,
    }


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
