"""``RayDashboardLink``: the "Ray Dashboard" button on a task instance.

Airflow 3 calls ``get_link`` in the task process when the task ends and stores the URL as the
XCom ``_link_RayDashboardLink``; the UI reads that row (an empty URL hides the button, so a
cluster without a dashboard gets none). The job operator also pushes the URL as soon as the
job is submitted, so the button works while the job runs.

* ``RaySubmitJobOperator``: the job's page, ``<dashboard>/#/jobs/<submission id>``.
* ``@ray_task`` (``RayPythonOperator``): the page of the DAG run's owner actor, which submits
  the run's Ray tasks (``<dashboard>/#/actors/<actor id>``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink

from airflow_ray._api import public_api

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: How long the link waits for the owner to say its id (it answers in ~1 ms when alive).
_OWNER_TIMEOUT_S = 5.0


@public_api("beta")
class RayDashboardLink(BaseOperatorLink):
    """Reads the URL the operator set in ``ray_dashboard_link`` (empty: no dashboard, no button)."""

    name = "Ray Dashboard"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return getattr(operator, "ray_dashboard_link", None) or ""


def job_url(dashboard_url: str | None, submission_id: str) -> str | None:
    """The dashboard page of one Ray job."""
    return f"{dashboard_url.rstrip('/')}/#/jobs/{submission_id}" if dashboard_url else None


def owner_url(dashboard_url: str | None, owner_name: str) -> str | None:
    """The dashboard page of a DAG run's owner actor; None without a dashboard or an owner.

    A missing or unresponsive owner (the task failed before it reached Ray) only means no
    button. The actor id comes from the owner itself: ``__ray_call__`` (a developer API of every
    actor) runs the public ``get_runtime_context().get_actor_id()`` there. Ray 2.60's
    ``ActorHandle`` has no public id getter, and ``ray.util.state.list_actors`` asks the
    dashboard (5-80 ms, against ~1 ms for this call; measured).
    """
    if not dashboard_url:
        return None
    import ray

    from airflow_ray.owners import get_owner

    try:
        actor = get_owner(owner_name)
        # Runs in the actor (which it is passed). A lambda is pickled by value: the cluster
        # needs no airflow-ray, as for every Ray-side function (see airflow_ray._worker).
        own_id = actor.__ray_call__.remote(lambda _actor: ray.get_runtime_context().get_actor_id())
        actor_id = ray.get(own_id, timeout=_OWNER_TIMEOUT_S)
    except (ValueError, ray.exceptions.RayError):  # ValueError: ray.get_actor found no such actor
        return None
    return f"{dashboard_url.rstrip('/')}/#/actors/{actor_id}"
