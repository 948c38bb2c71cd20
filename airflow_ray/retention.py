"""When data is freed: reconcile the owners' registries and the checkpoint bases with the metadata DB.

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

A sweep runs while tasks run, so it only ever frees what it can prove is garbage:

* **the store is listed before the DB is read.** An entry (or a checkpoint) made after the
  listing is not judged at all; one made before it is judged against a DB snapshot taken later,
  in which its task's XCom row, if the task has finished, is already written. In that snapshot
  the DAG runs are read first, then the task instances, then the XCom rows: a task that
  finished before the second read has its rows in the third.
* **a grace period**, ``[ray] gc_grace_seconds``: nothing younger is freed (an output is
  registered before its XCom row is written; a checkpoint directory mid-write has no manifest).
* **nothing of a task instance that is not finished** (running, queued, up for retry...), and
  no checkpoint of a DAG run that is not finished or that was created after the sweep started.
* **checkpoints only under a base this deployment claimed** (:mod:`airflow_ray._worker.checkpoint.marker`).
* **one bad run does not stop the sweep**: an owner that cannot be asked, a run directory that
  cannot be read or deleted is logged, counted as ``failed``, and skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from airflow_ray.outputs import OUTPUTS, connect
from airflow_ray.owners import running_owner_names
from airflow_ray.references import MARKER

log = logging.getLogger(__name__)


def collect(
    session: Any = None, *, dry_run: bool = False, grace_seconds: float | None = None
) -> dict[str, int]:
    """Free every registry entry of this deployment's owners that no XCom row refers to any more.

    It looks on the cluster of the XCom backend's connection (connecting to it if this process is
    not a driver yet). Other deployments on the same cluster have their own owners
    (:mod:`airflow_ray.deployment`) and are never looked at. ``grace_seconds`` defaults to
    ``[ray] gc_grace_seconds``; see the module docstring for what else keeps an entry.

    :returns: counts of ``kept`` and ``freed`` entries, and of owners or entries that ``failed``.
    """
    import ray

    from airflow_ray import config, deployment
    from airflow_ray.owners import get_owner

    connect()
    started = time.time()
    grace = config.gc_grace_seconds() if grace_seconds is None else grace_seconds
    counts = {"kept": 0, "freed": 0, "failed": 0}
    listed: list[tuple[Any, list[dict[str, Any]]]] = []
    for name in running_owner_names(deployment.current().id):
        try:
            owner = get_owner(name)
            listed.append((owner, ray.get(owner.entries.remote())))
        except Exception as exc:  # e.g. the owner died since it was listed
            _failed(counts, f"owner {name}", exc)
    db = _Snapshot.read(session, started)  # after the listing: see the module docstring
    for owner, entries in listed:
        for entry in entries:
            key = tuple(entry["key"])
            if (
                entry["object_id"] in db.referenced
                or started - entry["created"] < grace
                or key[:4] in db.unfinished_tasks
                or db.run_is_protected(*key[:2])
            ):
                counts["kept"] += 1
                continue
            try:
                if not dry_run:
                    ray.get(owner.release.remote(key))
                counts["freed"] += 1
            except Exception as exc:
                _failed(counts, f"entry {key}", exc)
    return counts


def expire_checkpoints(
    base_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retention_seconds: float,
    grace_seconds: float | None = None,
    session: Any = None,
    now: float | None = None,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete the checkpoints of runs under ``base_uri`` that are deleted or expired.

    A run's directory (``<base>/<dag_id>/<run_id>/``) goes when no DAG run of that id exists
    any more, or when it was last written more than ``retention_seconds`` ago (0: never) and the
    run is finished. Nothing written in the last ``grace_seconds`` (default
    ``[ray] gc_grace_seconds``) goes, manifest or not.

    :raises CheckpointBaseError: the base holds data but no marker of this deployment (a
        mistyped base, or another deployment's): nothing is deleted
        (:func:`airflow_ray.checkpoint.check_base`).
    :returns: counts of ``kept`` and ``deleted`` run directories, and of those that ``failed``.
    """
    from airflow_ray import checkpoint, config, deployment
    from airflow_ray.checkpoint import path_component

    options = storage_options or {}
    counts = {"kept": 0, "deleted": 0, "failed": 0}
    if not checkpoint.check_base(base_uri, options, deployment.current().id):
        return counts  # nothing there yet
    started = time.time()
    now = started if now is None else now
    grace = config.gc_grace_seconds() if grace_seconds is None else grace_seconds
    runs = list(  # listed before the DB is read: see the module docstring
        checkpoint.list_run_checkpoints(
            base_uri, options, on_error=lambda uri, exc: _failed(counts, f"checkpoints {uri}", exc)
        )
    )
    db = _Snapshot.read(session, started)
    live = {(path_component(dag_id), path_component(run_id)): (dag_id, run_id) for dag_id, run_id in db.runs}
    for run in runs:
        ids = live.get((run.dag, run.run))
        written = run.newest_written.timestamp() if run.newest_written else None
        if written is None or now - written < grace:  # no time to judge by, or too young
            counts["kept"] += 1
            continue
        expired = retention_seconds > 0 and now - written > retention_seconds
        if ids is not None and (not expired or db.run_is_protected(*ids)):
            counts["kept"] += 1
            continue
        try:
            if not dry_run:
                checkpoint.delete_checkpoint(run.uri, options)
            counts["deleted"] += 1
        except Exception as exc:
            _failed(counts, f"checkpoints {run.uri}", exc)
    return counts


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What the metadata DB says during one sweep (read after the store was listed)."""

    runs: dict[tuple[str, str], tuple[str | None, float]]
    """``(dag_id, run_id)``: the run's state and when it was created (epoch seconds)."""
    unfinished_tasks: frozenset[tuple[str, str, str, int]]
    """``(dag_id, run_id, task_id, map_index)`` of every task instance that is not finished."""
    referenced: frozenset[str]
    """Object ids that any XCom row claims to refer to.

    Not verified on purpose: a row only keeps its object alive here, and keeping too much is
    safe (the TTL still applies); freeing is never decided from a row's content."""
    started: float

    def run_is_protected(self, dag_id: str, run_id: str) -> bool:
        """A run that is not finished, or was created after the sweep started (its ids were
        reused since the store was listed): none of its data is judged."""
        from airflow.utils.state import DagRunState

        if (run := self.runs.get((dag_id, run_id))) is None:
            return False
        state, created = run
        return state not in (DagRunState.SUCCESS, DagRunState.FAILED) or created >= self.started

    @classmethod
    def read(cls, session: Any, started: float) -> _Snapshot:
        from airflow.utils.session import create_session

        if session is not None:
            return cls._scan(session, started)
        with create_session() as s:
            return cls._scan(s, started)

    @classmethod
    def _scan(cls, s: Any, started: float) -> _Snapshot:
        from airflow.models.dagrun import DagRun
        from airflow.models.taskinstance import TaskInstance
        from airflow.models.xcom import XComModel
        from airflow.utils.state import State

        runs = {
            (dag_id, run_id): (state, created.timestamp() if created else 0.0)
            for dag_id, run_id, state, created in s.query(
                DagRun.dag_id, DagRun.run_id, DagRun.state, DagRun.created_at
            ).yield_per(1000)
        }
        finished = list(State.finished)
        unfinished = s.query(
            TaskInstance.dag_id, TaskInstance.run_id, TaskInstance.task_id, TaskInstance.map_index
        )
        unfinished = unfinished.filter(TaskInstance.state.is_(None) | TaskInstance.state.not_in(finished))
        tasks = frozenset(tuple(row) for row in unfinished.yield_per(1000))
        referenced: set[str] = set()
        for (value,) in s.query(XComModel.value).yield_per(1000):
            referenced.update(_claimed_object_ids(_json(value)))
        return cls(runs, tasks, frozenset(referenced), started)


def _failed(counts: dict[str, int], what: str, exc: Exception) -> None:
    """One bad owner, entry or run: reported, and the sweep goes on."""
    counts["failed"] += 1
    log.warning("airflow-ray gc skipped %s: %s: %s", what, type(exc).__name__, exc)


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
