"""``RayHook``: which Ray cluster a task talks to, and a connection to it that fails clearly.

Address resolution, first match wins:

1. the task's ``ray_conn_id`` connection (default ``ray_default``), if it exists;
2. the ``RAY_URL`` environment variable;
3. the ``RAY_ADDRESS`` environment variable;
4. the embedded local cluster (:mod:`airflow_ray.cluster`), started on first use.

Supported addresses: ``ray://host:10001`` (Ray Client; needs the same Ray and Python versions
on both sides and drops the session after ~30 s of disconnection), ``auto`` and ``host:6379``
(the Airflow worker is itself a node of the cluster), and ``anyscale://...`` (passed through to
``ray.init``).

Before ``ray.init`` the hook probes the address with one gRPC call (~50 ms). Ray itself retries
for ~20 s and then reports "Failed to connect to Ray cluster" for every cause; the probe tells
an unreachable address from a rejected token and names where the address came from. A GCS answers
the same call with the Ray and Python versions its head runs, so a version skew fails before
``ray.init`` too; a Ray Client server tells them when the session starts (:mod:`airflow_ray.versions`).

.. code-block:: python

    from airflow_ray.hooks import RayHook

    ok, message = RayHook("ray_default").test_connection()
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_ray import compat, versions
from airflow_ray._api import public_api
from airflow_ray.exceptions import RayConnectionError, RayVersionMismatchError

if TYPE_CHECKING:
    from airflow.sdk import Connection

_connect_lock = threading.Lock()
#: Connections tried through Ray Client when its proxy failed to start the connection's server.
CLIENT_SERVER_ATTEMPTS = 3
#: How Ray Client's proxy reports that the server it forked for a connection did not start:
#: its own message, and psutil's when that server died while the proxy read its command line
#: (``proxier.py``'s ``start_specific_server``; seen in the multi-host topology under load).
CLIENT_SERVER_START_FAILURES = ("Starting Ray client server failed", "psutil.ZombieProcess")


def client_server_did_not_start(message: str) -> bool:
    """Whether a Ray Client connection's error says its server did not start: a lost race, worth
    connecting again (``RayHook`` does; so does the topology's ``doctor`` check)."""
    return any(failure in message for failure in CLIENT_SERVER_START_FAILURES)


_connected: RayTarget | None = None
#: What ``_connected`` was resolved from: (connection id, RAY_URL, RAY_ADDRESS).
_connected_for: tuple[str, str | None, str | None] | None = None


@dataclass(frozen=True)
class RayTarget:
    """A resolved cluster address plus everything needed to connect to it."""

    address: str
    source: str
    namespace: str | None = None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    dashboard_url: str | None = None
    token: str | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold the token

    @property
    def is_client(self) -> bool:
        return self.address.startswith("ray://")

    def describe(self) -> str:
        return f"{self.address} (from {self.source})"


@dataclass(frozen=True)
class DashboardTarget:
    """The Ray dashboard / Jobs API of a cluster (``http(s)://host:8265``) and how to authenticate.

    Ray's dashboard HTTP server takes the cluster token as ``Authorization: Bearer <token>``
    (Ray 2.60, ``ray/_private/authentication/http_token_authentication.py``). ``local_token``
    says the token is the embedded cluster's file, so a trigger can find it again from this
    flag instead of carrying the secret through the metadata DB.
    """

    url: str
    source: str
    local_token: bool = False
    token: str | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@public_api("stable")
class RayHook(BaseHook):
    """Connects the Airflow task process to a Ray cluster as a driver.

    :param ray_conn_id: Airflow connection of type ``ray``. A missing connection is not an
        error: resolution falls through to ``RAY_URL``, ``RAY_ADDRESS`` and the embedded cluster.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id

    @cached_property
    def target(self) -> RayTarget:
        """Resolve the address (see the module docstring) without connecting."""
        conn = self._connection()
        if conn is not None and (conn.host or "").strip():
            return _target_from_connection(conn)
        for var in ("RAY_URL", "RAY_ADDRESS"):
            value = os.environ.get(var, "").strip()
            if value and not value.startswith(("http://", "https://")):
                return RayTarget(
                    address=value,
                    source=f"environment variable {var}",
                    env=_address_env(value, None),
                    namespace=_extra(conn, "namespace"),
                    runtime_env=_json_extra(conn, "runtime_env"),
                    init_kwargs=_json_extra(conn, "init_kwargs"),
                    dashboard_url=_dashboard_from_env(),
                )
        from airflow_ray import cluster

        local = cluster.ensure_running()
        return RayTarget(
            address=local.address,
            source="the embedded local cluster (no connection, RAY_URL or RAY_ADDRESS set)",
            env=dict(cluster.LOCAL_ENV),
            namespace=_extra(conn, "namespace"),
            runtime_env=_json_extra(conn, "runtime_env"),
            init_kwargs=_json_extra(conn, "init_kwargs"),
            dashboard_url=_dashboard_from_env() or local.dashboard_url,
        )

    def connect(self) -> RayTarget:
        """Make this process a driver of the target cluster (idempotent, thread-safe).

        Reuses an existing connection to the same address; a connection this hook did not make
        (the user called ``ray.init(address=...)`` themselves) is reused as is, except a cluster
        Ray started inside this process (``ray.init()`` without an address, or a Ray call made
        before connecting): that is an error, before anything is resolved or started, as the
        task's outputs would vanish with the process. A process resolves a
        connection id once while it stays connected: looking the connection up again costs
        7-40 ms through the Task SDK, paid on every XCom read of a plain task.
        """
        global _connected, _connected_for
        resolved_from = (self.ray_conn_id, os.environ.get("RAY_URL"), os.environ.get("RAY_ADDRESS"))
        if _ray_initialized():
            if compat.cluster_started_in_this_process():
                raise RayConnectionError(
                    "This process already runs a Ray cluster of its own, started by ray.init() "
                    "without an address or by a Ray API (ray.put, ray.data, .remote(), ...) called "
                    "before airflow-ray connected: its objects end with this process, so task outputs "
                    f"cannot be kept there. Connect first: RayHook({self.ray_conn_id!r}).connect() at "
                    "the top of the task, before any other Ray call (or ray.init(address=...) to a "
                    "running cluster)."
                )
            if _connected is not None and _connected_for == resolved_from:
                return _connected
        target = self.target
        compat.apply_env(target.env)  # before Ray is imported, if it is not yet
        import ray

        with _connect_lock:
            if ray.is_initialized() and (_connected is None or _connected.address == target.address):
                return _connected or target
            compat.apply_env(target.env)
            probe(target)  # before dropping a working connection to another cluster
            if ray.is_initialized():
                ray.shutdown()  # we own it: switch clusters (dag.test() runs all tasks in one process)
            from airflow_ray.owners import forget_owners

            forget_owners()  # actor handles of an earlier connection are not valid in this one
            kwargs: dict[str, Any] = {
                "address": target.address,
                "namespace": target.namespace,
                "log_to_driver": False,
                "configure_logging": False,
                **target.init_kwargs,
            }
            try:
                context = self._init(target, kwargs)
            except ConnectionError as exc:
                raise RayConnectionError(
                    f"Could not connect to the Ray cluster at {target.describe()}: {exc}"
                ) from exc
            if target.is_client:
                _check_client_versions(context, target)
            if target.dashboard_url is None and (url := getattr(context, "dashboard_url", None)):
                target = _replace(target, dashboard_url=url if "://" in url else f"http://{url}")
                self.__dict__["target"] = target
            _connected, _connected_for = target, resolved_from
            self.log.info("Connected to Ray at %s", target.describe())
            return target

    def _init(self, target: RayTarget, kwargs: dict[str, Any]) -> Any:
        """``ray.init``; through Ray Client, again after a short random pause when the client
        server's proxy failed to start a server for this connection.

        The proxy forks one server per connection, and when connections arrive together it
        sometimes loses that race (``CLIENT_SERVER_START_FAILURES``): seen whenever two tasks on
        one Airflow host connected at the same moment (tests/test_topology.py); a connection made
        a moment later gets its server.
        """
        import ray

        attempt = 1
        while True:
            try:
                with compat.client_version_check_deferred() if target.is_client else nullcontext():
                    return ray.init(**kwargs)
            except ConnectionError as exc:
                lost_race = target.is_client and client_server_did_not_start(str(exc))
                if not lost_race or attempt == CLIENT_SERVER_ATTEMPTS:
                    raise
            ray.shutdown()  # whatever the failed attempt left
            pause = random.uniform(0.5, 2.0) * attempt
            self.log.warning(
                "Ray Client: the server for this connection did not start (attempt %d of %d); "
                "connecting again in %.1f s",
                attempt,
                CLIENT_SERVER_ATTEMPTS,
                pause,
            )
            time.sleep(pause)
            attempt += 1

    def test_connection(self) -> tuple[bool, str]:
        """Probe the cluster without becoming a driver (used by the UI's Test button)."""
        try:
            target = self.target
            compat.apply_env(target.env)
            probe(target)
        except Exception as exc:
            return False, str(exc)
        return True, f"Ray cluster reachable at {target.describe()}"

    def get_dashboard_url(self) -> str | None:
        """The dashboard / Jobs API URL, or None if the cluster has none we know of."""
        return self.target.dashboard_url

    def get_dashboard(self) -> DashboardTarget:
        """The Jobs API address and token, as Ray's own job CLI finds them, without connecting.

        First match wins: the connection's ``dashboard_url`` extra -> ``RAY_API_SERVER_ADDRESS``
        -> an ``http(s)://`` ``RAY_ADDRESS`` -> the embedded local cluster's dashboard (started
        if needed). A driver address with no dashboard URL beside it is an error that says
        what to set, rather than a guess at port 8265.
        """
        conn = self._connection()
        password = conn.password if conn is not None else None
        if conn is not None and (url := _extra(conn, "dashboard_url")):
            return DashboardTarget(url, f"Airflow connection '{conn.conn_id}'", token=http_token(password))
        if url := _dashboard_from_env():
            return DashboardTarget(url, "the environment", token=http_token(password))
        host = (conn.host or "").strip() if conn is not None else ""
        driver = host or os.environ.get("RAY_URL") or os.environ.get("RAY_ADDRESS")
        if driver:
            raise RayConnectionError(
                f"No Ray dashboard / Jobs API URL is known for the cluster at {driver}: set the "
                f"'dashboard_url' extra of connection '{self.ray_conn_id}' or RAY_API_SERVER_ADDRESS "
                "(e.g. http://head:8265)."
            )
        from airflow_ray import cluster

        local = cluster.ensure_running()
        if local.dashboard_url is None:
            raise RayConnectionError(
                "The embedded local Ray cluster runs without its dashboard, which serves the Jobs API: "
                "set [ray] local_cluster_dashboard = True (AIRFLOW__RAY__LOCAL_CLUSTER_DASHBOARD) and "
                "restart it with `airflow-ray cluster stop`."
            )
        return DashboardTarget(
            local.dashboard_url,
            "the embedded local cluster",
            local_token=True,
            token=http_token(None, local_token=True),
        )

    # -- private ---------------------------------------------------------------------------

    def _connection(self) -> Connection | None:
        try:
            return self.get_connection(self.ray_conn_id)
        except AirflowNotFoundException:
            return None


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def probe(target: RayTarget) -> dict[str, Any] | None:
    """One gRPC call to the cluster: raises a clear error if it is unreachable, rejects us, or
    (a GCS address) runs other Ray/Python versions than this process (:mod:`airflow_ray.versions`).

    :returns: the versions the cluster reported (``ray_version``, ``python_version``), or None
        where it reports none before a session (Ray Client, Anyscale).
    :raises RayAuthenticationError: the token is missing or rejected (the message names the one sent).
    :raises RayVersionMismatchError: the versions differ.
    :raises RayConnectionError: the address is invalid or nothing answers there.
    """
    if target.address.startswith("anyscale://"):
        return None
    address = bootstrap_address(target)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectionError(f"Invalid Ray address {target.describe()}: expected host:port")
    reported = compat.ping(
        address, client=target.is_client, label=target.describe(), token_source=token_source(target)
    )
    if reported is not None:
        versions.check(reported, label=target.describe(), client=False, reported_by="recorded by its head")
    return reported


def bootstrap_address(target: RayTarget) -> str:
    """The ``host:port`` a probe calls: the Ray Client server, or the GCS (``auto`` resolved)."""
    if target.is_client:
        return target.address[len("ray://") :]
    if target.address in ("auto", ""):
        resolved = compat.local_bootstrap_address()
        if resolved is None:
            raise RayConnectionError(
                f"No running Ray cluster found on this machine for {target.describe()}: "
                "start one with `ray start --head`, or configure an address."
            )
        return resolved
    return target.address


def token_source(target: RayTarget) -> str:
    """Which token a connection to ``target`` sends, in words (never the token itself)."""
    if target.token:
        return f"the password of {target.source}"
    if target.env.get("RAY_AUTH_MODE") != "token":
        return "none, RAY_AUTH_MODE is not 'token' for this address"
    if compat.own_env("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN of this process"
    return f"the token file {_token_file()}"


# --- private helpers -----------------------------------------------------------------------


def _check_client_versions(context: Any, target: RayTarget) -> None:
    """Leave a Ray Client session whose server runs other versions (see :mod:`airflow_ray.versions`)."""
    import ray

    reported = {"ray_version": context.ray_version, "python_version": context.python_version}
    try:
        versions.check(
            reported, label=target.describe(), client=True, reported_by="reported by its Ray Client server"
        )
    except RayVersionMismatchError:
        ray.shutdown()
        raise


def _target_from_connection(conn: Connection) -> RayTarget:
    host = (conn.host or "").strip()
    if conn.port and ":" not in host.removeprefix("ray://"):
        host = f"{host}:{conn.port}"
    return RayTarget(
        address=host,
        source=f"Airflow connection '{conn.conn_id}'",
        namespace=_extra(conn, "namespace"),
        runtime_env=_json_extra(conn, "runtime_env"),
        init_kwargs=_json_extra(conn, "init_kwargs"),
        dashboard_url=_extra(conn, "dashboard_url") or _dashboard_from_env(),
        token=conn.password or None,
        env=_address_env(host, conn.password or None),
    )


def _address_env(address: str, token: str | None) -> dict[str, str]:
    """Environment for a driver of ``address``: the token setup, plus the embedded cluster's own
    variables when the address is that cluster (its loopback-only mode needs them on both sides).

    The local token file may only go where it belongs: the embedded cluster (either of its
    addresses), or a cluster this machine is a node of (a GCS ``host:port`` / ``auto`` address,
    whose drivers must run on a node: the node's file is that cluster's token). Never a Ray
    Client or Anyscale address elsewhere.
    """
    from airflow_ray import cluster

    local = None if address.startswith("anyscale://") else cluster.current()
    env = dict(cluster.LOCAL_ENV) if local is not None and local.address == address else {}
    embedded = local is not None and address in (local.address, local.client_address)
    on_a_node = not address.startswith(("ray://", "anyscale://"))
    return {**env, **_token_env(token, token_file=embedded or on_a_node)}


def _token_env(token: str | None, *, token_file: bool) -> dict[str, str]:
    """Environment that makes Ray send a token to one cluster, when we have one for it.

    Read from the process's own environment (:func:`compat.own_env`), never from what an earlier
    connection set: that may be another cluster's token. :func:`compat.apply_env` removes what
    it set for the previous cluster, so a target without a token sends none.
    """
    if token:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    if compat.own_env("RAY_AUTH_MODE"):
        return {}
    if compat.own_env("RAY_AUTH_TOKEN") or (token_file and _token_file().exists()):
        return {"RAY_AUTH_MODE": "token"}
    return {}


def http_token(password: str | None, *, local_token: bool = False) -> str | None:
    """The token to send to a dashboard: the connection's, ``RAY_AUTH_TOKEN``, or the token file.

    ``RAY_AUTH_TOKEN`` is the process's own (set for the Airflow worker), not one a connection
    to another cluster put there. The token file (``RAY_AUTH_TOKEN_PATH``, default
    ``~/.ray/auth_token``) is the embedded cluster's: it is read for that cluster's dashboard
    (``local_token``) and sent to no other.
    """
    if password:
        return password
    if token := compat.own_env("RAY_AUTH_TOKEN"):
        return token
    if local_token:
        try:
            return _token_file().read_text().strip() or None
        except FileNotFoundError:
            return None
    return None


def _token_file() -> Path:
    return Path(compat.own_env("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _extra(conn: Connection | None, key: str) -> Any:
    if conn is None:
        return None
    return conn.extra_dejson.get(key) or None


def _json_extra(conn: Connection | None, key: str) -> dict[str, Any]:
    if conn is None:
        return {}
    value = _extra(conn, key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"Connection '{conn.conn_id}' extra '{key}' is not valid JSON") from exc
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"Connection '{conn.conn_id}' extra '{key}' must be a JSON object")
    return value or {}


def _dashboard_from_env() -> str | None:
    """Ray's job CLI convention: RAY_API_SERVER_ADDRESS, or an http(s) RAY_ADDRESS."""
    if url := os.environ.get("RAY_API_SERVER_ADDRESS"):
        return url
    address = os.environ.get("RAY_ADDRESS", "")
    return address if urlsplit(address).scheme in ("http", "https") else None


def _replace(target: RayTarget, **changes: Any) -> RayTarget:
    from dataclasses import replace

    return replace(target, **changes)
