"""``airflow-ray doctor``: check a Ray connection end to end, one verdict per check.

What a task meets when it connects, in the order it meets it, so that the first failure is the
one to fix, and then what slows or breaks tasks later:

============== ==========================================================================
address        the connection resolves (see :class:`~airflow_ray.hooks.RayHook`)
reachable      something answers there (one gRPC call, as the hook's probe)
token          the cluster accepts the token we send (and which one that is)
versions       the same Ray (and Python) versions on both sides (:mod:`airflow_ray.versions`)
connect        ``ray.init``: as a driver (needs a Ray node here) or a Ray Client session
nodes          no node died unexpectedly (its objects died with it)
owners         this deployment's owner actors, and the keeper that keeps Ray workers warm
object store   free space in the object store (GCS addresses; not visible through Ray Client)
dashboard      the dashboard / Jobs API answers, with our token (when one is configured)
checkpoints    the checkpoint base's marker allows this deployment, and a probe object can be
               written and deleted there (when a base is configured)
============== ==========================================================================

After a failure of address .. connect, the cluster checks that depend on it are skipped; the
dashboard and checkpoint checks always run. A warning (a missing keeper: slower, not broken)
does not fail the run.

.. code-block:: console

    $ airflow-ray doctor --connection ray_default
    ok       address       127.0.0.1:6379 (from Airflow connection 'ray_default')
    ok       reachable     the GCS at 127.0.0.1:6379 answers
    ...
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from airflow_ray import compat, config
from airflow_ray.exceptions import RayAuthenticationError, RayConnectionError, RayVersionMismatchError
from airflow_ray.hooks.ray import RayHook, RayTarget, bootstrap_address, probe, token_source

Status = Literal["ok", "warn", "FAILED", "skipped"]
#: The checks of the cluster itself, in the order a connecting task meets them.
CLUSTER_CHECKS = ("address", "reachable", "token", "versions", "connect", "nodes", "owners", "object store")
#: Object store use above this share of its capacity fails the check: Ray spills or refuses puts.
STORE_FULL_SHARE = 0.9
#: Ways a node ends that lose nothing unexpectedly (stopped, or scaled down while idle).
_PLANNED_DEATHS = frozenset({"EXPECTED_TERMINATION", "AUTOSCALER_DRAIN_IDLE"})


@dataclass(frozen=True)
class Check:
    """One verdict: what was checked, how it went, and what was found (or how to fix it)."""

    name: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status:<8} {self.name:<13} {self.detail}"


def diagnose(
    conn_id: str, *, checkpoint_path: str | None = None, checkpoint_source: str | None = None
) -> list[Check]:
    """Run every check against the connection ``conn_id``; one :class:`Check` each, in order.

    This process becomes a driver (or Ray Client) of the cluster, as a task would.

    :param checkpoint_path: the base to check, else the one ``checkpoint_source`` names, else
        ``[ray] checkpoint_path`` (the resolution a task uses).
    """
    found = {check.name: check for check in _cluster_checks(RayHook(conn_id))}
    cluster = [
        found.get(name) or Check(name, "skipped", "after the failure above") for name in CLUSTER_CHECKS
    ]
    return [*cluster, _dashboard(conn_id), _checkpoints(checkpoint_path, checkpoint_source)]


def failed(checks: list[Check]) -> bool:
    return any(check.status == "FAILED" for check in checks)


# --- the cluster -------------------------------------------------------------------------------


def _cluster_checks(hook: RayHook) -> Iterator[Check]:
    """The checks in :data:`CLUSTER_CHECKS`, stopping at the first failure."""
    try:
        target = hook.target
    except Exception as exc:
        yield Check("address", "FAILED", str(exc))
        return
    yield Check("address", "ok", target.describe())
    compat.apply_env(target.env)
    try:
        reported = probe(target)
    except RayAuthenticationError as exc:
        yield Check("reachable", "ok", _answers(target))
        yield Check("token", "FAILED", str(exc))
        return
    except RayVersionMismatchError as exc:
        yield from (Check("reachable", "ok", _answers(target)), _token_ok(target))
        yield Check("versions", "FAILED", str(exc))
        return
    except RayConnectionError as exc:
        yield Check("reachable", "FAILED", str(exc))
        return
    if not target.address.startswith("anyscale://"):
        yield from (Check("reachable", "ok", _answers(target)), _token_ok(target))
    try:
        hook.connect()
    except RayVersionMismatchError as exc:  # a Ray Client session reported other versions
        yield Check("versions", "FAILED", str(exc))
        return
    except Exception as exc:
        yield Check("connect", "FAILED", f"{type(exc).__name__}: {exc}")
        return
    yield _versions_ok(target, reported)
    yield Check("connect", "ok", "Ray Client session" if target.is_client else "joined as a driver")
    yield _nodes()
    yield _owners()
    yield _object_store(target)


def _answers(target: RayTarget) -> str:
    kind = "the Ray Client server" if target.is_client else "the GCS"
    return f"{kind} at {bootstrap_address(target)} answers"


def _token_ok(target: RayTarget) -> Check:
    if target.env.get("RAY_AUTH_MODE") != "token":
        return Check("token", "ok", "none sent, none required")
    return Check("token", "ok", f"accepted (sent: {token_source(target)})")


def _versions_ok(target: RayTarget, reported: dict[str, Any] | None) -> Check:
    import platform

    import ray

    if reported is not None:
        theirs = f"Ray {reported['ray_version']} on Python {reported['python_version']}"
        return Check("versions", "ok", f"{theirs} on both sides (recorded by the head)")
    if target.is_client:
        minor = ".".join(platform.python_version_tuple()[:2])
        return Check(
            "versions", "ok", f"Ray {ray.__version__} and Python {minor} on both sides (Ray Client session)"
        )
    return Check("versions", "skipped", f"{target.address} reports no versions before connecting")


def _nodes() -> Check:
    import ray

    nodes = ray.nodes()
    alive = sum(bool(node["Alive"]) for node in nodes)
    lost = [text for node in nodes if not node["Alive"] and (text := _describe_death(node)) is not None]
    if lost:
        return Check(
            "nodes",
            "FAILED",
            f"{len(lost)} of {len(nodes)} nodes died unexpectedly: {'; '.join(lost)}. Their objects are lost "
            "(tasks restore them from checkpoints, or fail naming the upstream task to re-run). Restart the "
            "node (`ray start --address=<head>` on its host); the head lists a dead node until it restarts.",
        )
    stopped = f", {len(nodes) - alive} stopped" if alive < len(nodes) else ""
    return Check("nodes", "ok", f"{alive} alive{stopped}")


def _describe_death(node: dict[str, Any]) -> str | None:
    """A dead node in words, or None when it was stopped or scaled down on purpose."""
    reason = compat.node_death_reason(node.get("DeathReason", 0))
    if reason in _PLANNED_DEATHS:
        return None
    why = node.get("DeathReasonMessage") or "no reason given"
    return f"{node['NodeID'][:12]} at {node['NodeManagerAddress']} ({reason}: {why})"


def _owners() -> Check:
    import ray

    from airflow_ray import owners

    try:
        names = owners.owner_names()
    except Exception as exc:
        return Check(
            "owners",
            "FAILED",
            f"this deployment's id is unknown ({exc}); run `airflow-ray deployment` where the metadata DB is "
            "reachable, or set [ray] deployment_id",
        )
    namespace = config.namespace()
    running = {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == namespace
    }
    present = sum(name in running for name in names)
    shards = (
        f"{present} of {len(names)} owner shards running"
        if present
        else "no owner yet (the first task creates them)"
    )
    if owners.factory_name() in running:
        return Check("owners", "ok", f"{shards}; the keeper's owner factory is running (warm Ray workers)")
    return Check(
        "owners",
        "warn",
        f"{shards}; no keeper (owner factory {owners.factory_name()} in namespace {namespace!r}): "
        "the first @ray_task starts one ([ray] keeper_on_first_use); without it each @ray_task "
        "waits for a fresh Ray worker process (1.7-2.5 s measured). Start it now with "
        "`airflow-ray cluster prepare --connection <id>`.",
    )


def _object_store(target: RayTarget) -> Check:
    if target.is_client or target.address.startswith("anyscale://"):
        return Check(
            "object store",
            "skipped",
            "not visible through Ray Client: run the doctor on a Ray node with the GCS address "
            "(host:6379), or see the dashboard",
        )
    status = compat.cluster_status(bootstrap_address(target))
    used, capacity = status["object_store_used_bytes"], status["object_store_capacity_bytes"]
    objects = status["object_store_num_objects"]
    text = f"{used / 2**20:.0f} MiB used of {capacity / 2**20:.0f} MiB ({objects} objects)"
    if capacity and used >= STORE_FULL_SHARE * capacity:
        return Check(
            "object store",
            "FAILED",
            f"{text}: nearly full, Ray spills to disk or refuses new objects. Free objects (`airflow-ray "
            "gc`, a lower [ray] object_ttl_seconds or max_objects) or give the nodes a larger object store",
        )
    return Check("object store", "ok", text)


# --- beside the cluster ------------------------------------------------------------------------


def _dashboard(conn_id: str) -> Check:
    from airflow_ray.hooks.job import RayJobHook

    hook = RayJobHook(conn_id)
    try:
        dashboard = hook.dashboard
    except RayConnectionError as exc:
        return Check("dashboard", "skipped", f"none configured: {exc}")
    where = f"{dashboard.url} (from {dashboard.source})"
    try:
        jobs = hook.list_jobs()
    except Exception as exc:
        return Check(
            "dashboard",
            "FAILED",
            f"the Jobs API at {where} failed: {type(exc).__name__}: {exc}. Check the URL (the "
            "'dashboard_url' extra or RAY_API_SERVER_ADDRESS, e.g. http://head:8265) and that it takes the "
            "cluster's token",
        )
    return Check("dashboard", "ok", f"the Jobs API at {where} answers ({len(jobs)} jobs)")


def _checkpoints(checkpoint_path: str | None, checkpoint_source: str | None) -> Check:
    """Where a task's checkpoints would go: the base marker's verdict, then a probe write.

    The probe is written from this host with the connection's credentials; a task writes from its
    Ray worker, whose network and instance role may differ.
    """
    from airflow_ray import deployment
    from airflow_ray._worker.checkpoint import CheckpointBaseError, check_base, normalize_base
    from airflow_ray._worker.checkpoint.filesystem import display, is_local, open_fs
    from airflow_ray.checkpoint import resolve_checkpoint_location

    try:  # the resolution a task uses; the ids only shape a path under the base, never used
        location = resolve_checkpoint_location(
            checkpoint_path=checkpoint_path,
            checkpoint_source=checkpoint_source,
            dag_id="doctor",
            run_id="doctor",
            task_id="doctor",
        )
    except ValueError as exc:
        if checkpoint_path or checkpoint_source:
            return Check("checkpoints", "FAILED", str(exc))
        return Check("checkpoints", "skipped", "no base set ([ray] checkpoint_path, --checkpoint-path)")
    base, options = location.base or normalize_base(location.uri), location.storage_options
    try:
        owned = check_base(base, options, deployment.current().id)
    except CheckpointBaseError as exc:
        return Check("checkpoints", "FAILED", str(exc))
    fs, root = open_fs(normalize_base(base), options)
    probe_path = f"{root}/.airflow-ray-doctor-{uuid.uuid4().hex}"
    try:
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe_path, b"airflow-ray doctor probe\n")
        fs.rm_file(probe_path)
    except Exception as exc:
        return Check(
            "checkpoints",
            "FAILED",
            f"cannot write and delete {display(fs, probe_path)}: {type(exc).__name__}: {exc}. Check the "
            "base and the credentials of its connection (checkpoint_source, [ray] checkpoint_conn_id)",
        )
    marker = "marked as this deployment's" if owned else "no checkpoint yet (the first one marks the base)"
    return Check(
        "checkpoints",
        "ok",
        f"{display(fs, root)}: a probe object written and deleted from this host; {marker}",
    )
