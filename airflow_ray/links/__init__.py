"""Operator extra links of airflow-ray: :class:`~airflow_ray.links.dashboard.RayDashboardLink`."""

from __future__ import annotations

from airflow_ray.links.dashboard import RayDashboardLink

__all__ = ["RayDashboardLink"]
