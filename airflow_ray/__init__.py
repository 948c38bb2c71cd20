"""Run Python functions on Ray from Apache Airflow 3, with Ray's object store as XCom.

.. code-block:: python

    from airflow.sdk import dag, task
    from airflow_ray import ray_task


    @dag
    def pipeline():
        @ray_task(num_cpus=1)
        def square(x: int) -> int:
            return x * x

        @task
        def show(v: int) -> None:
            print(v)

        show(square(7))

This module stays import-light on purpose: Airflow imports the configured XCom backend
(``airflow_ray.xcom``) while it is itself still initialising, so importing the decorator here
eagerly would create a circular import. Public names are resolved lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from airflow_ray.version import __version__

if TYPE_CHECKING:
    from airflow_ray.decorators import ray_task
    from airflow_ray.hooks import RayHook
    from airflow_ray.provider_info import get_provider_info
    from airflow_ray.xcom import RayXComBackend

__all__ = ["RayHook", "RayXComBackend", "__version__", "get_provider_info", "ray_task"]

_LAZY = {
    "ray_task": "airflow_ray.decorators",
    "RayHook": "airflow_ray.hooks",
    "RayXComBackend": "airflow_ray.xcom",
    "get_provider_info": "airflow_ray.provider_info",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'airflow_ray' has no attribute {name!r}")
