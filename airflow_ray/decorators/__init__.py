"""TaskFlow decorators of airflow-ray: :func:`~airflow_ray.decorators.ray.ray_task` (``@task.ray``)."""

from __future__ import annotations

from airflow_ray.decorators.ray import ray_task

__all__ = ["ray_task"]
