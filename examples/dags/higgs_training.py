"""Training helpers shared by the HIGGS notebook and DAGs (a helper module in the DAG folder).

They keep the notebook/DAG functions down to the data-science steps. The module imports nothing
heavy at the top: DAG files import it, and the scheduler parses DAG files often. Ray, xgboost and
pyarrow are imported inside the functions that need them, on the worker that runs them.

>>> from higgs_training import storage_uri
>>> storage_uri("higgs_xgboost")  # doctest: +SKIP
'file:///tmp/airflow_ray/examples/higgs_xgboost'
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.train
    import xgboost

#: Where the examples put Ray Train/Tune results, models and plots unless told otherwise.
#: Override with ``AIRFLOW_RAY_EXAMPLES_STORAGE`` (a path or any URI Ray accepts: ``file://``,
#: ``s3://``...). On a multi-node cluster use storage every node can read (NFS or a bucket):
#: the best Tune checkpoint is loaded by a later task, maybe on another node.
DEFAULT_STORAGE = "file:///tmp/airflow_ray/examples"

MODEL_FILE = "model.ubj"  # the name Ray's RayTrainReportCallback uses
CONFIG_FILE = "config.json"

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


def _uri(filesystem: pyarrow.fs.FileSystem | None, path: str) -> str:
    if filesystem is None or "://" in path:
        return path
    scheme = {"local": "file", "s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(filesystem.type_name)
    if scheme is None:  # an fsspec filesystem wrapped for pyarrow
        protocol = filesystem.handler.fs.protocol
        scheme = protocol if isinstance(protocol, str) else protocol[0]
    # Quote only what a URI cannot hold: Tune's trial directories are full of "=" and ",".
    return f"{scheme}://{quote(path, safe='/=,:+@~')}"
