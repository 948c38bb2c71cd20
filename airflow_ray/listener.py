"""Airflow listeners of airflow-ray, registered by :class:`airflow_ray.plugin.AirflowRayPlugin`.

* As a task starts: Airflow pushes a task's return value after it has left the task's context,
  so the XCom backend cannot look up the task's ``default_args`` then. This listener runs inside
  that context and hands the backend what it will need at push time (checkpoint settings of
  plain ``@task`` s).
* As a scheduler starts: the deployment's identity is created if there is none yet, and Ray is
  imported before the LocalExecutor forks its workers (see :func:`on_starting`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    from airflow_ray import outputs

    outputs.task_starting(task_instance)


@hookimpl
def on_starting(component: Any) -> None:
    """Import Ray into a scheduler before its LocalExecutor forks the processes that run tasks.

    With the fork start method the executor's workers are forked from the scheduler after this
    hook (``Job.__init__`` calls it, ``executor.start()`` comes later) and fork every task
    process in turn, so each task process inherits Ray already imported (:mod:`airflow_ray.preload`).
    ``[ray] preload_in_scheduler`` turns it off.
    """
    if not _is_scheduler_job(component):
        return
    _ensure_deployment_identity()
    if not _forks_local_tasks():
        return
    from airflow_ray import config

    if config.preload_in_scheduler():
        from airflow_ray import preload

        log.info("airflow-ray: Ray %s imported before the LocalExecutor forks", preload.RAY_VERSION)


def _ensure_deployment_identity() -> None:
    """Create the deployment's secret (:mod:`airflow_ray.deployment`) before the scheduler queues
    any task.

    Otherwise the first task processes of a brand-new deployment create it, and two of them
    running at once each wrote one: the consumer then refused the producer's reference as another
    deployment's (seen in CI). The scheduler starts before any task it queues, so creating it
    here leaves tasks only reading it. A failure is logged, not raised: the scheduler must start,
    and tasks report the problem with their own clear error.
    """
    from airflow_ray import deployment

    try:
        found, created = deployment.init()
    except Exception:
        log.exception("airflow-ray: could not read or create the deployment identity")
        return
    log.info("airflow-ray: deployment %r (%s)", found.id, "identity created" if created else "identity found")


def _is_scheduler_job(component: Any) -> bool:
    """A scheduler's Job, told by the command line: the hook runs before the Job knows its type.

    Task processes forked by the scheduler's executor keep its command line, but what they start
    is no Job (and ``airflow.jobs.job`` is only loaded where Jobs are).
    """
    job_module = sys.modules.get("airflow.jobs.job")
    return job_module is not None and isinstance(component, job_module.Job) and sys.argv[1:2] == ["scheduler"]


def _forks_local_tasks() -> bool:
    import multiprocessing

    from airflow.configuration import conf

    return multiprocessing.get_start_method() == "fork" and "LocalExecutor" in conf.get("core", "executor")
