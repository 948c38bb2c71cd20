"""Hooks of airflow-ray: :class:`RayHook` (a Ray cluster as a driver) and :class:`RayJobHook` (Jobs API).

``from airflow_ray.hooks import RayHook`` is the public path; the hooks live in
:mod:`airflow_ray.hooks.ray` and :mod:`airflow_ray.hooks.job`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_ray.hooks.ray import RayHook

if TYPE_CHECKING:
    from airflow_ray.hooks.job import RayJobHook

__all__ = ["RayHook", "RayJobHook"]


def __getattr__(name: str) -> Any:
    if name == "RayJobHook":  # imports aiohttp: only when asked for
        from airflow_ray.hooks.job import RayJobHook

        return RayJobHook
    raise AttributeError(f"module 'airflow_ray.hooks' has no attribute {name!r}")
