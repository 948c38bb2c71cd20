"""``RaySubmitJobOperator``: run an existing Ray script as a Ray Job, watched from Airflow.

.. code-block:: python

    from airflow_ray.operators import RaySubmitJobOperator

    RaySubmitJobOperator(
        task_id="train",
        entrypoint="python train.py --date {{ ds }}",
        runtime_env={"working_dir": "/opt/jobs/train", "pip": ["xgboost"]},
        entrypoint_num_cpus=1,
    )

The job's output streams into the task log as it is written (and completely: the last lines
are fetched again once the job has ended); the job's final status becomes the task's, with the
tail of the job log in the error. Nothing is left running behind Airflow's back: a kill,
``execution_timeout``, a deferral timeout and marking a deferred task failed all stop the job.

A retry finds the job of the previous try through the task state store (Airflow 3.3's
``ResumableJobMixin``): a job that still runs is re-attached to, a succeeded one is not run
again, a failed or stopped one is submitted anew under the new try's id.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ResumableJobMixin, conf
from airflow.sdk.exceptions import AirflowException

from airflow_ray import deployment
from airflow_ray._api import public_api
from airflow_ray.hooks import RayHook
from airflow_ray.hooks.job import TERMINAL_STATES, RayJobHook
from airflow_ray.lineage import RayLineage, RayLineageMixin
from airflow_ray.links.dashboard import RayDashboardLink, job_url
from airflow_ray.triggers.job import RayJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import RuntimeTaskInstanceProtocol

#: Lines of the job log quoted in the error of a failed job.
LOG_TAIL_LINES = 30
_ACTIVE = frozenset({"PENDING", "RUNNING"})
_MISSING = "MISSING"


@public_api("beta")
class RaySubmitJobOperator(RayLineageMixin, ResumableJobMixin, BaseOperator):
    """Submits ``entrypoint`` through the Ray Jobs API and waits for it; returns the submission id.

    With the OpenLineage provider, its run events carry the job's id, driver node, requested
    resources and dashboard page (:mod:`airflow_ray.lineage`).

    :param entrypoint: shell command of the job, e.g. ``python train.py`` (templated).
    :param runtime_env: Ray runtime environment; a local ``working_dir`` is zipped and
        uploaded by Ray's job client (templated).
    :param metadata: string metadata stored with the job; the task instance's identity
        (``airflow_dag_id``, ``airflow_run_id``, ...) and the deployment's id
        (``airflow_deployment``) are added (templated).
    :param entrypoint_num_cpus: CPUs reserved for the entrypoint process itself.
    :param entrypoint_num_gpus: GPUs reserved for the entrypoint process itself.
    :param entrypoint_memory: bytes of memory reserved for the entrypoint process itself.
    :param entrypoint_resources: custom resources reserved for the entrypoint process.
    :param ray_conn_id: ``ray`` connection; its ``dashboard_url`` extra and token are used
        (see :meth:`~airflow_ray.hooks.RayHook.get_dashboard` for the fallbacks).
    :param wait_for_completion: wait for the job to end (default); if False the task succeeds
        once the job is submitted.
    :param deferrable: wait in the triggerer (:class:`~airflow_ray.triggers.job.RayJobTrigger`)
        instead of a worker slot.
    :param poll_interval: seconds between status checks while the log streams.
    :param durable: re-attach to the previous try's job on retry (Airflow's resumable jobs).
    """

    template_fields: Sequence[str] = (
        "entrypoint",
        "runtime_env",
        "metadata",
        "entrypoint_resources",
        "ray_conn_id",
    )
    template_fields_renderers = {"entrypoint": "bash", "runtime_env": "json", "metadata": "json"}
    operator_extra_links = (RayDashboardLink(),)
    external_id_key = "ray_submission_id"
    ui_color = "#d0e6ff"

    def __init__(
        self,
        *,
        entrypoint: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        entrypoint_memory: int | None = None,
        entrypoint_resources: dict[str, float] | None = None,
        ray_conn_id: str = RayHook.default_conn_name,
        wait_for_completion: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.entrypoint = entrypoint
        self.runtime_env = runtime_env
        self.metadata = metadata
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.entrypoint_num_gpus = entrypoint_num_gpus
        self.entrypoint_memory = entrypoint_memory
        self.entrypoint_resources = entrypoint_resources
        self.ray_conn_id = ray_conn_id
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.submission_id: str | None = None
        self.ray_dashboard_link: str | None = None
        self._finished = False
        requested = {
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
            "entrypoint_memory": entrypoint_memory,
            "entrypoint_resources": entrypoint_resources,
        }
        self.ray_lineage = RayLineage(
            kind="job", resources={k: v for k, v in requested.items() if v is not None}
        )

    @cached_property
    def hook(self) -> RayJobHook:
        return RayJobHook(self.ray_conn_id)

    def execute(self, context: Context) -> str:
        self.execute_resumable(context)
        assert self.submission_id is not None  # every path of execute_resumable attaches a job
        return self.submission_id

    # -- ResumableJobMixin -------------------------------------------------------------------

    def submit_job(self, context: Context) -> str:
        ti = context["ti"]
        tenant = deployment.current().id
        submission_id = job_submission_id(ti, tenant)
        metadata = {**(self.metadata or {}), **_identity(ti), "airflow_deployment": tenant}
        self.hook.submit_job(
            entrypoint=self.entrypoint,
            submission_id=submission_id,
            runtime_env=self.runtime_env,
            metadata={k: str(v) for k, v in metadata.items()},
            entrypoint_num_cpus=self.entrypoint_num_cpus,
            entrypoint_num_gpus=self.entrypoint_num_gpus,
            entrypoint_memory=self.entrypoint_memory,
            entrypoint_resources=self.entrypoint_resources,
        )
        self.log.info("Submitted Ray job %s to %s", submission_id, self.hook.dashboard.url)
        return submission_id

    def get_job_status(self, external_id: Any, context: Context) -> str:
        return self.hook.get_job_status(str(external_id)) or _MISSING

    def is_job_active(self, status: str) -> bool:
        return status in _ACTIVE

    def is_job_succeeded(self, status: str) -> bool:
        return status == "SUCCEEDED"

    def poll_until_complete(self, external_id: Any, context: Context) -> None:
        submission_id = self._attach(str(external_id), context)
        if not self.wait_for_completion:
            return
        if self.deferrable and self.hook.get_job_status(submission_id) not in TERMINAL_STATES:
            dashboard = self.hook.dashboard
            self.defer(
                trigger=RayJobTrigger(
                    submission_id=submission_id,
                    ray_conn_id=self.ray_conn_id,
                    dashboard_url=dashboard.url,
                    local_token=dashboard.local_token,
                    poll_interval=self.poll_interval,
                ),
                method_name="execute_complete",
                timeout=self.execution_timeout,
            )
        info = asyncio.run(
            self.hook.a_wait_for_job(submission_id, on_log=self._log_line, poll_interval=self.poll_interval)
        )
        self.ray_lineage.node_id = info.get("driver_node_id")
        self._finish(submission_id, info["status"], info.get("message"))

    def get_job_result(self, external_id: Any, context: Context) -> str:
        submission_id = self._attach(str(external_id), context)
        self.log.info("Ray job %s already succeeded in an earlier try; not running it again", external_id)
        return submission_id

    # -- deferral ----------------------------------------------------------------------------

    def execute_complete(self, context: Context, event: dict[str, Any]) -> str:
        """Resumed from :class:`RayJobTrigger`: the job has ended (or could not be watched)."""
        if not isinstance(event, dict) or "submission_id" not in event:
            raise AirflowException(f"Unexpected event from RayJobTrigger: {event!r}")
        submission_id = self._attach(event["submission_id"], context, push=False)
        self._finish(submission_id, event.get("job_status", "UNKNOWN"), event.get("message"))
        return submission_id

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """A deferral timeout resumes the task only to fail it: stop the job first."""
        if next_method == "__fail__":
            submission_id = context["task_state_store"].get(self.external_id_key)
            if submission_id:
                self.submission_id = str(submission_id)
                self.on_kill()
        return super().resume_execution(next_method, next_kwargs, context)

    def on_kill(self) -> None:
        """The task is killed or timed out: stop the job, so no work is orphaned."""
        if self.submission_id is None or self._finished:
            return
        try:
            stopped = self.hook.stop_job(self.submission_id)
            self.log.warning("Stopped Ray job %s (was running: %s)", self.submission_id, stopped)
        except Exception:
            self.log.exception("Could not stop Ray job %s", self.submission_id)

    # -- private -----------------------------------------------------------------------------

    def _attach(self, submission_id: str, context: Context, *, push: bool = True) -> str:
        """Remember the job (for on_kill) and publish its dashboard link before waiting."""
        self.submission_id = submission_id
        dashboard = self.hook.dashboard
        self.ray_dashboard_link = job_url(dashboard.url, submission_id)
        self.ray_lineage.job_id, self.ray_lineage.page_url = submission_id, self.ray_dashboard_link
        self.ray_lineage.dashboard_url = dashboard.url
        if push and self.ray_dashboard_link:
            context["ti"].xcom_push(key=RayDashboardLink().xcom_key, value=self.ray_dashboard_link)
        return submission_id

    def _log_line(self, line: str) -> None:
        self.log.info("[ray job] %s", line)

    def _finish(self, submission_id: str, status: str, message: str | None) -> None:
        self._finished = True
        if status == "SUCCEEDED":
            self.log.info("Ray job %s succeeded", submission_id)
            return
        try:
            logs = self.hook.get_job_logs(submission_id)
        except Exception as exc:  # the status is the news; the log tail is a courtesy
            logs = f"(could not fetch the job log: {exc})"
        tail = "\n".join(logs.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])
        summary = (message or "").strip().splitlines()[0] if message and message.strip() else ""
        raise AirflowException(
            f"Ray job {submission_id} ended {status}"
            f"{': ' + summary if summary else ''} (dashboard: {self.hook.dashboard.url}).\n"
            f"Last {LOG_TAIL_LINES} lines of the job log:\n{tail}"
        )


def job_submission_id(ti: RuntimeTaskInstanceProtocol, deployment_id: str) -> str:
    """A submission id that names the task instance and try, deterministically.

    Readable (``airflow-<dag>.<task>[.<map index>].<run id>``, cut to a sane length) plus a hash
    of the untruncated key and the deployment, so two task instances never share an id, nor do
    two Airflow deployments on one cluster whose DAG and run ids are the same (Ray refuses a
    second job under an id: the other deployment's task would fail). One id per try, because
    Ray refuses to reuse a submission id and a failed try's job must stay inspectable.
    """
    mapped = ti.map_index is not None and ti.map_index >= 0
    key = f"{ti.dag_id}.{ti.task_id}{f'.{ti.map_index}' if mapped else ''}.{ti.run_id}"
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:96]
    digest = hashlib.sha256(f"{deployment_id}\0{key}".encode()).hexdigest()[:8]
    return f"airflow-{readable}-{digest}-try{ti.try_number}"


def _identity(ti: RuntimeTaskInstanceProtocol) -> dict[str, Any]:
    return {
        "airflow_dag_id": ti.dag_id,
        "airflow_run_id": ti.run_id,
        "airflow_task_id": ti.task_id,
        "airflow_map_index": ti.map_index,
        "airflow_try_number": ti.try_number,
    }
