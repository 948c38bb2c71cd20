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

import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from airflow_ray import config, deployment
from airflow_ray._worker.owner import shard_for
from airflow_ray.version import __version__

OWNER_PREFIX = "airflow_ray_owner-v"
FACTORY_PREFIX = "airflow_ray_factory-v"
#: Owners and the factory: detached, no CPU, on the head node (which outlives worker nodes).
_DETACHED_ON_HEAD: dict[str, Any] = {
    "lifetime": "detached",
    "get_if_exists": True,
    "num_cpus": 0,
    "resources": {"node:__internal_head__": 0.001},
}
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
    """The name of the keeper's :class:`~airflow_ray._worker.factory.OwnerFactory` for this code."""
    return f"{FACTORY_PREFIX}{__version__}-{worker_code_hash()}"


def start_factory() -> Any:
    """Create the owner factory in the calling driver's Ray job (the keeper's)."""
    import ray

    from airflow_ray._worker.factory import OwnerFactory

    ship_worker_code()
    options = {**_DETACHED_ON_HEAD, "name": factory_name(), "namespace": config.namespace()}
    return ray.remote(OwnerFactory).options(**options).remote()


def _create_owner(name: str) -> Any:
    """Create an owner: through the keeper's factory where there is one (its Ray job keeps the
    owner's workers warm, see :mod:`airflow_ray._worker.factory`), else in this driver's job."""
    import ray

    from airflow_ray._worker.owner import Owner

    if parse_owner_name(name) is None:  # only names this module made (see owner_names)
        raise ValueError(f"Not an airflow-ray owner name: {name!r}")
    options = {**_DETACHED_ON_HEAD, "name": name, "namespace": config.namespace(), "max_concurrency": 1000}
    args = (config.object_ttl_seconds(), config.max_objects())
    try:
        factory = ray.get_actor(factory_name(), namespace=config.namespace())
    except ValueError:
        return ray.remote(Owner).options(**options).remote(*args)
    ray.get(factory.create.remote(Owner, options, args))
    return ray.get_actor(name, namespace=config.namespace())


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
