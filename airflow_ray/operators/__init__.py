"""Operators: Python callables on Ray (``RayPythonOperator``), Ray Jobs (``RaySubmitJobOperator``),
models on Ray Serve (``RayServeDeployOperator``, ``RayServeDeleteOperator``).

Each operator lives in its own module; this package re-exports them lazily so that
``from airflow_ray.operators import RayPythonOperator`` keeps working and importing one
operator does not import the others' dependencies.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_ray.operators.job import RaySubmitJobOperator
    from airflow_ray.operators.python import RayPythonOperator
    from airflow_ray.operators.serve import RayServeDeleteOperator, RayServeDeployOperator

__all__ = ["RayPythonOperator", "RayServeDeleteOperator", "RayServeDeployOperator", "RaySubmitJobOperator"]

_LAZY = {
    "RayPythonOperator": "airflow_ray.operators.python",
    "RaySubmitJobOperator": "airflow_ray.operators.job",
    "RayServeDeployOperator": "airflow_ray.operators.serve",
    "RayServeDeleteOperator": "airflow_ray.operators.serve",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'airflow_ray.operators' has no attribute {name!r}")
