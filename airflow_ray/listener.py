"""An Airflow listener that tells the XCom backend what the running task asks for.

Airflow pushes a task's return value after it has left the task's context, so the XCom
backend cannot look up the task's ``default_args`` then. This listener runs inside that context,
as the task starts, and hands the backend what it will need at push time (checkpoint settings
of plain ``@task`` s). Registered by :class:`airflow_ray.plugin.AirflowRayPlugin`.
"""

from __future__ import annotations

from typing import Any

from airflow.listeners import hookimpl


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    from airflow_ray import xcom

    xcom.task_starting(task_instance)
