"""Both ways an Airflow worker host reaches a remote multi-node Ray cluster, under Celery.

The hosts (``tests/topology.py``): a Ray head (host 1), a Ray worker node with the resource
``host2`` (host 2), two Airflow Celery workers that are also zero-CPU Ray nodes (hosts 3 and
4, queues ``h3`` and ``h4``), and PostgreSQL + Redis + the Airflow services (host 5). The same
DAG runs twice, once per connection (``tests/dags/topology.py``): ``ray_node`` (``auto``, the
host's own raylet) and ``ray_client`` (``ray://198.18.0.1:10001``). One run of each serves
every test. ``airflow-ray doctor`` then checks the cluster from host 3 (both connections, a wrong
token, a killed node); the last test restarts the cluster and re-runs the consumers.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from airflow_ray.doctor import CLUSTER_CHECKS
from airflow_ray.hooks.ray import client_server_did_not_start
from tests.helpers import doctor_verdicts
from tests.services import wait
from tests.topology import (
    AIRFLOW_A,
    AIRFLOW_B,
    HEAD,
    QUEUES,
    RAY_DASHBOARD,
    SERVICES,
    VENV_BIN,
    WORKER,
    Host,
    Topology,
    api_json,
    cmdline,
)
from tests.topology import CONNECTIONS as CONNECTIONS_BY_ID
from tests.topology import celery_topology as celery_topology  # the session fixture

pytestmark = [pytest.mark.slow, pytest.mark.topology]

CONNECTIONS = tuple(CONNECTIONS_BY_ID)  # ray_node, ray_client
RUN = "r1"
CONSUMERS = ("consume_on_ray", "consume_plain")


@pytest.fixture(scope="module")
def runs(celery_topology: Topology) -> dict[str, float]:
    """One run of each DAG, triggered together; returns how long each took (s)."""
    airflow = celery_topology.airflow
    began = time.monotonic()
    for conn in CONNECTIONS:
        airflow.trigger(f"topology_{conn}", RUN)
    took = {}
    for conn in CONNECTIONS:
        wait_for_run(celery_topology, conn)
        took[conn] = round(time.monotonic() - began, 1)
    print(f"topology start-up {celery_topology.timings}, runs {took}")
    return took


def task_instance(topo: Topology, conn: str, task_id: str) -> dict:
    columns = ("state", "hostname", "queue")
    row = topo.airflow.rows(
        f"select {', '.join(columns)} from task_instance where dag_id=? and run_id=? and task_id=?",
        f"topology_{conn}",
        RUN,
        task_id,
    )[0]
    return dict(zip(columns, row, strict=True))


def wait_for_run(topo: Topology, conn: str) -> None:
    """Wait for the run of ``conn``'s DAG; fail with its task logs (every host's) unless it succeeded."""
    try:
        topo.airflow.wait_for_run(f"topology_{conn}", RUN, timeout=600)
    except BaseException:
        patterns = (
            "h*/tmp/ray/session_*/logs/raylet.out",
            "h*/logs/celery-worker.log",  # a task process that hung
            "h*/logs/scheduler.log",  # e.g. a heartbeat timeout
        )
        logs = [
            path for host in topo.hosts.values() for path in sorted(run_logs(host, conn).glob("*/*.log*"))
        ]
        logs += [path for pattern in patterns for path in sorted(topo.root.glob(pattern))]
        for path in logs:  # the first error and the end: a crashed driver's backtrace fills the end
            text = path.read_text(errors="replace")
            print(f"--- {path}\n{text[:3000]}\n[...]\n{text[-3000:]}")
        raise


def run_logs(host: Host, conn: str) -> Path:
    """Where ``host``'s Airflow processes write the task logs of the run of ``conn``'s DAG."""
    return host.airflow_home / "logs" / f"dag_id=topology_{conn}" / f"run_id={RUN}"


def task_logs(topo: Topology, conn: str, task_id: str) -> list[Path]:
    """The logs of every try of a consumer, written by the worker on host 4 (queue ``h4``)."""
    return sorted((run_logs(topo.hosts[AIRFLOW_B], conn) / f"task_id={task_id}").glob("attempt=*.log"))


@pytest.mark.parametrize("conn", CONNECTIONS)
def test_a_ray_task_with_a_custom_resource_runs_on_the_node_that_has_it(celery_topology, runs, conn):
    topo = celery_topology
    assert topo.airflow.xcom(f"topology_{conn}", RUN, "on_host2") == topo.hosts[WORKER].ip
    assert task_instance(topo, conn, "on_host2")["hostname"] == "art-h3"


@pytest.mark.parametrize("conn", CONNECTIONS)
def test_outputs_cross_airflow_hosts_through_the_object_store(celery_topology, runs, conn):
    """Produced by a Ray task submitted from host 3, read on host 4 by a Ray task and a plain
    task: both get the same bytes; the XCom row holds only the reference."""
    topo, dag_id = celery_topology, f"topology_{conn}"
    assert task_instance(topo, conn, "produce")["hostname"] == "art-h3"
    for task_id in ("consume_on_ray", "consume_plain"):
        assert task_instance(topo, conn, task_id) | {"state": None} == {
            "state": None,
            "hostname": "art-h4",
            "queue": "h4",
        }
    reference = topo.airflow.xcom(dag_id, RUN, "produce", key="data")
    assert reference["summary"]["bytes"] == 4 * 1024**2 and reference["ray_conn_id"] == conn, reference
    on_ray = topo.airflow.xcom(dag_id, RUN, "consume_on_ray")
    plain = topo.airflow.xcom(dag_id, RUN, "consume_plain")
    assert on_ray["ok"] and plain["ok"] and on_ray["size"] == plain["size"] == 4 * 1024**2
    assert on_ray["ray_node"] in (topo.hosts[HEAD].ip, topo.hosts[WORKER].ip)  # the nodes with CPUs
    assert plain["airflow_host"] == topo.hosts[AIRFLOW_B].ip


@pytest.mark.parametrize("conn", CONNECTIONS)
def test_a_plain_tasks_output_is_handed_to_its_owner_and_read_on_another_host(celery_topology, runs, conn):
    """A plain task on host 3 returns 4 MiB: the Ray XCom backend (through ``ray_node``, the
    topology's ``[ray] xcom_conn_id``) hands it to the run's owner, whose Ray worker on the head
    fetches it from host 3's node; a Ray task on host 4 reads it. This hung while host 3's
    drivers told the cluster the head's IP as their own (``Host.boot``)."""
    topo, dag_id = celery_topology, f"topology_{conn}"
    assert task_instance(topo, conn, "produce_plain")["hostname"] == "art-h3"
    assert task_instance(topo, conn, "consume_plain_output")["hostname"] == "art-h4"
    reference = topo.airflow.xcom(dag_id, RUN, "produce_plain", key="data")
    assert reference["summary"]["bytes"] == 4 * 1024**2 and reference["ray_conn_id"] == "ray_node", reference
    assert topo.airflow.xcom(dag_id, RUN, "consume_plain_output") == {"ok": True, "size": 4 * 1024**2}


@pytest.mark.parametrize("conn", CONNECTIONS)
def test_a_deferrable_ray_job_is_watched_by_the_triggerer(celery_topology, runs, conn):
    topo = celery_topology
    submission_id = topo.airflow.xcom(f"topology_{conn}", RUN, "job")
    job = api_json(f"{RAY_DASHBOARD}/api/jobs/{submission_id}", topo.token)
    assert job["status"] == "SUCCEEDED"
    # The trigger's log lines (the job's output) are written on the triggerer's host.
    text = "".join(
        path.read_text() for path in run_logs(topo.hosts[SERVICES], conn).glob("task_id=job/*.log*")
    )
    assert "job ran on art-h1" in text


def test_celery_workers_import_ray_before_forking_task_processes(celery_topology):
    """``[celery] extra_celery_config = {"imports": ["airflow_ray.preload"]}`` (docs/deploy.md):
    each Celery worker's main process and its pool processes (which fork the task processes, and
    are called ``airflow supervisor: ...`` while they do) have Ray's core library loaded, so no
    task process pays ``import ray`` itself."""
    for n in QUEUES:
        (main,) = celery_topology.hosts[n].pids("[celeryd: ")
        children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
        pool = [main, *(int(pid) for pid in children if cmdline(int(pid)).startswith(POOL_TITLES))]
        assert len(pool) > 1, f"no Celery pool process on host {n}: {[cmdline(int(p)) for p in children]}"
        for pid in pool:
            assert "_raylet.so" in Path(f"/proc/{pid}/maps").read_text(), (n, cmdline(pid))


#: What Celery's pool processes are called: idle, and while one supervises a task process.
POOL_TITLES = ("[celeryd: ", "airflow supervisor: ")


def doctor(topo: Topology, conn_id: str, conn: dict | None = None) -> tuple[int, dict[str, tuple[str, str]]]:
    """``airflow-ray doctor --connection conn_id`` on Airflow host 3, as its operator would run it;
    ``conn`` replaces the connection (e.g. a wrong token). Run again once when Ray's client proxy
    failed to start a per-client server, which it does under load (docs/deploy.md)."""
    extra = {} if conn is None else {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn)}
    command = [str(VENV_BIN / "airflow-ray"), "doctor", "--connection", conn_id]
    for _ in range(2):
        proc = subprocess.run(
            topo.hosts[AIRFLOW_A].argv(command),
            env=topo.airflow_host_env(AIRFLOW_A, extra),
            capture_output=True,
            text=True,
            timeout=300,
        )
        verdicts = doctor_verdicts(proc.stdout, proc.stderr)
        if not client_server_did_not_start(verdicts["connect"][1]):
            break
    return proc.returncode, verdicts


def ray_nodes(topo: Topology) -> list[dict]:
    """Every node the head knows (alive and dead), from its state API."""
    return api_json(f"{RAY_DASHBOARD}/api/v0/nodes?detail=1", topo.token)["data"]["result"]["result"]


@pytest.mark.parametrize("conn", CONNECTIONS)
def test_doctor_on_an_airflow_host_passes_and_names_a_wrong_token(celery_topology, runs, conn):
    """Every check passes from an Airflow worker host (after the runs: the keeper is up, the shared
    checkpoint base is this deployment's); the same connection with a wrong token fails there.
    A node whose start was retried (``Topology.start_nodes``) may have left a dead entry, which
    the doctor rightly reports."""
    topo = celery_topology
    dead = sum(node["state"] == "DEAD" for node in ray_nodes(topo))
    status, verdicts = doctor(topo, conn)
    expected = dict.fromkeys(verdicts, "ok") | {"nodes": "FAILED" if dead else "ok"}
    expected |= {"object store": "skipped"} if conn == "ray_client" else {}
    assert {name: v[0] for name, v in verdicts.items()} == expected, verdicts
    assert status == (1 if dead else 0)
    if not dead:  # the head, host 2, and the Airflow hosts' zero-CPU nodes
        assert verdicts["nodes"][1] == "4 alive", verdicts
    assert verdicts["owners"][1].endswith("the keeper's owner factory is running (warm Ray workers)")
    assert verdicts["dashboard"][1].startswith(f"the Jobs API at {RAY_DASHBOARD} ")

    address = CONNECTIONS_BY_ID[conn]
    status, verdicts = doctor(topo, conn, {"conn_type": "ray", "host": address, "password": "0" * 64})
    assert status == 1
    assert verdicts["reachable"][0] == "ok" and verdicts["token"][0] == "FAILED", verdicts
    assert f"token sent: the password of Airflow connection '{conn}'" in verdicts["token"][1]


def test_doctor_reports_a_killed_ray_node(celery_topology, runs):
    """Host 2's Ray node is killed (a host crash): once the head has declared it dead, the doctor
    on host 3 fails the ``nodes`` check, naming the node and what to do. The next test restarts
    the whole cluster, host 2 with it."""
    topo = celery_topology
    host2 = topo.hosts[WORKER].ip
    (node_id,) = [n["node_id"] for n in ray_nodes(topo) if n["node_ip"] == host2 and n["state"] == "ALIVE"]
    dead_before = sum(node["state"] == "DEAD" for node in ray_nodes(topo))
    topo.kill_node(WORKER)

    def declared_dead() -> bool:
        with contextlib.suppress(OSError):  # the state API may briefly fail while the node goes
            return any(n["node_id"] == node_id and n["state"] == "DEAD" for n in ray_nodes(topo))
        return False

    wait(declared_dead, "the head to declare host 2 dead", 120)

    status, verdicts = doctor(topo, "ray_node")
    assert status == 1
    assert [verdicts[name][0] for name in CLUSTER_CHECKS[:5]] == ["ok"] * 5, verdicts
    state, detail = verdicts["nodes"]
    assert state == "FAILED", verdicts
    assert detail.startswith(f"{dead_before + 1} of {4 + dead_before} nodes died unexpectedly: "), detail
    assert f"{node_id[:12]} at {host2} (" in detail and "Restart the node" in detail


def test_consumers_restore_from_checkpoints_after_the_cluster_restarts(celery_topology, runs):
    """The whole Ray cluster is killed and started again: the owners and their objects are gone.
    The consumers, cleared and re-run on host 4, read the outputs back from the checkpoints.
    Last in this module: it re-runs the consumers of both runs."""
    topo = celery_topology
    began = time.monotonic()
    topo.restart_ray()
    restarted = time.monotonic() - began
    clear = {
        "dag_run_id": RUN,
        "task_ids": list(CONSUMERS),
        "only_failed": False,
        "dry_run": False,
    }
    for conn in CONNECTIONS:
        topo.airflow.api("POST", f"dags/topology_{conn}/clearTaskInstances", clear)
    for conn in CONNECTIONS:
        wait_for_run(topo, conn)
        logs = [log for task_id in CONSUMERS for log in task_logs(topo, conn, task_id)]
        for task_id in CONSUMERS:
            assert topo.airflow.xcom(f"topology_{conn}", RUN, task_id)["ok"], (conn, task_id)
        # The first consumer restores the output and registers it again: the other may read it
        # from the object store.
        assert any("Restored the output" in log.read_text() for log in logs), conn
    print(f"ray restart {restarted:.1f}s, consumers re-run {time.monotonic() - began - restarted:.1f}s")
