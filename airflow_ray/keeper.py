"""The keepers: long-lived drivers that keep Ray's worker processes warm for the owner actors.

A detached actor belongs to the Ray job of the driver that created it, and Ray kills the idle
workers of a finished job. An owner created by an Airflow task process (a driver that exits
with its task) therefore needs a new worker process for every later task it runs: 1.7-2.5 s
each on a loaded 2-core machine, paid by every ``@ray_task`` under the LocalExecutor. An owner
created by a driver that stays connected reuses its idle workers (5 ms a call, measured). That
driver hosts the owner factory (:mod:`airflow_ray._worker.factory`): task processes of any
deployment sharing the cluster get their owners created through it, in its job.

Two kinds of keeper host it:

* **the embedded cluster's**: :func:`airflow_ray.cluster.start` runs ``python -m
  airflow_ray.keeper <address> <temp dir> <ready file> <deployment id>`` (:func:`main`) after
  ``ray start --head``: it connects, starts the factory, creates the owner shards of the
  deployment that started the cluster (:mod:`airflow_ray.deployment`), writes the ready file and
  waits. It ends with the cluster: :func:`airflow_ray.cluster.stop` kills the processes whose
  command line names the cluster's temp dir, this one included.
* **any cluster's** (:class:`~airflow_ray._worker.factory.Keeper`): a detached actor on the head
  node whose child process is the driver; it needs only Ray on the cluster. One per cluster and
  code version (its name carries the version and the code hash, like the owners'), started by
  the first task that finds no factory for its code (``[ray] keeper_on_first_use``) or by
  ``airflow-ray cluster prepare`` (:func:`prepare`), stopped by ``airflow-ray cluster prepare
  --stop`` (:func:`stop`). An upgrade gets a new one; the old one only costs its memory until it
  is stopped. A restarted head has none until the next first use or ``prepare``.

.. code-block:: console

    $ airflow-ray cluster prepare --connection ray_prod
    $ airflow-ray cluster status --connection ray_prod
    $ airflow-ray cluster prepare --connection ray_prod --stop

Owners outlive their keeper (they hold outputs): one created through a factory whose keeper has
since stopped keeps working, without warm workers, until the cluster restarts.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from airflow_ray import config, owners


class KeeperError(RuntimeError):
    """The keeper could not start the owner factory on the cluster; the message says why."""


def main(argv: list[str]) -> None:
    address, _temp_dir, ready_file, deployment_id = argv
    import ray

    ray.init(address=address, namespace=config.namespace(), log_to_driver=False, configure_logging=False)
    factory = owners.start_factory()
    ray.get(factory.__ray_ready__.remote())
    names = owners.owner_names(deployment_id)
    handles = [owners.get_owner(name, create=True) for name in names]
    ray.get([owner.stats.remote() for owner in handles])  # created and answering
    ready = Path(ready_file)
    ready.with_suffix(".tmp").write_text("\n".join(names))
    ready.with_suffix(".tmp").replace(ready)
    threading.Event().wait()  # until the cluster stops and kills this process


def prepare(timeout: float = owners.KEEPER_START_TIMEOUT_S) -> str:
    """Make sure the connected cluster has an owner factory for this code; what was done, in words.

    Idempotent: a factory that exists (a keeper's, or the embedded cluster's keeper's) is kept.

    :raises KeeperError: the keeper's driver did not start the factory within ``timeout``.
    """
    import ray

    try:
        ray.get_actor(owners.factory_name(), namespace=config.namespace())
        return f"owner factory {owners.factory_name()} already running"
    except ValueError:
        pass
    problem = ray.get(owners.start_keeper().ready.remote(timeout), timeout=timeout + 30)
    if problem is not None:
        raise KeeperError(
            f"The keeper {owners.keeper_name()} did not start the owner factory: {problem}\n"
            "Ray tasks still run, each in a new worker process. The driver's output is also in the "
            "keeper actor's log (`ray list actors --filter name=...`, then `ray logs actor --id ...`)."
        )
    return f"started the keeper {owners.keeper_name()}: owner factory {owners.factory_name()} is ready"


def stop(*, all_versions: bool = False) -> list[str]:
    """Stop this code's keeper (with ``all_versions``, every airflow-ray keeper) on the connected
    cluster; returns the names stopped. Owners and their outputs stay; the next first use (unless
    ``[ray] keeper_on_first_use`` is off) or ``prepare`` starts a keeper again."""
    import ray

    stopped: list[str] = []
    for name in _named(owners.KEEPER_PREFIX):
        if name != owners.keeper_name() and not all_versions:
            continue
        keeper = ray.get_actor(name, namespace=config.namespace())
        ray.get(keeper.stop.remote(), timeout=60)  # the driver first: it must not outlive the actor
        ray.kill(keeper, no_restart=True)
        stopped.append(name)
    return stopped


def describe() -> list[dict[str, Any]]:
    """The factories and keepers on the connected cluster, any version: what ``cluster status`` shows."""
    import ray

    current = {owners.factory_name(), owners.keeper_name()}
    found: list[dict[str, Any]] = []
    for name in _named(owners.FACTORY_PREFIX) + _named(owners.KEEPER_PREFIX):
        entry: dict[str, Any] = {"name": name, "this_version": name in current}
        if name.startswith(owners.KEEPER_PREFIX):
            keeper = ray.get_actor(name, namespace=config.namespace())
            try:
                entry.update(ray.get(keeper.info.remote(), timeout=30))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
                entry["error"] = f"not answering: {type(exc).__name__}"
        found.append(entry)
    return found


def _named(prefix: str) -> list[str]:
    """Names of the live named actors in our namespace that start with ``prefix``, sorted."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"] for a in actors if a["namespace"] == config.namespace() and a["name"].startswith(prefix)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
