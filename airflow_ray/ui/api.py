"""The Ray view's FastAPI app: its pages and JSON endpoints, each checked by Airflow's auth manager.

Mounted by the provider's plugin (:mod:`airflow_ray.plugin`) at ``/airflow-ray`` on the API
server. Airflow does not authenticate a plugin's app, so every route here asks for the user
(:func:`airflow_ray.compat.airflow_ui_user`: the UI's ``_token`` cookie, or a ``Bearer`` token
from ``POST /auth/token``) and asks the auth manager whether that user may do what the route does:

========================================  ===========================================================
route                                     allowed to
========================================  ===========================================================
``GET /runs/{dag_id}/{run_id}`` (page)    read the DAG's XComs (``is_authorized_dag(GET, XCOM)``)
``GET /api/runs/{dag_id}/{run_id}``       the same
``GET /`` (page), ``GET /api/cluster``    see cluster activity; the chart lists only runs of DAGs
                                          the user may read (``get_authorized_dag_ids``)
``POST /api/free/{dag_id}/{run_id}``      edit the DAG (``is_authorized_dag(PUT)``), and only with a
                                          ``Bearer`` token or the :data:`CSRF_HEADER` header
========================================  ===========================================================

The UI's cookie is ``SameSite=Lax``, which already keeps it off cross-site form posts; the header
also refuses a same-site one (another app on a sibling host): a form cannot set a header, and a
script on another origin cannot send one without a CORS preflight that the API server refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse

from airflow_ray import compat
from airflow_ray.ui import inventory, page

#: The header the page's script sends with a POST (any value): proof it is not a bare form post.
CSRF_HEADER = "X-Airflow-Ray-Request"

app = FastAPI(title="airflow-ray: the Ray view", openapi_url=None, docs_url=None, redoc_url=None)
User = Annotated[Any, Depends(compat.airflow_ui_user())]


@app.get("/", response_class=HTMLResponse)
def cluster_page(request: Request, user: User) -> str:
    _require_cluster_view(user)
    return page.render(request.scope.get("root_path", ""))


@app.get("/runs/{dag_id}/{run_id:path}", response_class=HTMLResponse)
def run_page(request: Request, dag_id: str, run_id: str, user: User) -> str:
    _require_dag(user, "GET", dag_id)
    return page.render(request.scope.get("root_path", ""), dag_id, run_id)


@app.get("/ray.js")
def script() -> FileResponse:
    """The page's script (static: no data in it)."""
    return FileResponse(Path(page.__file__).with_name("ray.js"), media_type="text/javascript")


@app.get("/api/cluster")
def cluster(user: User) -> dict[str, Any]:
    _require_cluster_view(user)
    readable = compat.airflow_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    return inventory.cluster(readable.__contains__)


@app.get("/api/runs/{dag_id}/{run_id:path}")
def run_outputs(dag_id: str, run_id: str, user: User) -> dict[str, Any]:
    _require_dag(user, "GET", dag_id)
    try:
        return inventory.run_outputs(dag_id, run_id)
    except inventory.RunNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


@app.post("/api/free/{dag_id}/{run_id:path}")
def free_run(request: Request, dag_id: str, run_id: str, user: User) -> dict[str, Any]:
    """Free the run's objects in Ray (its XCom rows stay); what was freed."""
    _require_not_a_form_post(request)
    _require_dag(user, "PUT", dag_id)
    try:
        return inventory.free_run(dag_id, run_id)
    except inventory.RunNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


def _require_dag(user: Any, method: str, dag_id: str) -> None:
    """403 unless the auth manager lets ``user`` read (GET: the DAG's XComs) or edit (PUT) the DAG."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    entity = DagAccessEntity.XCOM if method == "GET" else None
    details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
    if not compat.airflow_auth_manager().is_authorized_dag(
        method=method, access_entity=entity, details=details, user=user
    ):
        what = "read the outputs of" if method == "GET" else "free the Ray objects of"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"User {user.get_name()!r} may not {what} DAG {dag_id!r}: "
            f"{'reading' if method == 'GET' else 'editing'} the DAG is required.",
        )


def _require_cluster_view(user: Any) -> None:
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView

    if not compat.airflow_auth_manager().is_authorized_view(
        access_view=AccessView.CLUSTER_ACTIVITY, user=user
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"User {user.get_name()!r} may not see the Ray cluster: the cluster activity view is required.",
        )


def _require_not_a_form_post(request: Request) -> None:
    """Refuse a state change that only a cookie authenticates, unless the page's header came with it."""
    bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
    if not bearer and CSRF_HEADER not in request.headers:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Refused: this request carries neither an 'Authorization: Bearer <token>' header nor "
            f"'{CSRF_HEADER}' (sent by the Ray view's button). A form post from another page cannot "
            "free a run's objects; API clients send a token from POST /auth/token.",
        )
