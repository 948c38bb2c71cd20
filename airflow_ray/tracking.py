"""MLflow tracking for Ray tasks: runs that know which Airflow task instance made them.

Put an :class:`MlflowTracking` among a task's arguments. Airflow resolves it in the task process
while it renders the task's templates: it finds the tracking server (the ``mlflow_default``
connection, else ``MLFLOW_TRACKING_URI``), creates the MLflow run tagged with the task
instance's identity, pushes the run id to XCom (key ``mlflow_run_id``) and hands the function a
:class:`TrackedRun`: a small frozen value with the URI, the run id and the tags, nothing else.
The function, wherever Ray runs it, logs into exactly that run:

.. code-block:: python

    import mlflow
    from airflow_ray import ray_task
    from airflow_ray.tracking import MlflowTracking, TrackedRun


    @ray_task(num_cpus=1)
    def train(df, tracking: TrackedRun) -> str:
        with tracking.start():  # the run Airflow created for this try
            mlflow.log_params({"max_depth": 6})
            booster = ...
            mlflow.log_metric("valid-auc", 0.83, step=10)
            mlflow.xgboost.log_model(booster, name="model")
        return tracking.model_uri("model")


    train(df, tracking=MlflowTracking(experiment="higgs"))

Nothing depends on the Ray worker's working directory, environment or node: a worker on another
machine gets everything it needs in the :class:`TrackedRun` (which is why a file-based
``./mlruns`` URI is refused, and a ``sqlite:`` one only works on one machine).

Tags on every run (and on Tune trial runs): ``airflow.dag_id``, ``airflow.run_id``,
``airflow.task_id``, ``airflow.try_number``, ``airflow.map_index``. A retry is a new run with the
new try number, so a failed try stays visible in MLflow. A try that dies before its function
starts leaves its run ``SCHEDULED``, which is what happened.

Ray Tune: ``tracking.tune_callback()`` logs each trial as a run *nested* under the task's run
(MLflow nests by the ``mlflow.parentRunId`` tag), with the trial's config as params and every
report as metrics. Registry: :func:`register_if_better`.

This module is the Airflow side (the connection, the run's creation). What runs on Ray workers,
:class:`TrackedRun`, :func:`register_if_better` and :func:`xgboost_callback`, lives in
:mod:`airflow_ray._worker.tracking` (re-exported here) and travels to the cluster by value with
the rest of :mod:`airflow_ray._worker`, so the workers need MLflow but not airflow-ray. Neither
imports MLflow or Airflow at module level: they are imported where they are used.

Stability: beta.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from airflow_ray import config
from airflow_ray._worker.timeouts import caused_by_timeout
from airflow_ray._worker.tracking import (
    PARENT_RUN_TAG,
    Promotion,
    TrackedRun,
    mlflow_environment,
    mlflow_variables,
    register_if_better,
    xgboost_callback,
)

if TYPE_CHECKING:
    from airflow.sdk import Connection, Context
    from mlflow import MlflowClient

__all__ = [
    "DEFAULT_CONN_ID",
    "PARENT_RUN_TAG",
    "TAG_PREFIX",
    "XCOM_KEY",
    "MlflowTracking",
    "Promotion",
    "TrackedRun",
    "TrackingServer",
    "airflow_tags",
    "mlflow_environment",
    "register_if_better",
    "tracking_server",
    "xgboost_callback",
]

#: The Airflow connection :class:`MlflowTracking` reads by default (any type with host/port: http).
DEFAULT_CONN_ID = "mlflow_default"
#: XCom key of the MLflow run id of a tracked task.
XCOM_KEY = "mlflow_run_id"
TAG_PREFIX = "airflow."

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlflowTracking:
    """Declares that a task logs to MLflow; Airflow turns it into a :class:`TrackedRun`.

    :param experiment: MLflow experiment name, created on first use.
    :param conn_id: Airflow connection of the tracking server: ``host`` (a URL, or a host name
        with ``schema`` as scheme, default ``http``), ``port``, and optionally ``login`` /
        ``password`` (MLflow basic auth). Missing connection: ``MLFLOW_TRACKING_URI``.
    :param run_name: MLflow run name; default ``<task_id>`` (``<task_id>[<map_index>]`` if mapped).
    :param tags: extra tags for the run.
    :param artifact_location: artifact root of the experiment when this creates it (e.g. for a
        ``sqlite:`` tracking URI, whose default would be ``./mlruns`` of whichever process
        creates it); a server decides this itself.
    """

    experiment: str
    conn_id: str = DEFAULT_CONN_ID
    run_name: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    artifact_location: str | None = None

    def resolve(self, context: Context) -> TrackedRun:
        """Called by Airflow's template rendering, in the task process, once per try."""
        from mlflow import MlflowClient
        from mlflow.entities import RunStatus

        ti = context["ti"]
        map_index = -1 if ti.map_index is None else ti.map_index
        server = tracking_server(self.conn_id)
        identity = airflow_tags(ti.dag_id, ti.run_id, ti.task_id, ti.try_number, map_index)
        operation = f"creating a run in experiment '{self.experiment}'"
        with mlflow_environment(server.uri, server.environment), server.bounded(operation):
            client = MlflowClient(server.uri)
            experiment_id = _experiment_id(client, self.experiment, self.artifact_location)
            default_name = ti.task_id if map_index < 0 else f"{ti.task_id}[{map_index}]"
            run = client.create_run(
                experiment_id,
                run_name=self.run_name or default_name,
                tags={**identity, **self.tags},
            )
            client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.SCHEDULED))
        ti.xcom_push(key=XCOM_KEY, value=run.info.run_id)
        log.info("MLflow run %s in experiment '%s' at %s", run.info.run_id, self.experiment, server.uri)
        return TrackedRun(
            tracking_uri=server.uri,
            experiment=self.experiment,
            experiment_id=experiment_id,
            run_id=run.info.run_id,
            tags=identity,
            credentials=server.credentials,
            timeout_s=server.timeout_s,
        )


@dataclass(frozen=True)
class TrackingServer:
    """Where MLflow is, resolved in the Airflow process from a connection or the environment."""

    uri: str
    source: str
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Seconds one request may take: ``[ray] http_timeout_seconds`` when the server was resolved.
    timeout_s: float = field(default_factory=config.http_timeout_seconds)

    @property
    def environment(self) -> dict[str, str]:
        """What MLflow reads from the environment for this server: credentials, request timeout."""
        return mlflow_variables(self.credentials, self.timeout_s)

    @contextlib.contextmanager
    def bounded(self, operation: str) -> Iterator[None]:
        """Turn MLflow's error for a request that timed out into one naming the server, the
        operation and the option that bounds it (MLflow's own names only the URL)."""
        from airflow_ray.exceptions import service_timeout

        try:
            yield
        except Exception as exc:
            if not caused_by_timeout(exc):
                raise
            raise service_timeout(
                f"The MLflow tracking server at {self.uri} (from {self.source})",
                operation,
                self.timeout_s,
                "http_timeout_seconds",
            ) from exc


def tracking_server(conn_id: str = DEFAULT_CONN_ID) -> TrackingServer:
    """The tracking server: the connection ``conn_id`` if it exists, else ``MLFLOW_TRACKING_URI``.

    Refuses a URI that only means something on this machine's working directory (a relative
    path, MLflow's ``./mlruns`` default), since Ray workers run elsewhere.
    """
    conn = _connection(conn_id)
    if conn is not None and (conn.host or "").strip():
        server = TrackingServer(
            uri=_uri_from_connection(conn),
            source=f"Airflow connection '{conn_id}'",
            credentials=_credentials(conn.login, conn.password),
        )
    elif uri := os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        server = TrackingServer(uri=uri, source="environment variable MLFLOW_TRACKING_URI")
    else:
        raise ValueError(
            f"No MLflow tracking server: create the Airflow connection '{conn_id}' (host "
            "http://mlflow.example.com, port 5000) or set MLFLOW_TRACKING_URI for the Airflow worker."
        )
    scheme = urlsplit(server.uri).scheme
    if not scheme or (scheme == "file" and not urlsplit(server.uri).path.startswith("/")):
        raise ValueError(
            f"MLflow tracking URI {server.uri!r} (from {server.source}) is a relative path: Ray "
            "workers on other nodes cannot reach it. Use a tracking server (http://...)."
        )
    return server


def airflow_tags(dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int) -> dict[str, str]:
    """The MLflow tags naming an Airflow task instance try (search runs by them)."""
    values = {
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "try_number": try_number,
        "map_index": map_index,
    }
    return {f"{TAG_PREFIX}{name}": str(value) for name, value in values.items()}


# --- private helpers -----------------------------------------------------------------------


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # another task created it in the meantime
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _connection(conn_id: str) -> Connection | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _uri_from_connection(conn: Connection) -> str:
    host = (conn.host or "").strip().rstrip("/")
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}"
    parts = urlsplit(host)
    if conn.port and parts.port is None and parts.scheme in ("http", "https"):
        host = parts._replace(netloc=f"{parts.netloc}:{conn.port}").geturl()
    return host


def _credentials(login: str | None, password: str | None) -> dict[str, str]:
    """MLflow's own variables for basic auth (or a bearer token when only a password is set)."""
    if login and password:
        return {"MLFLOW_TRACKING_USERNAME": login, "MLFLOW_TRACKING_PASSWORD": password}
    if password:
        return {"MLFLOW_TRACKING_TOKEN": password}
    return {}
