"""The tests' multi-host topology (``tests/topology.py``) for the benchmarks' Celery sections.

Production runs Airflow's workers on their own hosts against a remote, multi-node Ray cluster.
The tests build that shape on one machine (network namespaces on a bridge: a Ray head, a Ray
worker node, two Airflow Celery workers that are zero-CPU Ray nodes, PostgreSQL + Redis + the
Airflow services); the benchmarks reuse it as is, with their own generated DAG file, so the
numbers come from the same processes the tests check. Needs root, PostgreSQL and Redis, as the
tests do (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: ``tests.topology``

#: The Celery queues of the two Airflow hosts: a task on ``h3`` runs on host 3, ``h4`` on host 4.
HOST_3, HOST_4 = "h3", "h4"


@contextlib.contextmanager
def celery_hosts(
    dag_source: str,
    dag_ids: list[str],
    *,
    airflow_env: dict[str, str] | None = None,
    object_store_bytes: int = 200 * 1024**2,
) -> Iterator[Any]:
    """The topology running ``dag_source`` (one DAG file), once ``dag_ids`` are parsed.

    Yields a ``tests.topology.Topology``; raises ``RuntimeError`` naming what is missing where the
    topology cannot run (not root, no PostgreSQL or Redis).
    """
    from tests.topology import topology

    folder = Path(tempfile.mkdtemp(prefix="bench-hosts-", dir="/tmp"))
    folder.chmod(0o755)  # read by the postgres user's processes too
    dag_file = folder / "bench_hosts_dags.py"
    dag_file.write_text(dag_source)
    try:
        with topology([dag_file], airflow_env=airflow_env, object_store_bytes=object_store_bytes) as topo:
            for dag_id in dag_ids:
                topo.airflow.wait_for_dag(dag_id)
            yield topo
    except BaseException as exc:
        if type(exc).__name__ == "Skipped":  # pytest.skip: the topology says what it needs
            raise RuntimeError(f"the multi-host topology cannot run here: {exc}") from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(topo: Any, dag_id: str, run_id: str, timeout: float = 900) -> tuple[str, dict[str, dict[str, Any]]]:
    """Trigger ``dag_id`` and wait until the run ends (``TimeoutError`` after ``timeout`` s); its
    state and its task instances by task id (epoch-second start and end, duration, the Airflow
    host that ran it). A failed run is returned, not raised: a baseline may fail where Ray's
    backend does not, and the table says so."""
    topo.airflow.trigger(dag_id, run_id)
    state = topo.airflow.wait_for_end(dag_id, run_id, timeout)
    columns = ("task_id", "state", "hostname", "start", "end")
    rows = topo.airflow.rows(
        "select task_id, state, hostname, extract(epoch from start_date)::float8, "
        "extract(epoch from end_date)::float8 from task_instance where dag_id=? and run_id=?",
        dag_id,
        run_id,
    )
    tis = {}
    for row in rows:
        ti = dict(zip(columns, row, strict=True))
        ti["duration"] = None if ti["start"] is None or ti["end"] is None else ti["end"] - ti["start"]
        tis[ti.pop("task_id")] = ti
    return state, tis
