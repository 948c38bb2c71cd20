"""Deploy a registered MLflow model as a Ray Serve application, smoke-test it, roll back on failure.

.. code-block:: python

    from airflow_ray.operators import RayServeDeleteOperator, RayServeDeployOperator

    deploy = RayServeDeployOperator(
        task_id="deploy",
        app_name="higgs",
        model_uri="models:/higgs@champion",  # pinned to the alias's version at deploy time
        smoke_request={"dataframe_split": {"columns": FEATURES, "data": rows}},
        expected_predictions=[0.12, 0.93],  # None: the registered model's own answer
    )
    undeploy = RayServeDeleteOperator(task_id="undeploy", app_name="higgs")

The application runs on the cluster :class:`~airflow_ray.hooks.RayHook` connects to; the model
server (:mod:`airflow_ray._worker.serving`) answers MLflow's scoring format on
``http://<http_host>:<http_port>/<app_name>``.

What a run does, and why:

1. Pin ``models:/name@alias`` to ``models:/name/<version>``: the app then says which version
   it serves, and a later alias move does not silently change a running app.
2. Ask the running app (if any) what it serves. Already the same version: no redeploy, only
   the smoke test (so a retry after a success is cheap and harmless).
3. ``serve.run`` the new version and wait until the app is ``RUNNING`` (``startup_timeout``).
4. POST ``smoke_request`` over HTTP, the way clients will, and compare the predictions with
   ``expected_predictions`` (or with the registered model's own answer, computed in a Ray task).
5. Any failure in 3 or 4: redeploy the previous version (or delete the app if there was none),
   then fail the task. A retry starts again from 1, against whatever is serving now.

Serve's HTTP options are cluster-wide and fixed by whoever starts Serve first; this operator
starts it on ``http_host:http_port`` (loopback by default) if it is not running.

Stability: beta.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from airflow_ray import config
from airflow_ray._api import public_api
from airflow_ray.exceptions import service_timeout
from airflow_ray.hooks import RayHook
from airflow_ray.tracking import DEFAULT_CONN_ID, TrackingServer, mlflow_environment, tracking_server

if TYPE_CHECKING:
    from airflow.sdk import Context


@public_api("alpha")
class RayServeDeployOperator(BaseOperator):
    """Deploy ``model_uri`` as the Serve application ``app_name``; smoke-test; roll back on failure.

    :param app_name: Serve application name; also the route prefix unless ``route_prefix`` is set.
    :param model_uri: ``models:/name@alias``, ``models:/name/version`` or any MLflow model URI.
    :param smoke_request: JSON body of the smoke-test request (MLflow scoring format).
    :param expected_predictions: the answer the smoke test expects; ``None``: the registered
        model's own predictions, loaded outside Serve.
    :param rtol: relative tolerance of the comparison (numbers); other values must be equal.
    :param mlflow_conn_id: connection of the MLflow server (else ``MLFLOW_TRACKING_URI``).
    :param ray_conn_id: the ``ray`` connection of the cluster to deploy on.
    :param num_replicas: replicas of the model server.
    :param ray_actor_options: per-replica Ray options, e.g. ``{"num_cpus": 0.5}``.
    :param http_host: where Serve's HTTP proxy listens if this operator starts Serve.
    :param http_port: its port.
    :param serve_url: base URL the smoke test calls; default ``http://<http_host>:<http_port>``.
    :param startup_timeout: seconds the new version has to reach ``RUNNING``.
    """

    template_fields: Sequence[str] = (
        "app_name",
        "model_uri",
        "smoke_request",
        "expected_predictions",
        "http_port",
        "serve_url",
    )

    def __init__(
        self,
        *,
        app_name: str,
        model_uri: str,
        smoke_request: dict[str, Any],
        expected_predictions: list[Any] | None = None,
        rtol: float = 1e-5,
        route_prefix: str | None = None,
        mlflow_conn_id: str = DEFAULT_CONN_ID,
        ray_conn_id: str = RayHook.default_conn_name,
        num_replicas: int = 1,
        ray_actor_options: dict[str, Any] | None = None,
        http_host: str = "127.0.0.1",
        http_port: int = 8000,
        serve_url: str | None = None,
        startup_timeout: float = 300,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app_name = app_name
        self.model_uri = model_uri
        self.smoke_request = smoke_request
        self.expected_predictions = expected_predictions
        self.rtol = rtol
        self.route_prefix = route_prefix or f"/{app_name}"
        self.mlflow_conn_id = mlflow_conn_id
        self.ray_conn_id = ray_conn_id
        self.num_replicas = num_replicas
        self.ray_actor_options = ray_actor_options or {}
        self.http_host = http_host
        self.http_port = http_port
        self.serve_url = serve_url
        self.startup_timeout = startup_timeout

    @cached_property
    def hook(self) -> RayHook:
        return RayHook(self.ray_conn_id)

    @property
    def url(self) -> str:
        base = self.serve_url or f"http://{self.http_host}:{self.http_port}"
        return f"{base.rstrip('/')}{self.route_prefix}"

    def execute(self, context: Context) -> dict[str, Any]:
        from ray import serve

        from airflow_ray.owners import ship_worker_code

        self.hook.connect()
        ship_worker_code()  # Serve replicas may lack airflow-ray: the model server travels by value
        server = tracking_server(self.mlflow_conn_id)
        model_uri = pin_model_uri(self.model_uri, server)
        serve.start(http_options={"host": self.http_host, "port": self.http_port})
        previous = serving_model_uri(self.app_name)
        expected = self._expected(model_uri, server)
        if previous == model_uri:
            self.log.info("%s already serves %s: smoke test only", self.app_name, model_uri)
            predictions = self._smoke_test(expected)
        else:
            self.log.info("Deploying %s as %s (was: %s)", model_uri, self.app_name, previous)
            try:
                self._deploy(model_uri, server)
                predictions = self._smoke_test(expected)
            except Exception as exc:
                self._roll_back(previous, server)
                raise AirflowException(
                    f"Deploying {model_uri} as Serve app '{self.app_name}' failed; "
                    f"{'rolled back to ' + previous if previous else 'app removed'}: {exc}"
                ) from exc
        return {
            "app_name": self.app_name,
            "model_uri": model_uri,
            "previous_model_uri": previous,
            "url": self.url,
            "predictions": predictions,
        }

    # -- private ---------------------------------------------------------------------------

    def _deploy(self, model_uri: str, server: TrackingServer) -> None:
        """``serve.run`` and wait for RUNNING, at most ``startup_timeout`` seconds.

        ``serve.run`` itself waits without a limit (a replica that never gets its resources
        keeps it waiting), so it runs in a thread we stop waiting for; the rollback that follows
        replaces the stuck version, which ends that wait too.
        """
        from ray import serve

        from airflow_ray._worker import serving

        deployment = serve.deployment(
            name="model", num_replicas=self.num_replicas, ray_actor_options=self.ray_actor_options
        )(serving.MlflowModelServer)
        app = deployment.bind(model_uri, server.uri, server.environment)
        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-run")
        try:
            pool.submit(serve.run, app, name=self.app_name, route_prefix=self.route_prefix).result(
                timeout=self.startup_timeout
            )
        except FutureTimeout as exc:
            raise TimeoutError(
                f"Serve app '{self.app_name}' not RUNNING after {self.startup_timeout} s "
                f"(status: {_app_status(self.app_name)})"
            ) from exc
        finally:
            pool.shutdown(wait=False)
        self.log.info("%s RUNNING after %.1f s", self.app_name, time.monotonic() - started)

    def _expected(self, model_uri: str, server: TrackingServer) -> list[Any]:
        if self.expected_predictions is not None:
            return list(self.expected_predictions)
        import ray

        from airflow_ray._worker import serving

        reference = ray.remote(serving.reference_predictions).options(num_cpus=0)
        return ray.get(reference.remote(model_uri, server.uri, server.environment, self.smoke_request))

    def _smoke_test(self, expected: list[Any]) -> list[Any]:
        """POST ``smoke_request`` to the app through Serve's HTTP proxy; compare the answer.

        One request, bounded by ``[ray] http_timeout_seconds``: a proxy that accepts and never
        answers fails the deploy (and rolls it back) instead of holding the task forever.
        """
        timeout = config.http_timeout_seconds()
        started = time.monotonic()
        request = urllib.request.Request(
            self.url,
            data=json.dumps(self.smoke_request).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AirflowException(
                f"Smoke test: {self.url} answered HTTP {exc.code}: {exc.read()[:500]!r}"
            ) from exc
        except (TimeoutError, urllib.error.URLError) as exc:
            # urllib raises a timeout bare while it reads the answer, in a URLError while it sends
            if isinstance(exc, TimeoutError) or isinstance(exc.reason, TimeoutError):
                proxy, option = f"Serve's HTTP proxy at {self.url}", "http_timeout_seconds"
                raise service_timeout(proxy, "the smoke-test request", timeout, option) from exc
            raise AirflowException(
                f"Smoke test: cannot reach {self.url} ({exc.reason}); is Serve's HTTP proxy on "
                f"{self.url}? (Serve keeps the HTTP options of whoever started it first)"
            ) from exc
        predictions = answer.get("predictions")
        if not _close(predictions, expected, self.rtol):
            raise AirflowException(
                f"Smoke test: {self.url} answered {str(predictions)[:300]}, expected {str(expected)[:300]}"
            )
        self.log.info(
            "Smoke test passed: %d predictions from %s in %.0f ms",
            len(predictions),
            self.url,
            1000 * (time.monotonic() - started),
        )
        return predictions

    def _roll_back(self, previous: str | None, server: TrackingServer) -> None:
        from ray import serve

        try:
            if previous is None:
                self.log.warning(
                    "Removing the failed Serve app '%s' (nothing to roll back to)", self.app_name
                )
                serve.delete(self.app_name)
            else:
                self.log.warning("Rolling Serve app '%s' back to %s", self.app_name, previous)
                self._deploy(previous, server)
        except Exception:
            self.log.exception("Rollback of Serve app '%s' failed", self.app_name)


@public_api("alpha")
class RayServeDeleteOperator(BaseOperator):
    """Delete the Serve application ``app_name`` (a no-op if it does not exist): the teardown.

    Serve itself (controller and HTTP proxy) keeps running for other applications.

    :param app_name: the Serve application to delete.
    :param ray_conn_id: the ``ray`` connection of the cluster.
    """

    template_fields: Sequence[str] = ("app_name",)

    def __init__(self, *, app_name: str, ray_conn_id: str = RayHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app_name = app_name
        self.ray_conn_id = ray_conn_id

    def execute(self, context: Context) -> None:
        from ray import serve

        RayHook(self.ray_conn_id).connect()
        if _app_status(self.app_name) is None:
            self.log.info("Serve app '%s' does not exist: nothing to delete", self.app_name)
            return
        serve.delete(self.app_name)
        self.log.info("Deleted Serve app '%s'", self.app_name)


def pin_model_uri(model_uri: str, server: TrackingServer) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>`` (the alias's version now); others as is."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    from mlflow import MlflowClient

    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    with mlflow_environment(server.uri, server.environment), server.bounded(f"looking up {model_uri}"):
        version = MlflowClient(server.uri).get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


def serving_model_uri(app_name: str) -> str | None:
    """The model URI the running app ``app_name`` serves, or None if it is not running."""
    from ray import serve

    if _app_status(app_name) != "RUNNING":
        return None
    return serve.get_app_handle(app_name).describe.remote().result(timeout_s=30)["model_uri"]


def _app_status(app_name: str) -> str | None:
    from ray import serve

    app = serve.status().applications.get(app_name)
    return None if app is None else getattr(app.status, "value", str(app.status))


def _close(actual: Any, expected: list[Any], rtol: float) -> bool:
    if not isinstance(actual, list) or len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected, strict=True):
        if isinstance(e, list):
            if not _close(a, e, rtol):
                return False
        elif isinstance(e, (int, float)) and isinstance(a, (int, float)):
            if not math.isclose(a, e, rel_tol=rtol, abs_tol=rtol):
                return False
        elif a != e:
            return False
    return True
