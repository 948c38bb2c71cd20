"""The embedded cluster's keeper: the driver that creates the owner actors and stays connected.

A detached actor belongs to the Ray job of the driver that created it, and Ray kills the idle
workers of a finished job. An owner created by an Airflow task process (a driver that exits
with its task) therefore needs a new worker process for every later task it runs: 1.7-2.5 s
each on a loaded 2-core machine, paid by every ``@ray_task`` under the LocalExecutor. An owner
created by a driver that stays connected reuses its idle workers (5 ms a call, measured).

:func:`airflow_ray.cluster.start` runs ``python -m airflow_ray.keeper <address> <temp dir>
<ready file> <deployment id>`` after ``ray start --head``: it connects, starts the owner factory
(:mod:`airflow_ray._worker.factory`: task processes of any deployment sharing the cluster get
their owners created through it, in this job), creates the owner shards of the deployment that
started the cluster (:mod:`airflow_ray.deployment`), writes the ready file and waits. It ends
with the cluster: :func:`airflow_ray.cluster.stop` kills the processes whose command line names
the cluster's temp dir, this one included. Owners of a code version the keeper does not run
have no factory and are created by the task that needs them, as on any other cluster: correct,
only slower.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path


def main(argv: list[str]) -> None:
    address, _temp_dir, ready_file, deployment_id = argv
    import ray

    from airflow_ray import config, owners

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


if __name__ == "__main__":
    main(sys.argv[1:])
