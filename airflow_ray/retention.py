"""When data is freed: reconcile the owners' registries with the XCom table.

Airflow never tells an XCom backend that a DAG run was deleted, and it only calls ``purge``
for XComs it clears at the start of a retry. The owners free objects on their own when a task
re-runs (its outputs are replaced) and after ``[ray] object_ttl_seconds``; everything else is
:func:`collect`'s job: an object whose XCom row is gone (run deleted, XCom cleared) is freed.
It needs the metadata database, so it runs where the scheduler runs:

.. code-block:: console

    $ airflow-ray gc            # e.g. from cron, or a maintenance DAG

Checkpoints outlive the in-memory objects on purpose (they are how a run recovers from the
loss of the cluster): :func:`expire_checkpoints` deletes a run's checkpoints once the run is
deleted, or ``[ray] checkpoint_retention_seconds`` after they were written.
"""

from __future__ import annotations

from typing import Any

from airflow_ray.outputs import OUTPUTS
from airflow_ray.owners import parse_owner_name
from airflow_ray.references import MARKER


def collect(session: Any = None, *, dry_run: bool = False) -> dict[str, int]:
    """Free every registry entry of this deployment's owners that no XCom row refers to any more.

    Other deployments on the same cluster have their own owners (:mod:`airflow_ray.deployment`)
    and are never looked at.

    :returns: counts of ``kept`` and ``freed`` entries.
    """
    import ray

    from airflow_ray import config, deployment
    from airflow_ray.owners import get_owner

    live = _referenced_object_ids(session)
    kept = freed = 0
    for name in _owner_names(config.namespace(), deployment.current().id):
        owner = get_owner(name)
        for entry in ray.get(owner.entries.remote()):
            if entry["object_id"] in live:
                kept += 1
                continue
            freed += 1
            if not dry_run:
                ray.get(owner.release.remote(tuple(entry["key"])))
    return {"kept": kept, "freed": freed}


def expire_checkpoints(
    base_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retention_seconds: float,
    session: Any = None,
    now: float | None = None,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete the checkpoints of runs under ``base_uri`` that are deleted or expired.

    A run's directory (``<base>/<dag_id>/<run_id>/``) goes when no DAG run of that id exists
    any more, or when its newest manifest is older than ``retention_seconds`` (0: never).

    :returns: counts of ``kept`` and ``deleted`` run directories.
    """
    import time

    from airflow_ray import checkpoint

    now = time.time() if now is None else now
    live = _run_directories(session)
    kept = deleted = 0
    for run in checkpoint.list_run_checkpoints(base_uri, storage_options):
        written = run.newest_written.timestamp() if run.newest_written else 0.0
        expired = retention_seconds > 0 and now - written > retention_seconds
        if (run.dag, run.run) in live and not expired:
            kept += 1
            continue
        deleted += 1
        if not dry_run:
            checkpoint.delete_checkpoint(run.uri, storage_options)
    return {"kept": kept, "deleted": deleted}


def _run_directories(session: Any) -> set[tuple[str, str]]:
    """``(dag_id, run_id)`` of every DAG run, spelled as checkpoint directories spell them."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from airflow_ray.checkpoint import path_component

    def scan(s: Any) -> set[tuple[str, str]]:
        rows = s.query(DagRun.dag_id, DagRun.run_id).yield_per(1000)
        return {(path_component(dag_id), path_component(run_id)) for dag_id, run_id in rows}

    if session is not None:
        return scan(session)
    with create_session() as s:
        return scan(s)


def _owner_names(namespace: str, deployment_id: str) -> list[str]:
    """This deployment's owners, of every code version still running."""
    from ray.util import list_named_actors

    names = []
    for actor in list_named_actors(all_namespaces=True):
        parsed = parse_owner_name(actor["name"])
        if actor["namespace"] == namespace and parsed is not None and parsed.deployment == deployment_id:
            names.append(actor["name"])
    return names


def _referenced_object_ids(session: Any) -> set[str]:
    """Object ids that any XCom row claims to refer to.

    Not verified on purpose: a row only keeps its object alive here, and keeping too much is
    safe (the TTL still applies); freeing is never decided from a row's content.
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    def scan(s: Any) -> set[str]:
        ids: set[str] = set()
        for (value,) in s.query(XComModel.value).yield_per(1000):
            ids.update(_claimed_object_ids(_json(value)))
        return ids

    if session is not None:
        return scan(session)
    with create_session() as s:
        return scan(s)


def _claimed_object_ids(data: Any) -> list[str]:
    outputs = isinstance(data, dict) and isinstance(data.get(OUTPUTS), dict)
    documents = data[OUTPUTS].values() if outputs else [data]
    return [
        d["object_id"]
        for d in documents
        if isinstance(d, dict) and MARKER in d and isinstance(d.get("object_id"), str)
    ]


def _json(value: Any) -> Any:
    import json

    if isinstance(value, (bytes, str)):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value
