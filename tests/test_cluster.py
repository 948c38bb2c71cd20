"""The embedded local cluster: one cluster for concurrent starters, loopback only, and the
``airflow-ray cluster status | stop`` CLI.

This module starts a second embedded head next to the session's, in its own state directory,
from subprocesses (as Airflow task processes would), and stops it at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_ray.cluster import LocalCluster, tcp_reachable

CLI = Path(sys.executable).with_name("airflow-ray")
START = (
    "import dataclasses, json; from airflow_ray import cluster; "
    "print('CLUSTER=' + json.dumps(dataclasses.asdict(cluster.ensure_running())))"
)


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory) -> dict[str, str]:
    """Environment of a process whose embedded cluster lives in a fresh state directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        AIRFLOW__RAY__LOCAL_CLUSTER_DIR=str(tmp_path_factory.mktemp("second_cluster")),
        AIRFLOW__RAY__LOCAL_CLUSTER_NUM_CPUS="1",
        AIRFLOW__RAY__LOCAL_CLUSTER_OBJECT_STORE_BYTES=str(200 * 1024**2),
        AIRFLOW__RAY__LOCAL_CLUSTER_KEEPER="False",  # the session's cluster has one (tested below)
    )
    return env


@pytest.fixture(scope="module")
def started(ray_cluster, cluster_env):
    """Two processes call ``ensure_running()`` at the same moment; yields both answers."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START],
            env=cluster_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    answers = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=400)
            lines = [line for line in stdout.splitlines() if line.startswith("CLUSTER=")]
            assert proc.returncode == 0 and lines, f"{stdout[-3000:]}\n{stderr[-3000:]}"
            answers.append(LocalCluster(**json.loads(lines[-1].removeprefix("CLUSTER="))))
        yield answers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        subprocess.run([str(CLI), "cluster", "stop"], env=cluster_env, capture_output=True, timeout=120)
        # If the CLI itself is what broke, still leave no second head behind.
        for proc in _cluster_processes(answers[0] if answers else None):
            with contextlib.suppress(Exception):
                proc.kill()


@pytest.mark.slow
def test_concurrent_starts_make_one_cluster(started, ray_cluster):
    first, second = started
    assert first == second  # the same state: one `ray start --head`, the other waited for it
    assert first.address != ray_cluster.address
    gcs = [p for p in _cluster_processes(first) if p.name() == "gcs_server"]
    assert len(gcs) == 1


@pytest.mark.slow
def test_binds_only_loopback(started):
    import psutil

    (cluster, _) = started
    listening = []
    for proc in _cluster_processes(cluster):
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((proc.name(), conn.laddr.ip, conn.laddr.port))
    assert listening, "found no listening sockets of the cluster's processes"
    ports = {port for _, _, port in listening}
    assert cluster.gcs_port in ports
    assert int(cluster.client_address.rsplit(":", 1)[1]) in ports
    exposed = [entry for entry in listening if not _is_loopback(entry[1])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


@pytest.mark.slow
def test_cli_status_prints_address_resources_and_object_store(started, cluster_env):
    (cluster, _) = started
    proc = subprocess.run([str(CLI), "cluster", "status"], env=cluster_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    assert lines["address"].strip() == cluster.address
    assert lines["ray client"].strip() == cluster.client_address
    assert "CPU=1" in lines["resources"]
    assert "MiB used of" in lines["object store"] and "objects" in lines["object store"]

    proc = subprocess.run(
        [str(CLI), "cluster", "status", "--json"], env=cluster_env, capture_output=True, text=True
    )
    info = json.loads(proc.stdout)
    assert (info["address"], info["nodes"], info["resources"]["CPU"]) == (cluster.address, 1, 1.0)
    assert info["object_store_capacity_bytes"] > 0
    assert info["object_store_used_bytes"] >= 0


def test_keeper_created_the_owners_and_runs_with_the_cluster(ray_cluster):
    """The session's cluster has its keeper driver (see airflow_ray.keeper) among the cluster's
    processes, which ``stop`` ends, and the keeper created every owner shard; a cluster started
    with ``[ray] local_cluster_keeper = False`` (the one of this module) has none."""
    from airflow_ray import config, owners

    assert len(_keepers(ray_cluster)) == 1
    assert (config.local_cluster_dir() / "keeper.ready").read_text().split() == owners.owner_names()


@pytest.mark.slow
def test_keeper_can_be_turned_off(started):
    (cluster, _) = started
    assert _cluster_processes(cluster)
    assert not _keepers(cluster)


@pytest.mark.slow
def test_cli_stop_stops_exactly_that_cluster(started, cluster_env, ray_cluster):
    import ray

    (cluster, _) = started
    proc = subprocess.run([str(CLI), "cluster", "stop"], env=cluster_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Stopped the embedded Ray cluster." in proc.stdout
    assert not _cluster_processes(cluster)
    assert not tcp_reachable("127.0.0.1", cluster.gcs_port)
    assert not (Path(cluster_env["AIRFLOW__RAY__LOCAL_CLUSTER_DIR"]) / "cluster.json").exists()

    proc = subprocess.run([str(CLI), "cluster", "status"], env=cluster_env, capture_output=True, text=True)
    assert proc.returncode == 1 and "not running" in proc.stdout

    # The session's cluster is untouched: its processes run and this driver still works.
    assert _cluster_processes(ray_cluster)
    assert tcp_reachable("127.0.0.1", ray_cluster.gcs_port)
    from airflow_ray.hooks import RayHook

    RayHook().connect()
    assert ray.get(ray.put("still here")) == "still here"


@pytest.mark.parametrize(
    "args, killed",
    [
        pytest.param(["--address=198.51.100.7:6379"], True, id="its-address"),
        pytest.param(["--address=198.51.100.7:63790"], False, id="address-with-a-longer-port"),
        pytest.param(["--temp-dir=/tmp/airflow_ray_test_x/session_1"], True, id="its-temp-dir"),
    ],
)
def test_stop_selects_processes_by_whole_address_or_temp_dir(args, killed):
    """What ``stop()`` kills, with stand-in processes carrying a Ray process's arguments."""
    from airflow_ray import cluster

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])
    try:
        # 198.51.100.0/24 is TEST-NET-2: no real cluster has that address
        cluster._terminate_processes("/tmp/airflow_ray_test_x", "198.51.100.7:6379")
        assert (proc.poll() is not None) == killed
    finally:
        proc.kill()
        proc.wait()


def _cluster_processes(cluster: LocalCluster | None) -> list:
    """The processes of one embedded cluster, found the way ``cluster.stop()`` finds them."""
    import psutil

    if cluster is None:
        return []
    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if cluster.temp_dir in " ".join(p.info["cmdline"] or [])
        or f"--address={cluster.address}" in (p.info["cmdline"] or [])
    ]
    found = {}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _keepers(cluster: LocalCluster) -> list:
    return [p for p in _cluster_processes(cluster) if "airflow_ray.keeper" in " ".join(p.cmdline())]


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_stopping_a_cluster_spares_the_calling_process(tmp_path):
    """The processes to stop are found by command line; the caller's own may name the temp dir too."""
    temp_dir = str(tmp_path / "cluster-temp")
    member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", temp_dir])
    stop = (
        "import sys; from airflow_ray import cluster; "
        "cluster._terminate_processes(sys.argv[1], '-'); print('ok')"
    )
    caller = subprocess.run(
        [sys.executable, "-c", stop, temp_dir], capture_output=True, text=True, timeout=120
    )
    assert caller.returncode == 0 and caller.stdout.strip() == "ok", caller.stderr
    assert member.wait(timeout=30) != 0  # the cluster's process was stopped
