"""Triggers of airflow-ray: :class:`~airflow_ray.triggers.job.RayJobTrigger`."""

from __future__ import annotations

from airflow_ray.triggers.job import RayJobTrigger

__all__ = ["RayJobTrigger"]
