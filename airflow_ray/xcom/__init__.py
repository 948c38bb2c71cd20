"""The Ray XCom backend: ``AIRFLOW__CORE__XCOM_BACKEND=airflow_ray.xcom.RayXComBackend``.

Airflow imports this package while it is itself still initialising: it imports only
:mod:`airflow_ray.xcom.backend`, which keeps its module-level imports to ``BaseXCom``.
"""

from __future__ import annotations

from airflow_ray.xcom.backend import RayXComBackend

__all__ = ["RayXComBackend"]
