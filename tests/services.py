"""A real Airflow on loopback for end-to-end tests: api-server, scheduler, dag-processor, triggerer.

``dag.test()`` runs every task in the test process; these services run each task instance in its
own process under the ``LocalExecutor`` (SQLite), and deferred tasks in a real triggerer, as a
deployment does. One stack per test session (see the ``airflow_services`` fixture in conftest):
starting it costs ~30-60 s on a small machine.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TESTS, new_airflow_home

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: The simple auth manager's users: (role, password). The viewer may read DAGs but not edit them.
USERS = {"admin": ("admin", "admin"), "viewer": ("viewer", "viewer")}


@dataclass
class AirflowServices:
    env: dict[str, str]
    home: Path
    url: str

    @property
    def db(self) -> Path:
        return self.home / "airflow.db"

    @property
    def logs(self) -> Path:
        return self.home / "service-logs"

    def api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Query the metadata DB (``?`` placeholders)."""
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, *params: Any) -> Any:
        rows = self.rows(sql, *params)
        return rows[0][0] if rows else None

    def airflow(self, *args: str) -> str:
        """Run the ``airflow`` CLI against this deployment."""
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=self.env, check=True, capture_output=True, text=True
        )
        return proc.stdout

    def wait_for_dag(self, dag_id: str, timeout: float = 240) -> None:
        wait(
            lambda: self.scalar("select count(*) from dag where dag_id=?", dag_id),
            f"{dag_id} parsed",
            timeout,
        )

    def token(self, user: str = "admin") -> str:
        """A JWT for one of :data:`USERS` from ``POST /auth/token``, as an API client gets one."""
        request = urllib.request.Request(
            f"{self.url}/auth/token",
            data=json.dumps({"username": user, "password": USERS[user][1]}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["access_token"]

    def api(self, method: str, path: str, body: dict[str, Any]) -> Any:
        """Call the REST API (``/api/v2/...``) as the admin. Cheaper than an ``airflow`` CLI
        process (~8 s CPU)."""
        request = urllib.request.Request(
            f"{self.url}/api/v2/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token()}"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path} -> {exc.code}: {exc.read()[:2000]!r}") from exc

    def trigger(self, dag_id: str, run_id: str) -> None:
        self.wait_for_dag(dag_id)
        self.api("POST", f"dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None})

    def wait_for_end(self, dag_id: str, run_id: str, timeout: float = 420) -> str:
        """Wait until the run ends (``TimeoutError`` after ``timeout`` s); its state."""
        sql = "select state from dag_run where dag_id=? and run_id=?"
        wait(lambda: self.scalar(sql, dag_id, run_id) in ("success", "failed"), f"run {run_id}", timeout)
        return self.scalar(sql, dag_id, run_id)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 420) -> None:
        """Wait until the run ends; fail with its task states and the scheduler's log unless it succeeded."""
        if (state := self.wait_for_end(dag_id, run_id, timeout)) != "success":
            tis = self.rows(
                "select task_id, map_index, state from task_instance where dag_id=? and run_id=?",
                dag_id,
                run_id,
            )
            scheduler_log = (self.logs / "scheduler.log").read_text()[-3000:]
            pytest.fail(f"run {run_id} of {dag_id} ended {state}: {tis}\n{scheduler_log}")

    #: The XCom value as JSON text (a JSON column in other databases).
    xcom_value_sql = "value"

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1):
        value = self.scalar(
            f"select {self.xcom_value_sql} from xcom"
            " where dag_id=? and run_id=? and task_id=? and key=? and map_index=?",
            dag_id,
            run_id,
            task_id,
            key,
            map_index,
        )
        return json.loads(value) if isinstance(value, (str, bytes)) else value


#: Airflow settings of every test deployment of the services (here and tests/topology.py).
SHARED_CONFIG = {
    "AIRFLOW__CORE__PARALLELISM": "8",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    # One key for every process: the services start together and would each generate their
    # own while writing airflow.cfg, so a Variable another process wrote (the deployment
    # secret, written by ``airflow-ray gc`` on a fresh deployment) would not decrypt.
    "AIRFLOW__CORE__FERNET_KEY": "Ovaqs7LUPZZjJlRCugetKR1FxSovdWQDsWgIp36-5H8=",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    # Each DAG file parsed once (no test edits one): a re-parse every 30 s forks a parser (CI time).
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
}


@contextmanager
def airflow_services(
    home: Path, dag_files: list[Path], components: tuple[str, ...] = COMPONENTS
) -> Iterator[AirflowServices]:
    """Start the services with ``dag_files`` (linked, so their own paths still resolve) as the DAGs."""
    dags = home / "dags"
    dags.mkdir(parents=True)
    for path in dag_files:
        (dags / path.name).symlink_to(path)
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        **SHARED_CONFIG,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # Two users with known passwords (the browser logs in with the admin's token as its cookie)
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{role}" for u, (role, _) in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": "local-services-test-secret",
        "PYTHONPATH": str(TESTS.parent),
        # A checkpoint base of this deployment's own (tests/dags/assets.py): a base belongs to
        # the deployment that wrote it first, and the suite's dag.test() deployment writes there too.
        "AIRFLOW_RAY_TEST_ASSETS": (home / "assets").as_uri(),
    }
    new_airflow_home(home)  # a copy of the session's freshly migrated DB: no `airflow db migrate`
    (home / "passwords.json").write_text(json.dumps({u: password for u, (_, password) in USERS.items()}))
    services = AirflowServices(env=env, home=home, url=f"http://127.0.0.1:{port}")
    services.logs.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "airflow", name, *(["--port", str(port)] if name == "api-server" else [])],
            env=env,
            stdout=open(services.logs / f"{name}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in components
    ]
    try:
        wait(services.api_ready, "the api-server", 180)
        yield services
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate: Callable[[], Any], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(1)
