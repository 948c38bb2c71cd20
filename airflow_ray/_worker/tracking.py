"""MLflow from Ray workers: log into the run Airflow created for this task try.

:class:`airflow_ray.tracking.MlflowTracking` resolves, in the Airflow task process, to a
:class:`TrackedRun`; the function receives it wherever Ray runs it and logs through it. Everything
here runs on Ray workers (and works in the Airflow process alike): it travels by value with
:mod:`airflow_ray._worker`, imports only the standard library at module level, and MLflow, Ray
Tune and xgboost inside the functions that use them, never Airflow.

MLflow keeps its server and credentials process-wide (credentials in the environment only), and
Ray workers run task after task of any DAG: :func:`mlflow_environment` sets them for one call and
puts back what was there before. The task runner opens it around every call that receives a
:class:`TrackedRun`, so nothing a tracked function leaves behind reaches the worker's next task.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .environment import scoped_environ
from .timeouts import caused_by_timeout

if TYPE_CHECKING:
    import mlflow
    from mlflow import MlflowClient
    from ray.tune import Callback

PARENT_RUN_TAG = "mlflow.parentRunId"  # how MLflow itself marks a nested run
#: MLflow reads its per-request timeout from this environment variable, at every request.
TIMEOUT_VARIABLE = "MLFLOW_HTTP_REQUEST_TIMEOUT"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run of one Airflow task try: everything a Ray worker needs to log into it."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    run_id: str
    tags: Mapping[str, str]
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Seconds one request to the server may take (``[ray] http_timeout_seconds`` where the run
    #: was created); None leaves MLflow's default.
    timeout_s: float | None = None

    @contextlib.contextmanager
    def start(self) -> Iterator[mlflow.ActiveRun]:
        """Make this the active MLflow run of this process (``mlflow.log_*`` go to it).

        Ends it ``FINISHED``, or ``FAILED`` if the block raises; the server's URI, credentials and
        request timeout are set for the block only (:meth:`environment`). A request that timed
        out, in the block or starting the run, gets a note naming the server and the option to raise.
        """
        import mlflow

        try:
            with self.environment(), mlflow.start_run(run_id=self.run_id) as run:
                yield run
        except Exception as exc:
            if caused_by_timeout(exc):
                within = "in time" if self.timeout_s is None else f"within {self.timeout_s:g} s"
                exc.add_note(
                    f"The MLflow tracking server at {self.tracking_uri} did not answer {within}: if "
                    "it is only slow, raise [ray] http_timeout_seconds (env "
                    "AIRFLOW__RAY__HTTP_TIMEOUT_SECONDS) where Airflow runs the task."
                )
            raise

    def environment(self) -> contextlib.AbstractContextManager[None]:
        """MLflow's URI and credentials of this run's server, for a block only (see
        :func:`mlflow_environment`)."""
        return mlflow_environment(self.tracking_uri, mlflow_variables(self.credentials, self.timeout_s))

    def use(self) -> None:
        """Point this process's MLflow at the run's server (URI and credentials).

        MLflow keeps both process-wide, so this lasts until the current call of a ``@ray_task``
        ends (the runner restores the worker's environment then); elsewhere (an Airflow
        process) it lasts as long as the process: prefer ``with tracking.environment():``.
        """
        import mlflow

        os.environ.update(mlflow_variables(self.credentials, self.timeout_s))
        mlflow.set_tracking_uri(self.tracking_uri)

    def client(self) -> MlflowClient:
        """An ``MlflowClient`` of this run's server (for logging without an active run)."""
        from mlflow import MlflowClient

        self.use()
        return MlflowClient(self.tracking_uri)

    def model_uri(self, artifact_path: str = "model") -> str:
        """``runs:/<run_id>/<artifact_path>``: a model logged in this run, for the registry."""
        return f"runs:/{self.run_id}/{artifact_path}"

    def tune_callback(self, save_artifact: bool = False) -> Callback:
        """A Ray Tune callback logging every trial as a run nested under this one.

        Each trial run gets this run's Airflow tags, the trial's config as params and every
        ``tune.report`` as metrics (step: the report's ``training_iteration``).
        """
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        self.use()
        return MLflowLoggerCallback(
            tracking_uri=self.tracking_uri,
            experiment_name=self.experiment,
            tags={**self.tags, PARENT_RUN_TAG: self.run_id},
            save_artifact=save_artifact,
        )


@dataclass(frozen=True)
class Promotion:
    """What :func:`register_if_better` decided, JSON-able for XCom."""

    promoted: bool
    model_name: str
    alias: str
    metric: str
    candidate_score: float
    champion_score: float | None
    champion_version: str | None
    version: str | None  # the registered version: new if promoted, else the champion's

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_if_better(
    tracking: TrackedRun,
    *,
    model_name: str,
    candidate_uri: str,
    score: Callable[[str], float],
    metric: str,
    greater_is_better: bool = True,
    alias: str = "champion",
) -> Promotion:
    """Register ``candidate_uri`` as a new version of ``model_name`` and move ``alias`` to it,
    only if it scores better than the version the alias points to now.

    Both models are scored *now*, by the same ``score(model_uri)`` (e.g. AUC on this run's
    held-out rows): a score the champion got on other data last month is no comparison. The
    scores and the decision are logged to ``tracking``'s run either way (metrics
    ``candidate_<metric>`` / ``champion_<metric>``, tag ``promotion``). Without a champion the
    candidate is promoted. Runs on the Airflow worker or a Ray worker alike.
    """
    from mlflow.exceptions import MlflowException

    with tracking.environment():  # an Airflow process keeps no credentials either
        client = tracking.client()
        try:
            champion = client.get_model_version_by_alias(model_name, alias)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(exc).lower():
                raise
            champion = None
        candidate_score = float(score(candidate_uri))
        champion_score = float(score(f"models:/{model_name}/{champion.version}")) if champion else None
        if math.isnan(candidate_score):
            raise ValueError(f"The candidate {candidate_uri} scored NaN on {metric}")
        better = champion_score is None or (
            candidate_score > champion_score if greater_is_better else candidate_score < champion_score
        )
        version = champion.version if champion else None
        if better:
            version = _register(model_name, candidate_uri, tracking)
            client.set_registered_model_alias(model_name, alias, version)
        decision = Promotion(
            promoted=better,
            model_name=model_name,
            alias=alias,
            metric=metric,
            candidate_score=candidate_score,
            champion_score=champion_score,
            champion_version=champion.version if champion else None,
            version=version,
        )
        metrics = {f"candidate_{metric}": candidate_score}
        if champion_score is not None:
            metrics[f"champion_{metric}"] = champion_score
        for key, value in metrics.items():
            client.log_metric(tracking.run_id, key, value)
        verdict = (
            f"promoted {candidate_uri} to {model_name}@{alias} (version {version})"
            if better
            else f"kept {model_name}@{alias} (version {version})"
        )
        summary = f"{verdict}: candidate {metric}={candidate_score:.6g}, champion {metric}={champion_score}"
        client.set_tag(tracking.run_id, "promotion", summary)
        log.info("%s", summary)
        return decision


@contextlib.contextmanager
def mlflow_environment(tracking_uri: str, variables: Mapping[str, str]) -> Iterator[None]:
    """MLflow's process-wide settings for one block: this server's URI and credentials, then back.

    Sets ``MLFLOW_TRACKING_URI`` and the credential variables (:func:`scoped_environ`: restored
    exactly, absence included, even when threads overlap) and MLflow's own tracking-URI setting (a
    module global that, once set by anyone in the process, wins over the environment variable),
    and puts that setting back as it was on the way out.
    """
    import mlflow

    saved_uri = _mlflow_tracking_uri_setting()
    with scoped_environ({"MLFLOW_TRACKING_URI": tracking_uri, **variables}):
        mlflow.set_tracking_uri(tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]  # None: unset


def mlflow_variables(credentials: Mapping[str, str], timeout_s: float | None) -> dict[str, str]:
    """What MLflow reads from the environment to talk to one server: credentials, request timeout.

    MLflow has no other way to take either; its own retries of a timed-out request
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) are left as the process has them.
    """
    timeout = {} if timeout_s is None else {TIMEOUT_VARIABLE: f"{timeout_s:g}"}
    return {**credentials, **timeout}


def xgboost_callback(every: int = 1) -> Any:
    """An ``xgboost.train`` callback logging the eval metrics to the active run every ``every`` rounds.

    Metric names are xgboost's ``<eval name>-<metric>`` (``valid-auc``), the step is the round.
    """
    import mlflow
    import xgboost

    class LogEvalMetrics(xgboost.callback.TrainingCallback):
        def after_iteration(self, model: xgboost.Booster, epoch: int, evals_log: dict) -> bool:
            if (epoch + 1) % every == 0:
                metrics = {
                    f"{data}-{metric}": float(values[-1])
                    for data, by_metric in evals_log.items()
                    for metric, values in by_metric.items()
                }
                mlflow.log_metrics(metrics, step=epoch + 1)
            return False

    return LogEvalMetrics()


def _mlflow_tracking_uri_setting() -> str | None:
    """What ``mlflow.set_tracking_uri`` set in this process, None if nothing (or no MLflow yet).

    Private MLflow API (``mlflow.tracking._tracking_service.utils._tracking_uri``): the public
    ``mlflow.get_tracking_uri()`` answers with the environment's or the default URI when
    nothing is set, which cannot be set back as "nothing". Checked against MLflow 3.
    """
    if "mlflow" not in sys.modules:
        return None
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri


def _register(name: str, source: str, tracking: TrackedRun) -> str:
    """A new version of ``name`` from ``source`` (``runs:/``, ``models:/``), once it is READY.

    ``mlflow.register_model`` rather than the client: it resolves a ``runs:/`` URI to the
    logged model (MLflow 3 keeps models apart from run artifacts) and waits for READY.
    """
    import mlflow

    tracking.use()
    return str(mlflow.register_model(source, name, tags=dict(tracking.tags)).version)
