"""The one place where airflow-ray reaches into Ray's private APIs.

Ray keeps no promise about ``ray._private``, ``ray._raylet``, ``ray.core.generated`` or the
underscore attributes of its objects: any minor release may rename or remove them. Every such
use is a small function here, whose docstring names the private API, why no public one does the
job, and the Ray version it was checked against. ``pyproject.toml`` bounds Ray to that minor
version; ``tests/test_structure.py::test_private_ray_names_in_use`` lists the private names this
module uses (the checklist for a Ray upgrade) and fails if any other module uses one.

.. code-block:: python

    from airflow_ray import compat

    compat.ping("127.0.0.1:6379", client=False, label="the head")  # RayConnectionError if down
    compat.cluster_status("127.0.0.1:6379")["nodes"]  # 1

Ray (and Airflow, through our exceptions) is imported inside the functions: importing this module
stays cheap, so the embedded cluster's CLI does not pay for Airflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

#: The Ray minor version every function below was checked against (see ``pyproject.toml``).
CHECKED_RAY_VERSION = "2.60"
_PING_TIMEOUT_S = 5.0
#: Variables :func:`apply_env` set: their value before, and the value it set.
_applied: dict[str, tuple[str | None, str]] = {}


def apply_env(env: dict[str, str]) -> None:
    """Set Ray's auth/network environment variables for one cluster, and make Ray re-read them.

    ``env`` replaces what the previous call set, it does not add to it: a variable that call set
    and this one does not name goes back to the process's own value (or away). A process that
    connected to cluster A with A's token and now targets B, whose connection has none, must
    not keep sending A's token (``dag.test()`` runs every task in one process; a task may use
    two connections). Variables changed by someone else since are theirs and left alone.

    Private APIs: ``ray._raylet.Config.initialize``, ``ray._raylet.AuthenticationTokenLoader``
    (``.instance().reset_cache()``) and ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``.
    Ray reads ``RAY_AUTH_MODE``, the token and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it
    is imported; a process that imported Ray before we chose a cluster (a scheduler-preloaded task
    process, ``dag.test()`` switching clusters) would otherwise keep sending no token, or resolve
    "localhost" to the machine's external IP. Ray has no public way to reload them.
    Checked against Ray 2.60.
    """
    wanted: dict[str, str | None] = {name: own_env(name) for name in _applied} | dict(env)
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    for name, value in wanted.items():
        before = own_env(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        _applied.pop(name, None)
        if name in env:
            _applied[name] = (before, env[name])
    if "ray" not in sys.modules:
        return  # Ray reads the variables when it is imported
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in wanted:  # read once, at import time
        value = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        default = sys.platform not in ("win32", "darwin")  # Ray's own default
        ray_constants.ENABLE_RAY_CLUSTER = default if value is None else value != "0"
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def own_env(name: str) -> str | None:
    """The process's own value of ``name``: what it was before :func:`apply_env` set it for a cluster.

    What a token lookup must read: the value in ``os.environ`` may be another cluster's token.
    No Ray API: it reads the bookkeeping of :func:`apply_env`. Checked against Ray 2.60.
    """
    value = os.environ.get(name)
    if name in _applied and value == _applied[name][1]:
        return _applied[name][0]
    return value


def local_bootstrap_address() -> str | None:
    """The GCS address of the Ray cluster running on this machine (what ``address="auto"`` means).

    Private API: ``ray._private.services.canonicalize_bootstrap_address("auto")``, which reads
    the address file the head writes (``/tmp/ray/ray_current_cluster``). ``ray.init("auto")``
    does the same but connects; we need the address before connecting, to probe it.
    Checked against Ray 2.60. Returns None when no cluster runs here.
    """
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address("auto")


def cluster_started_in_this_process() -> bool:
    """Whether this process's Ray driver runs a cluster it started itself, in-process.

    That is what ``ray.init()`` without an address does, and what any Ray API (``ray.put``,
    ``ray.data``, ``.remote()``) does when called before ``ray.init``: such a cluster, and every
    object in it, ends with the process. Private API: ``ray._private.worker._global_node`` (the
    driver's ``Node``; only a node this process started has processes in ``all_processes``).
    Ray's public context says which cluster, not who started it. Checked against Ray 2.60.
    """
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return bool(node is not None and node.head and node.all_processes)


def import_driver_modules() -> None:
    """Load what a Ray driver imports lazily on its first connection and first remote call.

    :mod:`airflow_ray.preload` calls it, so that the processes forked afterwards (one per Airflow
    task) find these modules loaded instead of importing them each. Measured in a forked task
    process on 2 cores (Ray 2.60, bytecode compiled): its first actor call spent 0.16 s importing
    pyarrow and numpy (Ray's serialization context registers Arrow serializers when pyarrow is
    installed, and pydantic's and Starlette's when they are), and the probe 0.02 s importing
    gRPC's stubs; a ``@ray_task`` added 0.25 s in all, 0.10 s once these were preloaded. The
    third-party ones are optional for Ray, and skipped when absent.

    Private APIs, imported only: ``ray._common.pydantic_compat``, ``ray._common.usage.usage_lib``,
    ``ray._private.arrow_serialization``, ``ray._private.grpc_utils`` and
    ``ray.core.generated.gcs_service_pb2_grpc`` (what :func:`ping` calls). Checked against Ray 2.60.
    """
    import importlib

    for name in ("numpy", "pyarrow", "pydantic.v1", "starlette.datastructures"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from ray._common import pydantic_compat  # noqa: F401
    from ray._common.usage import usage_lib  # noqa: F401
    from ray._private import arrow_serialization, grpc_utils  # noqa: F401
    from ray.core.generated import gcs_service_pb2_grpc  # noqa: F401


def ping(address: str, *, client: bool, label: str, token_source: str | None = None) -> dict[str, Any] | None:
    """One gRPC call to a cluster: its GCS (``host:port``) or, with ``client``, its Ray Client server.

    A GCS answers with the cluster's metadata, which names the Ray and Python versions its head
    runs (``{"ray_version": "2.60.0", "python_version": "3.11.7", ...}``): the same call that
    tells an unreachable address from a rejected token gives what a version check needs, before
    ``ray.init``. A Ray Client server's ``PING`` says nothing about versions (its proxy answers
    it without starting a session): returns None, as for a GCS that has no metadata.

    Private APIs: ``ray._private.grpc_utils.init_grpc_channel`` (a channel that sends the auth
    token the way Ray's own processes do), the generated stubs in ``ray.core.generated``
    (``gcs_service_pb2[_grpc]``: ``InternalKVGcsService.InternalKVGet``; ``ray_client_pb2[_grpc]``:
    ``RayletDriver.ClusterInfo`` with ``PING``), and where the head stores its metadata:
    ``ray._private.ray_constants.KV_NAMESPACE_CLUSTER`` and
    ``ray._common.usage.usage_constants.CLUSTER_METADATA_KEY`` (``ray._private.node`` reads the
    same key for its own version check). ``ray.init`` retries for ~20 s and then reports
    "Failed to connect to Ray cluster" for every cause; this call answers in ~50 ms.
    Checked against Ray 2.60 (and its GCS answers the same way from Ray 2.52).

    :param label: the address as the user gave it and where it came from, for the messages.
    :param token_source: which token we sent (e.g. "the password of Airflow connection 'x'"),
        named when the cluster rejects it.
    :raises RayAuthenticationError: the cluster wants a token we do not have, or rejected ours.
    :raises RayConnectionError: nothing answers there.
    """
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.exceptions import AuthenticationError

    from airflow_ray.exceptions import RayAuthenticationError, RayConnectionError

    channel = init_grpc_channel(address, asynchronous=False)
    try:
        if client:
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            request = ray_client_pb2.ClusterInfoRequest(  # type: ignore[attr-defined]
                type=ray_client_pb2.ClusterInfoType.PING  # type: ignore[attr-defined]
            )
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=_PING_TIMEOUT_S)
            return None
        from ray._common.usage.usage_constants import CLUSTER_METADATA_KEY
        from ray._private.ray_constants import KV_NAMESPACE_CLUSTER
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        kv_request = gcs_service_pb2.InternalKVGetRequest(  # type: ignore[attr-defined]
            namespace=KV_NAMESPACE_CLUSTER, key=CLUSTER_METADATA_KEY
        )
        reply = gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel).InternalKVGet(
            kv_request, timeout=_PING_TIMEOUT_S
        )
        return json.loads(reply.value) if reply.value else None
    except AuthenticationError as exc:  # token mode, but no token found to send
        raise RayAuthenticationError(f"Ray authentication failed for {label}: {exc}") from exc
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            refused = f"refused us (token sent: {token_source})" if token_source else "rejected our token"
            raise RayAuthenticationError(
                f"Ray authentication failed for {label}: the cluster uses token "
                f"authentication and {refused}. Put the cluster's token (`ray get-auth-token` "
                "on the head node) in the connection's password field, or set RAY_AUTH_TOKEN / "
                "RAY_AUTH_TOKEN_PATH for the Airflow worker."
            ) from exc
        hint = " Ray Client needs the same Ray and Python versions on both sides." if client else ""
        raise RayConnectionError(
            f"Ray cluster unreachable at {label}: {code.name} {exc.details() or ''}.{hint}"
        ) from exc
    finally:
        channel.close()


def versions_match(cluster: dict[str, Any], *, client: bool) -> bool:
    """Whether this process's Ray and Python versions pass Ray's own check against ``cluster``'s.

    ``cluster`` holds ``ray_version`` and ``python_version`` (a GCS's metadata, see :func:`ping`,
    or a Ray Client server's connection info). Ray's rule, not a copy of it: the same Ray version;
    for a driver the same Python down to the level ``RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL``
    says (``patch`` by default), for Ray Client the same Python minor.

    Private API: ``ray._private.utils.check_version_info``, what ``ray.init`` runs on connecting
    (it raises ``RuntimeError`` on a mismatch; we only want the verdict, to word the error with
    where each version came from). Checked against Ray 2.60.
    """
    from ray._private.utils import check_version_info

    level = "minor" if client else None
    try:
        check_version_info(cluster, "", raise_on_mismatch=True, python_version_match_level=level)
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def client_version_check_deferred() -> Iterator[None]:
    """Ray Client's own version check off while connecting (``RAY_IGNORE_VERSION_MISMATCH``).

    A Ray Client server tells its versions only inside a session (no cheap call before
    ``ray.init``, unlike a GCS, see :func:`ping`), and Ray's check then raises a ``RuntimeError``
    that says neither which Ray installation this is nor which connection named the cluster.
    With the check deferred, ``ray.init`` returns a ``ClientContext`` carrying the server's
    ``ray_version`` and ``python_version``, and the caller checks them (:func:`versions_match`)
    and disconnects on a mismatch. A user's own ``RAY_IGNORE_VERSION_MISMATCH`` is left as is.
    Ray reads the variable in ``RayAPIStub._check_versions``, and then logs the mismatch as a
    warning (logger ``ray._private.utils``) that would precede our error with a second, vaguer
    one: dropped while we check. Checked against Ray 2.60.
    """
    if "RAY_IGNORE_VERSION_MISMATCH" in os.environ:
        yield
        return
    import logging

    def not_a_mismatch(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Version mismatch")

    ray_logger = logging.getLogger("ray._private.utils")
    ray_logger.addFilter(not_a_mismatch)
    os.environ["RAY_IGNORE_VERSION_MISMATCH"] = "1"
    try:
        yield
    finally:
        os.environ.pop("RAY_IGNORE_VERSION_MISMATCH", None)
        ray_logger.removeFilter(not_a_mismatch)


def node_death_reason(code: int) -> str:
    """The name of a dead node's ``DeathReason`` (an int in ``ray.nodes()`` entries).

    ``EXPECTED_TERMINATION`` and ``AUTOSCALER_DRAIN_IDLE`` are nodes stopped or scaled down on
    purpose; ``UNEXPECTED_TERMINATION`` (missed heartbeats: the raylet crashed or its host went
    away) and ``AUTOSCALER_DRAIN_PREEMPTED`` took their objects with them. Private API: the
    generated enum ``ray.core.generated.common_pb2.NodeDeathInfo.Reason``; Ray has no public name
    for these codes. Checked against Ray 2.60.
    """
    from ray.core.generated import common_pb2

    try:
        return str(common_pb2.NodeDeathInfo.Reason.Name(code))  # type: ignore[attr-defined]
    except ValueError:
        return f"UNKNOWN_{code}"


def job_submission_client(address: str, headers: dict[str, str], timeout: float) -> JobSubmissionClient:
    """Ray's ``JobSubmissionClient`` whose every HTTP request gives up after ``timeout`` seconds.

    Private API: ``SubmissionClient._do_request``, the one method through which the client sends
    every request (the version check in its constructor, submit, package upload, status, logs,
    stop) with ``requests`` and no timeout, so an unresponsive dashboard blocks the caller forever.
    Ray has no public timeout; overriding this method adds ``requests``' own (connect and read,
    per socket operation: a large upload is not cut short). It also sends exactly ``headers``
    (the token chosen for this dashboard, or none): Ray's constructor would add the process's own
    token (``SubmissionClient._headers``) when a driver in token mode talks to any dashboard.
    Checked against Ray 2.60.

    :raises requests.exceptions.Timeout: (from the methods) the dashboard did not answer in time.
    """
    from ray.job_submission import JobSubmissionClient

    class _BoundedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout)
            # Exactly our headers: Ray's constructor adds this process's token (whichever
            # cluster it is a driver of) to any dashboard's requests when we send none.
            self._headers = dict(headers)
            return super()._do_request(*args, **kwargs)

    return _BoundedJobSubmissionClient(address, headers=headers)


def cluster_status(address: str) -> dict[str, Any]:
    """Nodes, resources and object store use of a cluster, read without becoming its driver.

    Private APIs: ``ray._private.internal_api.get_state_from_address`` (a GCS client:
    ``node_table()``) and ``ray._private.internal_api.get_memory_info_reply`` (a raylet's
    ``store_stats``), the calls behind ``ray memory``. The public equivalents need either
    ``ray.init`` (``ray.nodes()``, ``ray.available_resources()``), which would make the CLI a driver
    of the cluster it reports on, or the dashboard (``ray.util.state``), which the embedded cluster
    runs without by default. Pings first: Ray's own client reports a refused token as "Failed to
    connect to GCS". Checked against Ray 2.60.
    """
    from ray._private import internal_api

    ping(address, client=False, label=f"{address} (from airflow-ray cluster status)")
    state = internal_api.get_state_from_address(address)
    reply = internal_api.get_memory_info_reply(state)
    nodes = [n for n in state.node_table() if n["Alive"]]
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node["Resources"].items():
            if not name.startswith("node:"):
                totals[name] = totals.get(name, 0.0) + amount
    return {
        "address": address,
        "nodes": len(nodes),
        "resources": totals,
        "object_store_used_bytes": int(reply.store_stats.object_store_bytes_used),
        "object_store_capacity_bytes": int(reply.store_stats.object_store_bytes_avail),
        "object_store_num_objects": int(reply.store_stats.num_local_objects),
        "object_store_spilled_bytes": int(reply.store_stats.spilled_bytes_total),
    }


def airflow_ui_user() -> Any:
    """The FastAPI dependency that says which Airflow user sent a request to the API server.

    Internal Airflow API: ``airflow.api_fastapi.core_api.security.get_user``, what every route of
    Airflow's own REST API depends on: a ``Bearer`` token, else the UI's ``_token`` cookie,
    validated by the configured auth manager (401 without one, 403 for an invalid one). Airflow
    mounts a plugin's FastAPI app without its own routes' dependencies, so the app must ask for
    it (the Ray view, :mod:`airflow_ray.ui.api`). No Ray API: checked against Ray 2.60 and
    Airflow 3.3.
    """
    from airflow.api_fastapi.core_api.security import get_user

    return get_user


def airflow_auth_manager() -> Any:
    """The API server's auth manager (``is_authorized_dag``, ``get_authorized_dag_ids``...).

    ``airflow.api_fastapi.app.get_auth_manager``: the instance Airflow's own routes ask; the auth
    manager interface itself is public. No Ray API: checked against Ray 2.60 and Airflow 3.3.
    """
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()
