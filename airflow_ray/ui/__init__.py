"""The "Ray" view in the Airflow UI: a DAG run's outputs in Ray, the cluster, and freeing a run.

Registered by the provider's plugin (:mod:`airflow_ray.plugin`): :data:`FASTAPI_APP` is mounted
on the API server at :data:`URL_PREFIX`, and :data:`EXTERNAL_VIEWS` add a "Ray" tab to every DAG
run and a "Ray" entry to the navigation, both showing its page in the UI. See ``docs/ui.md``.

* :mod:`.api`: the routes and who may call them (Airflow's auth manager);
* :mod:`.inventory`: what they show, read from the metadata DB and the cluster;
* :mod:`.page` (with ``page.html`` and ``ray.js``): the page, filled in the browser.
"""

from __future__ import annotations

from typing import Any

URL_PREFIX = "/airflow-ray"


class _App:
    """An ASGI app that imports :mod:`.api` on its first request.

    Every Airflow process imports the plugin (its listener runs in task processes), and only the
    API server serves the view: FastAPI and the view's imports are paid there alone.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from airflow_ray.ui.api import app

        await app(scope, receive, send)


FASTAPI_APP = {"app": _App(), "url_prefix": URL_PREFIX, "name": "airflow-ray: the Ray view"}
#: Relative hrefs: the UI resolves them against its base URL, so a deployment under a path works.
EXTERNAL_VIEWS = [
    {
        "name": "Ray",
        "href": f"{URL_PREFIX.lstrip('/')}/runs/{{DAG_ID}}/{{RUN_ID}}",
        "destination": "dag_run",
        "url_route": "ray",
    },
    {
        "name": "Ray",
        "href": f"{URL_PREFIX.lstrip('/')}/",
        "destination": "nav",
        "category": "browse",
        "url_route": "ray-cluster",
    },
]
