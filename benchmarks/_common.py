"""Shared helpers of ``task_overhead.py`` and ``xcom_handoff.py`` (not a benchmark itself).

* a throw-away Airflow home (SQLite, ``airflow db migrate``) with its own DAGs folder, and a
  private embedded Ray cluster (its own state dir, stopped at the end);
* :class:`LocalExecutorStack`: ``airflow api-server`` + ``scheduler`` + ``dag-processor`` with
  the ``LocalExecutor`` on loopback ports, so every task instance is its own process;
* reading task-instance times from the metadata DB, percentiles, and plain-text tables.

Airflow reads its configuration once per process: call :func:`configure` before anything
imports Airflow.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
PYTHON = sys.executable
AIRFLOW = [PYTHON, "-m", "airflow"]


def log(message: str) -> None:
    print(f"[{time.strftime('%X')}] {message}", file=sys.stderr, flush=True)


# --- Airflow home and Ray --------------------------------------------------------------------


def make_home(prefix: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix=prefix))
    (home / "dags").mkdir()
    return home


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for this benchmark's Airflow processes (and the Ray cluster they start)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_URL", "RAY_AUTH_TOKEN")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": str(home / "ray"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(BENCHMARKS), str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    env.update(extra)
    return env


def configure(env: dict[str, str]) -> None:
    """Make this process use ``env`` (before Airflow is imported)."""
    for var in ("RAY_ADDRESS", "RAY_URL", "RAY_AUTH_TOKEN"):
        os.environ.pop(var, None)
    os.environ.update(env)
    for path in (str(ROOT), str(BENCHMARKS)):
        if path not in sys.path:
            sys.path.insert(0, path)


def migrate(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([*AIRFLOW, "db", "migrate"], check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def start_ray() -> float:
    """Start (or find) the embedded Ray head of this home; returns the seconds it took."""
    from airflow_ray import cluster
    from airflow_ray.hooks import RayHook

    started = time.perf_counter()
    cluster.ensure_running()
    RayHook().connect()
    return time.perf_counter() - started


def prepare_keeper(env: dict[str, str]) -> None:
    """``airflow-ray cluster prepare`` for the ``ray_default`` connection of ``env``: a cluster
    airflow-ray did not start gets its keeper (warm Ray workers) before anything is timed."""
    cmd = [PYTHON, "-m", "airflow_ray.cli", "cluster", "prepare", "--connection", "ray_default"]
    log(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip())


def stop_ray() -> None:
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
    with contextlib.suppress(Exception):
        from airflow_ray import cluster

        cluster.stop()


def release_run(dag_id: str, run_id: str) -> None:
    """Free a DAG run's objects in Ray now (the benchmark does not wait for the TTL sweep)."""
    import ray

    from airflow_ray.hooks import RayHook
    from airflow_ray.owners import get_owner, owner_name

    RayHook().connect()
    with contextlib.suppress(ValueError):  # no owner: nothing of this run in Ray
        ray.get(get_owner(owner_name(dag_id, run_id)).release.remote((dag_id, run_id)), timeout=60)


# --- reading the metadata DB -----------------------------------------------------------------


def task_instances(dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    """``task_id -> {state, start, end, duration}`` (epoch seconds) from the metadata DB."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        out = {}
        for ti in rows:
            start = ti.start_date.timestamp() if ti.start_date else None
            end = ti.end_date.timestamp() if ti.end_date else None
            out[ti.task_id] = {
                "state": str(ti.state),
                "start": start,
                "end": end,
                "duration": (end - start) if start is not None and end is not None else None,
            }
        return out


def load_dag(dag_id: str, dags_folder: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder))
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise RuntimeError(f"DAG {dag_id!r} not found in {dags_folder}: {bag.import_errors}")
    return dag


# --- LocalExecutor: one process per task instance -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalExecutorStack:
    """``api-server`` + ``scheduler`` + ``dag-processor`` (LocalExecutor, SQLite) on loopback.

    Usage::

        with LocalExecutorStack(env, home) as stack:
            stack.wait_parsed(["my_dag"])
            run_id = stack.trigger("my_dag")
            state = stack.wait(run_id, "my_dag")
    """

    def __init__(self, env: dict[str, str], home: Path, parallelism: int = 4) -> None:
        self.port = free_port()
        self.home = home
        self.env = {
            **env,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = home / "stack-logs"

    def __enter__(self) -> LocalExecutorStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.logs.mkdir(exist_ok=True)
        commands = {
            "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            "scheduler": ["scheduler"],
            "dag-processor": ["dag-processor"],
        }
        for name, args in commands.items():
            out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
            self.procs[name] = subprocess.Popen(
                [*AIRFLOW, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_http(f"http://127.0.0.1:{self.port}/api/v2/monitor/health", timeout=180)

    def _wait_http(self, url: str, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"API server not healthy at {url} after {timeout:.0f} s (logs: {self.logs})")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def wait_parsed(self, dag_ids: Iterable[str], timeout: float = 300) -> None:
        """Wait until the DAG processor has serialized every DAG in ``dag_ids``."""
        from airflow.models.dag import DagModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        wanted = set(dag_ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with create_session() as session:
                have = set(session.scalars(select(DagModel.dag_id).where(DagModel.dag_id.in_(wanted))).all())
            if have >= wanted:
                return
            time.sleep(1)
        raise TimeoutError(f"DAGs not parsed after {timeout:.0f} s: {sorted(wanted - have)}")

    def unpause(self, dag_id: str) -> None:
        """A DAG first seen by ``dag.test()`` in the same database was created paused."""
        from airflow.models.dag import DagModel
        from airflow.utils.session import create_session

        with create_session() as session:
            session.query(DagModel).filter(DagModel.dag_id == dag_id).update({"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        from airflow.api.common.trigger_dag import trigger_dag
        from airflow.utils.types import DagRunTriggeredByType

        run_id = f"bench__{dag_id}__{time.time_ns()}"
        for _ in range(10):  # SQLite is shared with three busy processes
            try:
                trigger_dag(dag_id, triggered_by=DagRunTriggeredByType.CLI, run_id=run_id, conf=conf)
                return run_id
            except Exception as exc:  # "database is locked"
                if "locked" not in str(exc):
                    raise
                time.sleep(1)
        raise RuntimeError(f"could not trigger {dag_id}")

    def wait(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(Exception), create_session() as session:
                state = session.scalar(
                    select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
                )
                if str(state) in ("success", "failed"):
                    return str(state)
            time.sleep(0.5)
        raise TimeoutError(f"{dag_id} / {run_id} not finished after {timeout:.0f} s")

    def stop(self) -> None:
        for proc in self.procs.values():  # our own process groups only
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


# --- numbers and tables ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text)."""
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in text_rows]
    return "\n".join(out)


def remove_home(home: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)
