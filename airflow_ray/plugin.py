"""The Airflow plugin of airflow-ray (entry point ``airflow.plugins``): its listener, and the Ray
view in the UI (:mod:`airflow_ray.ui`)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_ray import listener, ui


class AirflowRayPlugin(AirflowPlugin):
    name = "airflow_ray"
    listeners = [listener]
    fastapi_apps = [ui.FASTAPI_APP]
    external_views = ui.EXTERNAL_VIEWS
