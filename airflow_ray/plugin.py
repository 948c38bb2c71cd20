"""The Airflow plugin of airflow-ray (entry point ``airflow.plugins``): registers its listener."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_ray import listener


class AirflowRayPlugin(AirflowPlugin):
    name = "airflow_ray"
    listeners = [listener]
