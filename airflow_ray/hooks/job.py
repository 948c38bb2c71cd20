"""``RayJobHook``: the Ray Jobs API (submit, status, logs, stop), blocking and async.

The blocking half wraps Ray's own ``JobSubmissionClient`` (it zips and uploads a local
``working_dir`` / ``py_modules``); the async half speaks the same REST API with ``aiohttp``,
so a trigger never blocks the triggerer's event loop. Both send the cluster token the way
Ray's dashboard expects it (``Authorization: Bearer``), see
:class:`~airflow_ray.hooks.ray.DashboardTarget`.

.. code-block:: python

    from airflow_ray.hooks.job import RayJobHook

    hook = RayJobHook("ray_default")
    job_id = hook.submit_job(entrypoint="python -c 'print(42)'", submission_id="demo-1")
    info = asyncio.run(hook.a_wait_for_job(job_id, on_log=print))  # prints 42
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_ray import config
from airflow_ray._api import public_api
from airflow_ray.exceptions import (
    RayAuthenticationError,
    RayConnectionError,
    ServiceTimeoutError,
    service_timeout,
)
from airflow_ray.hooks.ray import DashboardTarget, RayHook, http_token

if TYPE_CHECKING:
    import aiohttp
    from ray.job_submission import JobSubmissionClient

#: Ray job states that never change again (``ray.job_submission.JobStatus``).
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_TAIL_GRACE_S = 10.0
_AGENT_WAIT_S = 60.0


@public_api("beta")
class RayJobHook(RayHook):
    """Talks to a cluster's Jobs API.

    :param ray_conn_id: Airflow connection of type ``ray``; its ``dashboard_url`` extra and its
        token (password) are used. See :meth:`RayHook.get_dashboard` for the fallbacks.
    :param dashboard_url: an already resolved Jobs API URL (triggers pass the one the operator
        resolved, so the triggerer never starts or looks up an embedded cluster).
    :param local_token: with ``dashboard_url``: authenticate with the local token file.
    """

    def __init__(
        self,
        ray_conn_id: str = RayHook.default_conn_name,
        *,
        dashboard_url: str | None = None,
        local_token: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(ray_conn_id, **kwargs)
        self.dashboard_url = dashboard_url
        self.local_token = local_token

    @cached_property
    def dashboard(self) -> DashboardTarget:
        if self.dashboard_url is None:
            return self.get_dashboard()
        conn = self._connection()
        token = http_token(conn.password if conn else None, local_token=self.local_token)
        return DashboardTarget(self.dashboard_url, "given", self.local_token, token)

    @cached_property
    def client(self) -> JobSubmissionClient:
        """Ray's job client; each of its requests gives up after ``[ray] http_timeout_seconds``."""
        from airflow_ray import compat

        with self._bounded("the version check"):
            try:
                return compat.job_submission_client(
                    self.dashboard.url, self.dashboard.headers, config.http_timeout_seconds()
                )
            except ConnectionError as exc:
                raise RayConnectionError(
                    f"Ray Jobs API unreachable at {self.dashboard.url} (from {self.dashboard.source}): {exc}"
                ) from exc

    # -- blocking (the Airflow worker) ---------------------------------------------------------

    def submit_job(self, *, entrypoint: str, submission_id: str, **kwargs: Any) -> str:
        """Submit a job (uploading a local ``working_dir``); returns its submission id.

        A head whose dashboard agent has not registered yet (the first seconds after
        ``ray start``) answers "No available agent to submit job": nothing was submitted, so
        we retry for up to ``_AGENT_WAIT_S`` instead of failing the task.
        """
        deadline = time.monotonic() + _AGENT_WAIT_S
        while True:
            try:
                with self._bounded(f"the submission of job {submission_id}"):
                    return self.client.submit_job(
                        entrypoint=entrypoint, submission_id=submission_id, **kwargs
                    )
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                self.log.info("The Ray head has no job agent yet; retrying the submission")
                time.sleep(1.0)

    def get_job_status(self, submission_id: str) -> str | None:
        """The job's status (``PENDING``, ``RUNNING``, ``SUCCEEDED``...), or None if it does not exist."""
        try:
            with self._bounded(f"a status request for job {submission_id}"):
                return str(self.client.get_job_status(submission_id).value)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return None
            raise

    def stop_job(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL); True if it was still running."""
        with self._bounded(f"the stop request for job {submission_id}"):
            return self.client.stop_job(submission_id)

    def get_job_logs(self, submission_id: str) -> str:
        """The job's whole log so far."""
        with self._bounded(f"a log request for job {submission_id}"):
            return self.client.get_job_logs(submission_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._bounded("the job list request"):
            return [job.dict() for job in self.client.list_jobs()]

    # -- async (the triggerer, and the worker's wait loop) -------------------------------------

    async def a_get_job_info(self, submission_id: str) -> dict[str, Any]:
        """The job's details (``status``, ``message``, ``driver_exit_code``...)."""
        return await self._a_request("GET", f"/api/jobs/{submission_id}")

    async def a_get_job_logs(self, submission_id: str) -> str:
        return (await self._a_request("GET", f"/api/jobs/{submission_id}/logs"))["logs"]

    async def a_stop_job(self, submission_id: str) -> bool:
        return bool((await self._a_request("POST", f"/api/jobs/{submission_id}/stop"))["stopped"])

    async def a_tail_job_logs(self, submission_id: str) -> AsyncIterator[str]:
        """Chunks of the job's output as the driver writes them (Ray's websocket tail)."""
        import aiohttp

        session = await self._a_session()
        async with (
            session,
            session.ws_connect(f"{self.dashboard.url}/api/jobs/{submission_id}/logs/tail") as ws,
        ):
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                yield msg.data

    async def a_wait_for_job(
        self,
        submission_id: str,
        *,
        on_log: Callable[[str], None],
        poll_interval: float = 2.0,
    ) -> dict[str, Any]:
        """Stream the job's log lines to ``on_log`` until the job ends; return its final details.

        The websocket tail is fast but may drop (agent restart, proxy); the status is polled
        beside it, and once the job has ended the full log is fetched once and whatever the
        tail missed is emitted, so the last lines always arrive, exactly once.
        """
        lines = _LineSplitter(on_log)
        tail = asyncio.create_task(self._a_follow(submission_id, lines))
        try:
            while True:
                done, _ = await asyncio.wait({tail}, timeout=poll_interval)
                info = await self.a_get_job_info(submission_id)
                if info["status"] in TERMINAL_STATES:
                    if not done:
                        await asyncio.wait({tail}, timeout=_TAIL_GRACE_S)
                    break
        finally:
            tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail
        full = await self.a_get_job_logs(submission_id)
        if full.startswith(lines.seen):  # a re-started tail never repeats a line either
            lines.feed(full[len(lines.seen) :])
        lines.flush()
        return info

    # -- private -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _bounded(self, operation: str) -> Iterator[None]:
        """Turn ``requests``' timeout (what every client request now has) into an error naming
        the dashboard, the operation and the option that bounds it."""
        import requests

        try:
            yield
        except requests.exceptions.Timeout as exc:
            raise self._timeout(operation) from exc

    def _timeout(self, operation: str) -> ServiceTimeoutError:
        return service_timeout(
            f"The Ray Jobs API at {self.dashboard.url} (from {self.dashboard.source})",
            operation,
            config.http_timeout_seconds(),
            "http_timeout_seconds",
        )

    async def _a_follow(self, submission_id: str, lines: _LineSplitter) -> None:
        async for chunk in self.a_tail_job_logs(submission_id):
            lines.feed(chunk)

    async def _a_dashboard(self) -> DashboardTarget:
        """The dashboard target, resolved without blocking (connection lookup over the comms)."""
        if "dashboard" in self.__dict__:
            return self.__dict__["dashboard"]
        if self.dashboard_url is None:
            raise ValueError("RayJobHook's async methods need the resolved dashboard_url")
        try:
            conn = await self.aget_connection(self.ray_conn_id)
        except AirflowNotFoundException:
            conn = None
        password = conn.password if conn is not None else None
        token = await asyncio.to_thread(http_token, password, local_token=self.local_token)
        target = DashboardTarget(self.dashboard_url, "given", self.local_token, token)
        self.__dict__["dashboard"] = target
        return target

    async def _a_session(self) -> aiohttp.ClientSession:
        import aiohttp

        target = await self._a_dashboard()
        # No total limit: the log tail's websocket lives as long as the job. The status polls
        # beside it are bounded, and a dashboard that stops answering ends the wait through them.
        return aiohttp.ClientSession(
            headers=target.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.http_timeout_seconds()),
        )

    async def _a_request(self, method: str, path: str) -> Any:
        import aiohttp

        session = await self._a_session()
        url = f"{self.dashboard.url}{path}"
        timeout = aiohttp.ClientTimeout(total=config.http_timeout_seconds())
        try:
            async with session, session.request(method, url, timeout=timeout) as resp:
                body = await resp.text()
                if resp.status in (401, 403):
                    raise RayAuthenticationError(
                        f"The Ray Jobs API at {self.dashboard.url} rejected our token ({resp.status}): "
                        "put the cluster's token in the connection's password field or RAY_AUTH_TOKEN."
                    )
                if resp.status != 200:
                    raise RuntimeError(f"{method} {url} failed ({resp.status}): {body[:500]}")
                return await resp.json(content_type=None)
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors
            raise self._timeout(f"{method} {path}") from exc
        except aiohttp.ClientConnectionError as exc:
            raise RayConnectionError(f"Ray Jobs API unreachable at {self.dashboard.url}: {exc}") from exc


class _LineSplitter:
    """Turns log chunks into whole lines for ``on_log``; remembers everything it was fed."""

    def __init__(self, on_log: Callable[[str], None]) -> None:
        self._on_log = on_log
        self._partial = ""
        self.seen = ""

    def feed(self, chunk: str) -> None:
        self.seen += chunk
        *complete, self._partial = (self._partial + chunk).split("\n")
        for line in complete:
            self._on_log(line)

    def flush(self) -> None:
        if self._partial:
            self._on_log(self._partial)
            self._partial = ""
