"""The owner actors as the Airflow side reaches them: their names, handles and shipped code.

An owner (:class:`airflow_ray._worker.owner.Owner`) is a detached actor that owns task
outputs so they outlive Airflow task processes. A DAG run's objects always live in one shard,
picked by a stable hash of ``(dag_id, run_id)``. Names carry the package version and a hash
of the Ray-side package's source (``get_if_exists=True`` would otherwise hand an upgraded
Airflow an old actor still running old code), and the deployment
(:mod:`airflow_ray.deployment`): deployments sharing a cluster have disjoint owners, so one never
reads, replaces, attaches to or frees another's entries, whatever their DAG and run ids.

>>> parse_owner_name("airflow_ray_owner-v0.3.0-1a2b3c4d-prod-1")
OwnerName(version='0.3.0', code='1a2b3c4d', deployment='prod', shard=1)

A handle is looked up once per process and cluster connection (``ray.get_actor`` is a GCS
round trip); :func:`forget_owners` drops the handles when the process reconnects.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from airflow_ray import config, deployment
from airflow_ray._worker.factory import ON_HEAD
from airflow_ray._worker.owner import shard_for
from airflow_ray.version import __version__

OWNER_PREFIX = "airflow_ray_owner-v"
FACTORY_PREFIX = "airflow_ray_factory-v"
KEEPER_PREFIX = "airflow_ray_keeper-v"
#: Owners and the keeper: detached, no CPU, on the head node (which outlives worker nodes).
_DETACHED_ON_HEAD: dict[str, Any] = {"lifetime": "detached", "get_if_exists": True, **ON_HEAD}
#: How long the first task on a cluster without a factory waits for the keeper to start one.
KEEPER_START_TIMEOUT_S = 60.0
_NAME = re.compile(
    re.escape(OWNER_PREFIX)
    + r"(?P<version>[^-]+)-(?P<code>[0-9a-f]{8})-(?P<deployment>[a-z0-9][a-z0-9-]*)-(?P<shard>\d+)"
)

_handles: dict[str, Any] = {}


class OwnerName(NamedTuple):
    """The parts of an owner actor's name."""

    version: str
    code: str
    deployment: str
    shard: int


def owner_name(dag_id: str, run_id: str) -> str:
    """The versioned name of the owner actor that holds the objects of a DAG run."""
    return owner_names()[shard_for(dag_id, run_id, config.owner_shards())]


def owner_names(deployment_id: str | None = None) -> list[str]:
    """The names of this deployment's owner shards for this version of the code, shard 0 first."""
    prefix = f"{OWNER_PREFIX}{__version__}-{worker_code_hash()}-{deployment_id or deployment.current().id}"
    return [f"{prefix}-{shard}" for shard in range(config.owner_shards())]


def running_owner_names(deployment_id: str) -> list[str]:
    """The owners of ``deployment_id`` running on the connected cluster, of every code version
    (what ``airflow-ray gc`` sweeps and the UI's Ray view lists)."""
    import ray

    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == config.namespace()
        and (parsed := parse_owner_name(actor["name"])) is not None
        and parsed.deployment == deployment_id
    ]


def parse_owner_name(name: str) -> OwnerName | None:
    """The parts of an owner's name, or None for a name that is not one (any version)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return OwnerName(match["version"], match["code"], match["deployment"], int(match["shard"]))


def get_owner(name: str, *, create: bool = False) -> Any:
    """Handle of a named owner actor; with ``create`` start it if there is none.

    :raises ValueError: without ``create``, when no such actor exists (``ray.get_actor``'s error).
    """
    import ray

    if (cached := _handles.get(name)) is not None:
        return cached
    ship_worker_code()
    try:
        handle = ray.get_actor(name, namespace=config.namespace())
    except ValueError:
        if not create:
            raise
        handle = _create_owner(name)
    _handles[name] = handle
    return handle


def factory_name() -> str:
    """The name of the :class:`~airflow_ray._worker.factory.OwnerFactory` for this code."""
    return f"{FACTORY_PREFIX}{__version__}-{worker_code_hash()}"


def keeper_name() -> str:
    """The name of the :class:`~airflow_ray._worker.factory.Keeper` that hosts this code's factory."""
    return f"{KEEPER_PREFIX}{__version__}-{worker_code_hash()}"


def start_factory() -> Any:
    """Create the owner factory in the calling driver's Ray job (the embedded cluster's keeper)."""
    from airflow_ray._worker import factory

    ship_worker_code()
    return factory.start_factory(factory_name(), config.namespace())


def start_keeper() -> Any:
    """Start (or find) this code's keeper on the connected cluster; returns its handle.

    One per cluster and code version (the name carries both hashes): two task processes racing
    here get the same actor (``get_if_exists``), which starts one driver. Its
    ``ready.remote(timeout)`` says when the factory answers, or why it does not.
    """
    import ray
    import ray.cloudpickle as cloudpickle

    from airflow_ray._worker import factory

    ship_worker_code()
    driver = cloudpickle.dumps(functools.partial(factory.serve_factory, factory_name(), config.namespace()))
    options = {
        **_DETACHED_ON_HEAD,
        "name": keeper_name(),
        "namespace": config.namespace(),
        "max_restarts": -1,  # a lost worker: Ray starts the actor again, which starts the driver
        "max_concurrency": 4,  # ready() waits while info() and stop() answer
    }
    return ray.remote(factory.Keeper).options(**options).remote(driver)


def _create_owner(name: str) -> Any:
    """Create an owner: through the factory (its Ray job keeps the owner's workers warm, see
    :mod:`airflow_ray._worker.factory`) where there is one or one can be started, else in this
    driver's job."""
    import ray

    from airflow_ray._worker.owner import Owner

    if parse_owner_name(name) is None:  # only names this module made (see owner_names)
        raise ValueError(f"Not an airflow-ray owner name: {name!r}")
    options = {**_DETACHED_ON_HEAD, "name": name, "namespace": config.namespace(), "max_concurrency": 1000}
    args = (config.object_ttl_seconds(), config.max_objects())
    factory = _factory()
    if factory is None:
        return ray.remote(Owner).options(**options).remote(*args)
    ray.get(factory.create.remote(Owner, options, args))
    return ray.get_actor(name, namespace=config.namespace())


def _factory() -> Any | None:
    """The factory for this code; if there is none, start its keeper and wait for it
    (``[ray] keeper_on_first_use``). None when that is off or fails: the owner is then created
    in this task's job, correct but without warm workers, and the log says why."""
    import ray

    try:
        return ray.get_actor(factory_name(), namespace=config.namespace())
    except ValueError:
        if not config.keeper_on_first_use():
            return None
    waited = start_keeper().ready.remote(KEEPER_START_TIMEOUT_S)
    try:
        problem = ray.get(waited, timeout=KEEPER_START_TIMEOUT_S + 30)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return ray.get_actor(factory_name(), namespace=config.namespace())
    logging.getLogger(__name__).warning(
        "No owner factory on this Ray cluster (%s): the owner is created by this task, and every Ray "
        "task it runs starts a new worker process. Check with `airflow-ray cluster status`.",
        problem,
    )
    return None


def forget_owners() -> None:
    """Drop cached actor handles (after reconnecting to another cluster)."""
    _handles.clear()


def ship_worker_code() -> None:
    """Send :mod:`airflow_ray._worker` by value, so a cluster needs only Ray, not airflow-ray."""
    import ray.cloudpickle as cloudpickle

    from airflow_ray import _worker

    cloudpickle.register_pickle_by_value(_worker)


@cache
def worker_code_hash() -> str:
    """A hash of every source file of :mod:`airflow_ray._worker` (names and contents)."""
    from airflow_ray import _worker

    root = Path(_worker.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]
