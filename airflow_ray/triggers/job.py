"""``RayJobTrigger``: waits for a Ray job in the triggerer, streaming its log into the task log.

Everything it does is async (``aiohttp`` against the Jobs API, see
:class:`~airflow_ray.hooks.job.RayJobHook`); it serializes only the submission id, the connection id
and the resolved dashboard URL, never the token: the token is looked up again from the
connection (or the local token file of the embedded cluster) when the trigger runs.

.. code-block:: python

    RaySubmitJobOperator(task_id="train", entrypoint="python train.py", deferrable=True)
    # -> defers with RayJobTrigger(submission_id=..., ray_conn_id=..., dashboard_url=...)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_ray._api import public_api
from airflow_ray.hooks.job import RayJobHook


@public_api("beta")
class RayJobTrigger(BaseTrigger):
    """Fires one event when the job reaches a terminal state: ``{"status", "message", "submission_id"}``.

    ``status`` is ``"success"`` only for a ``SUCCEEDED`` job, ``"error"`` otherwise (the job
    failed or was stopped, or the Jobs API could not be reached); ``job_status`` carries Ray's.
    A user marking the deferred task failed (or clearing it) stops the job: :meth:`on_kill`.

    :param submission_id: the Ray job to wait for.
    :param ray_conn_id: connection whose token authenticates us to the dashboard.
    :param dashboard_url: the Jobs API URL the operator resolved.
    :param local_token: authenticate with the embedded cluster's local token file.
    :param poll_interval: seconds between status checks beside the log stream.
    """

    def __init__(
        self,
        *,
        submission_id: str,
        ray_conn_id: str,
        dashboard_url: str,
        local_token: bool = False,
        poll_interval: float = 2.0,
    ) -> None:
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.dashboard_url = dashboard_url
        self.local_token = local_token
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "dashboard_url": self.dashboard_url,
                "local_token": self.local_token,
                "poll_interval": self.poll_interval,
            },
        )

    def _hook(self) -> RayJobHook:
        return RayJobHook(self.ray_conn_id, dashboard_url=self.dashboard_url, local_token=self.local_token)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            info = await self._hook().a_wait_for_job(
                self.submission_id,
                on_log=lambda line: self.log.info("[ray job] %s", line),
                poll_interval=self.poll_interval,
            )
        except Exception as exc:
            yield TriggerEvent({"status": "error", "submission_id": self.submission_id, "message": f"{exc}"})
            return
        yield TriggerEvent(
            {
                "status": "success" if info["status"] == "SUCCEEDED" else "error",
                "job_status": info["status"],
                "submission_id": self.submission_id,
                "message": info.get("message") or "",
            }
        )

    async def on_kill(self) -> None:
        """The user marked the deferred task failed / cleared it: stop the job (no orphan)."""
        stopped = await self._hook().a_stop_job(self.submission_id)
        self.log.warning("Stopped Ray job %s (was running: %s)", self.submission_id, stopped)
