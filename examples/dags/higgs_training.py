"""Training helpers shared by the HIGGS notebook and DAGs (a helper module in the DAG folder).

They keep the notebook/DAG functions down to the data-science steps. The module imports nothing
heavy at the top (only the column names of ``higgs_data``): DAG files import it, and the scheduler
parses DAG files often. Ray, xgboost and pyarrow are imported inside the functions that need them,
on the worker that runs them.

>>> from higgs_training import storage_uri
>>> storage_uri("higgs_xgboost")  # doctest: +SKIP
'file:///tmp/airflow_ray/examples/higgs_xgboost'
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from higgs_data import FEATURES, LABEL

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.fs
    import ray.train
    import ray.tune
    import xgboost

#: Where the examples put Ray Train/Tune results, models and plots unless told otherwise.
#: Override with ``AIRFLOW_RAY_EXAMPLES_STORAGE`` (a path or any URI Ray accepts: ``file://``,
#: ``s3://``...). On a multi-node cluster use storage every node can read (NFS or a bucket):
#: the best Tune checkpoint is loaded by a later task, maybe on another node.
DEFAULT_STORAGE = "file:///tmp/airflow_ray/examples"

MODEL_FILE = "model.ubj"  # the name Ray's RayTrainReportCallback uses
CONFIG_FILE = "config.json"

#: The metric Tune minimizes (xgboost's log loss on the validation slice of the training rows).
METRIC = "valid-logloss"

#: The booster parameters a Tune trial samples, as xgboost's own config names them.
TUNED_PARAMS = ("max_depth", "min_child_weight", "subsample", "eta")


def storage_uri(*parts: str) -> str:
    """Join ``parts`` under the examples' storage base (``AIRFLOW_RAY_EXAMPLES_STORAGE``)."""
    base = os.environ.get("AIRFLOW_RAY_EXAMPLES_STORAGE", DEFAULT_STORAGE).rstrip("/")
    if "://" not in base:
        base = Path(base).absolute().as_uri()
    return "/".join([base, *parts])


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """A Ray checkpoint as one URI string (``file:///...``, ``s3://...``).

    A string is what belongs in XCom: readable in the UI, and ``ray.train.Checkpoint(uri)`` turns
    it back into a checkpoint on any node that can reach the storage.
    """
    return _uri(checkpoint.filesystem, checkpoint.path)


def load_booster(uri: str) -> xgboost.Booster:
    """Load the model in the checkpoint at ``uri`` (``model.ubj``, as Ray's xgboost callbacks save it).

    A saved model holds the trees but not the training parameters; when the checkpoint also has
    the booster's ``config.json`` (:func:`tune_report` writes one) it is loaded too, so that
    :func:`booster_params` of the loaded model tells what it was trained with.
    """
    import ray.train
    import xgboost

    with ray.train.Checkpoint(uri).as_directory() as directory:
        booster = xgboost.Booster(model_file=os.path.join(directory, MODEL_FILE))
        config = Path(directory, CONFIG_FILE)
        if config.is_file():
            booster.load_config(config.read_text())
    return booster


def booster_params(booster: xgboost.Booster) -> dict[str, float]:
    """The :data:`TUNED_PARAMS` the booster was *actually* trained with, from its own config.

    Read back from xgboost rather than from what we passed in, so that a test (or a person
    reading Tune's results) sees what training used, not what it was asked to use.
    """
    train_param = json.loads(booster.save_config())["learner"]["gradient_booster"]["tree_train_param"]
    return {name: float(train_param[name]) for name in TUNED_PARAMS}


def report_every_n_rounds(frequency: int = 0) -> xgboost.callback.TrainingCallback:
    """Ray Train's xgboost callback, reporting every ``frequency`` rounds instead of every round.

    ``RayTrainReportCallback`` calls ``ray.train.report`` after *every* boosting round (its
    ``frequency`` only controls checkpoints), and each report is a synchronous round trip through
    the Train controller (~2 s on a 2-core machine): a 100-round fit took minutes instead of
    seconds. This one reports with each checkpoint (every ``frequency`` rounds; ``0`` = never)
    and once at the end with the final model, saved as ``model.ubj``.
    """
    from ray.train.xgboost import RayTrainReportCallback

    class ReportEveryNRounds(RayTrainReportCallback):
        def _report_metrics(self, report_dict: dict[str, Any]) -> None:
            """Skip the per-round report; checkpoints and the final model still report."""

    return ReportEveryNRounds(frequency=frequency)


def tune_report(every: int) -> xgboost.callback.TrainingCallback:
    """An xgboost callback for Ray Tune: every ``every`` rounds, report metrics and a checkpoint.

    (Ray's ``TuneReportCheckpointCallback`` reports every round and keeps no training config.)

    Each report carries the latest eval metrics (``valid-logloss``...), ``rounds`` (the time axis
    for ASHA) and :func:`booster_params` read back from the model, so every trial's results prove
    which configuration it really trained with, including trials ASHA stopped early.
    """
    import xgboost
    from ray import tune

    class TuneReport(xgboost.callback.TrainingCallback):
        def after_iteration(self, model: xgboost.Booster, epoch: int, evals_log: dict) -> bool:
            rounds = epoch + 1
            if rounds % every:
                return False
            metrics: dict[str, float] = {
                f"{data}-{metric}": float(values[-1])
                for data, by_metric in evals_log.items()
                for metric, values in by_metric.items()
            }
            metrics |= {"rounds": rounds, **{f"booster_{k}": v for k, v in booster_params(model).items()}}
            with tempfile.TemporaryDirectory() as tmp:
                model.save_model(os.path.join(tmp, MODEL_FILE))
                Path(tmp, CONFIG_FILE).write_text(model.save_config())
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            return False

    return TuneReport()


def tune_search(
    train_df: pd.DataFrame,
    *,
    num_samples: int = 8,
    max_rounds: int = 100,
    report_every: int = 10,
    seed: int = 0,
    storage_path: str | None = None,
    callbacks: Sequence[ray.tune.Callback] = (),
) -> dict[str, Any]:
    """Search max_depth, min_child_weight, subsample and eta with ASHA; return the best trial.

    Runs inside a Ray task (the Tune driver). Trials are plain ``xgboost.train`` on 1 CPU each
    (what Tune + ASHA wants: many small independent runs), validated on a slice of the training
    rows (the test rows stay unseen), reporting every ``report_every`` rounds so that ASHA can
    stop the weak ones early.
    ``callbacks`` are Tune callbacks, e.g. ``TrackedRun.tune_callback()`` for MLflow.
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
            # A trial's process serves the next trial (its imports, xgboost's among them, are
            # done once): trials are seconds long, and a new Ray actor costs ~2 s of CPU.
            reuse_actors=True,
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
            callbacks=list(callbacks),
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


def _uri(filesystem: pyarrow.fs.FileSystem | None, path: str) -> str:
    if filesystem is None or "://" in path:
        return path
    scheme = {"local": "file", "s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(filesystem.type_name)
    if scheme is None:  # an fsspec filesystem wrapped for pyarrow
        protocol = filesystem.handler.fs.protocol
        scheme = protocol if isinstance(protocol, str) else protocol[0]
    # Quote only what a URI cannot hold: Tune's trial directories are full of "=" and ",".
    return f"{scheme}://{quote(path, safe='/=,:+@~')}"
