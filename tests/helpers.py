"""Small helpers for running DAGs in tests and reading what they left behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

#: Callables a test harness lends to the tasks of a DAG it runs in-process (``dag.test``), e.g.
#: ``tests/scripts/multinode.py`` lends ``lose_node`` to the ``node_loss`` DAG.
HARNESS: dict[str, Callable[..., None]] = {}


@dataclass
class RunResult:
    dag_id: str
    run_id: str
    state: str
    states: dict[str, str]

    def xcom_raw(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """The value as stored in the XCom table (what the UI shows)."""
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            row = (
                session.query(XComModel)
                .filter_by(
                    dag_id=self.dag_id, run_id=self.run_id, task_id=task_id, key=key, map_index=map_index
                )
                .one_or_none()
            )
            if row is None:
                return None
            value = row.value
            if not isinstance(value, str):
                return value
            try:
                return json.loads(value)
            except ValueError:  # a JSON string the column already decoded
                return value

    def xcom(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """The value as a plain downstream task would receive it (through the XCom backend)."""
        from airflow.sdk.execution_time.comms import XComResult
        from airflow.sdk.execution_time.xcom import XCom

        raw = self.xcom_raw(task_id, key, map_index)
        return XCom.deserialize_value(XComResult(key=key, value=raw))


class MarkerPayload:
    """Unpickling it creates the file ``marker``: what an attacker's pickle would do, harmlessly."""

    def __init__(self, marker: Any) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def script_report(proc: subprocess.CompletedProcess[str], prefix: str) -> Any:
    """The JSON a ``tests/scripts`` process printed last as ``<prefix>=<json>``; fails with the
    process's output when it exited non-zero or printed none."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{prefix}=")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-5000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix(f"{prefix}="))


def kill_cluster(temp_dir: str, address: str | None) -> None:
    """SIGKILL one local Ray cluster: the processes ``airflow_ray.cluster.stop()`` would stop
    (:func:`airflow_ray.cluster.processes_of`), as a crash would.

    For clusters the tests throw away: ``stop()`` sends SIGTERM and waits 10 s for the processes
    that never exit on it (``gcs_server`` and the autoscaler's monitor, on Ray 2.60). A driver
    of the cluster in this process must leave first (``ray.shutdown()``): it would exit with it.
    """
    import psutil

    from airflow_ray.cluster import processes_of

    victims = processes_of(temp_dir, address)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)


@contextlib.contextmanager
def loopback_head(ray: str, *, extra_args: Sequence[str] = (), cwd: str | None = None) -> Iterator[str]:
    """``<ray> start --head`` on 127.0.0.1 with token auth, a short private temp dir and free
    ports, the way a cluster that is not the embedded one runs; yields its GCS address, then kills
    it (:func:`kill_cluster`; never ``ray stop``, which would kill every cluster of the machine)."""
    import os
    import shutil
    import tempfile

    from airflow_ray import cluster
    from tests.s3_server import _free_port

    cluster.ensure_token()
    temp_dir = tempfile.mkdtemp(prefix="arh-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **cluster.LOCAL_ENV, "PYTHONPATH": ""}
    address = ""
    try:
        for attempt in range(1, 4):
            port = _free_port()
            address = f"127.0.0.1:{port}"
            start = [
                ray,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--dashboard-agent-listen-port={_free_port()}",
                "--include-dashboard=false",
                "--include-log-monitor=false",  # no driver here reads workers' output (CI time)
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *extra_args,
            ]
            proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180, cwd=cwd)
            if proc.returncode == 0:
                break
            # Ray gives the raylet 30 s to register; beside the multi-host topology's start (its
            # Ray nodes run at a higher priority) a head missed it. Start it again, from scratch.
            kill_cluster(temp_dir, address)
            if attempt == 3:
                output = f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
                raise RuntimeError(f"ray start --head failed 3 times, the last:\n{output}")
        yield address
    finally:
        kill_cluster(temp_dir, address)  # killed, not stopped: faster by 10 s
        shutil.rmtree(temp_dir, ignore_errors=True)


def connected_or_private_ray():
    """Yield with Ray connected: the suite's head if this process is already a driver, else a
    private 2-CPU one (``address="local"`` never joins a cluster someone else started)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2)
    yield
    ray.shutdown()


def run_dag(dag: Any, **kwargs: Any) -> RunResult:
    dr = dag.test(**kwargs)
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dr.dag_id, run_id=dr.run_id).all()
        states = {
            (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state) for ti in tis
        }
    return RunResult(dag_id=dr.dag_id, run_id=dr.run_id, state=str(dr.state), states=states)


def doctor_verdicts(stdout: str, stderr: str = "") -> dict[str, tuple[str, str]]:
    """``{check: (status, detail)}`` from ``airflow-ray doctor``'s output: one line per check, in
    the documented order (Airflow's log lines, e.g. the hook's "Connected to Ray", may come
    between them). Fails naming the output unless every check printed its verdict."""
    from airflow_ray.doctor import CLUSTER_CHECKS

    checks = [*CLUSTER_CHECKS, "dashboard", "checkpoints"]
    statuses = ("ok", "warn", "FAILED", "skipped")
    lines = [line.split(maxsplit=1) for line in stdout.splitlines() if line.startswith(statuses)]
    verdicts = {}
    for status, rest in lines:
        name = next((n for n in checks if rest.startswith(n)), None)
        assert name is not None, stdout
        verdicts[name] = (status, rest[len(name) :].strip())
    assert list(verdicts) == checks, f"{stdout}\n{stderr[-3000:]}"
    return verdicts
