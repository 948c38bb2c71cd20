"""The embedded local cluster: one cluster for concurrent starters, loopback only, who the
head is (a stale state file is never trusted), a private temp dir, and the
``airflow-ray cluster status | stop`` CLI.

This module starts a second embedded head next to the session's, in its own state directory,
from subprocesses (as Airflow task processes would), and stops it at the end. The identity and
privacy tests start no head: they point a fresh state directory at the session's head, at a
squatting TCP listener, or at a temp dir someone else prepared, and are refused before Ray starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from airflow_ray.cluster import LocalCluster, LocalClusterError, tcp_reachable

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
        AIRFLOW__RAY__LOCAL_CLUSTER_LOG_MONITOR="True",  # the default; the session's cluster has none
    )
    return env


@pytest.fixture(scope="module")
def started(ray_cluster, cluster_env):
    """Two processes call ``ensure_running()`` at the same moment; yields both answers.

    They find a stale state file (its head gone, nothing on its port), as a crash leaves it:
    that must start a fresh cluster, not fail.
    """
    state_dir = Path(cluster_env["AIRFLOW__RAY__LOCAL_CLUSTER_DIR"])
    _write_state(state_dir / "cluster.json", _stale_state())
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
    assert first.head_pid != _stale_state().head_pid  # the stale state file was replaced
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
    processes, which ``stop`` ends, and the keeper created every owner shard of the deployment
    that started the cluster (the xdist workers share it, each its own deployment: conftest's
    ``CLUSTER_DIR``); a cluster started with ``[ray] local_cluster_keeper = False`` (the one of
    this module) has none."""
    from airflow_ray import config, owners
    from airflow_ray.hooks import RayHook

    assert len(_keepers(ray_cluster)) == 1
    created = (config.local_cluster_dir() / "keeper.ready").read_text().split()
    starter = owners.parse_owner_name(created[0])
    assert starter is not None and created == owners.owner_names(starter.deployment)
    RayHook().connect()
    assert set(created) <= set(owners.running_owner_names(starter.deployment))


@pytest.mark.slow
def test_keeper_can_be_turned_off(started):
    (cluster, _) = started
    assert _cluster_processes(cluster)
    assert not _keepers(cluster)


@pytest.mark.slow
def test_log_monitor_runs_only_where_turned_on(started, ray_cluster):
    """Ray's log monitor tails worker logs for drivers with ``log_to_driver`` (a Ray Job's script):
    this module's cluster (the default) has one, the session's (turned off in conftest) none."""
    (cluster, _) = started
    assert not _log_monitors(ray_cluster)
    assert len(_log_monitors(cluster)) == 1


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


def _log_monitors(cluster: LocalCluster) -> list:
    return [p for p in _cluster_processes(cluster) if "log_monitor.py" in " ".join(p.cmdline())]


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


# --- who the head is, and a private temp dir (no cluster started) ------------------------------


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A fresh, empty state directory for this process's embedded cluster."""
    from airflow_ray import config

    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("AIRFLOW__RAY__LOCAL_CLUSTER_DIR", str(directory))
    config.clear_caches()
    yield directory
    monkeypatch.undo()
    config.clear_caches()  # the session's cluster again


@pytest.fixture
def squatter():
    """A plain TCP listener on a free loopback port, started as another local user's process
    would be. ``squatter.received()`` stops it and returns (connections, bytes received)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SQUATTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    port = int(proc.stdout.readline().removeprefix("PORT="))

    def received() -> tuple[int, int]:
        proc.terminate()
        stdout, _ = proc.communicate(timeout=30)
        counts = dict(line.split("=") for line in stdout.split())
        return int(counts["CONNECTIONS"]), int(counts["BYTES"])

    yield dataclasses.make_dataclass("Squatter", ["port", "received"])(port, received)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


#: Listens, reads whatever its clients send; on SIGTERM drains the backlog and prints the totals.
SQUATTER = """
import signal, socket, sys, threading
server = socket.create_server(("127.0.0.1", 0))
print(f"PORT={server.getsockname()[1]}", flush=True)
totals, lock, readers = [0, 0], threading.Lock(), []
def read(conn):
    conn.settimeout(3)
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            with lock:
                totals[1] += len(data)
def accept():
    conn, _ = server.accept()
    totals[0] += 1
    reader = threading.Thread(target=read, args=(conn,))
    reader.start()
    readers.append(reader)
def stop(*_):
    server.setblocking(False)
    while True:
        try:
            accept()
        except BlockingIOError:
            break
    for reader in readers:
        reader.join()
    print(f"CONNECTIONS={totals[0]} BYTES={totals[1]}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    accept()
"""


def test_stale_state_file_with_a_squatter_on_its_port_is_refused_before_anything_is_sent(state_dir, squatter):
    """The head is gone and a plain TCP server listens on its old port: a task process that
    connects (``RayHook().connect()``, as every ``@ray_task`` does) fails naming what it found
    and how to fix it, and the squatter received no byte (no token, no pickled function)."""
    _write_state(state_dir / "cluster.json", _stale_state(port=squatter.port))
    env = {**os.environ, "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": str(state_dir)}
    connect = "from airflow_ray.hooks import RayHook; RayHook('no_such_connection').connect()"
    proc = subprocess.run(
        [sys.executable, "-c", connect], env=env, capture_output=True, text=True, timeout=120
    )
    connections, received = squatter.received()
    assert received == 0, f"the squatter received {received} bytes over {connections} connections"
    assert connections <= 2  # the liveness probes: connect, close
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("airflow_ray.cluster.LocalClusterError: "), proc.stderr[-3000:]
    assert f"state file {state_dir / 'cluster.json'} is stale" in error
    assert "is no longer running" in error
    assert f"something else listens on its port 127.0.0.1:{squatter.port}" in error
    assert "`airflow-ray cluster stop`" in error and f"or remove {state_dir / 'cluster.json'}" in error


@pytest.mark.parametrize(
    "who",
    [
        pytest.param("head-restarted", id="head-pid-with-another-start-time"),
        pytest.param("another-process", id="pid-of-a-live-process-that-is-not-the-head"),
    ],
)
def test_state_file_with_the_right_port_but_another_head_is_refused(state_dir, ray_cluster, who):
    """A real Ray head listens on the port, but it is not the process the state file names."""
    from airflow_ray import cluster

    if who == "head-restarted":
        identity = {"head_pid": ray_cluster.head_pid, "head_started_at": ray_cluster.head_started_at - 3600}
        found = f"pid {ray_cluster.head_pid} is no longer its head: that process started at"
    else:
        import psutil

        identity = {"head_pid": os.getpid(), "head_started_at": psutil.Process().create_time()}
        found = f"pid {os.getpid()} is {psutil.Process().name()!r} of uid {os.getuid()}, not a gcs_server"
    _write_state(state_dir / "cluster.json", dataclasses.replace(ray_cluster, **identity))
    with pytest.raises(LocalClusterError, match="is stale") as raised:
        cluster.ensure_running()
    assert found in str(raised.value)
    assert f"something else listens on its port {ray_cluster.address}" in str(raised.value)
    assert cluster.current() is None  # not the embedded cluster: what listens there is not ours


def test_session_cluster_records_its_head_and_is_private(ray_cluster):
    """The state file names the gcs_server listening on the cluster's port, is 0600, and the
    temp dir is ours and 0700; ``current()`` verifies and returns it."""
    import psutil

    from airflow_ray import cluster, config

    head = psutil.Process(ray_cluster.head_pid)
    assert head.name() == "gcs_server" and head.create_time() == ray_cluster.head_started_at
    listening = {c.laddr.port for c in head.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert ray_cluster.gcs_port in listening
    assert (config.local_cluster_dir() / "cluster.json").stat().st_mode & 0o777 == 0o600
    temp_dir = os.stat(ray_cluster.temp_dir)
    assert (temp_dir.st_uid, temp_dir.st_mode & 0o777) == (os.getuid(), 0o700)
    assert cluster.current() == ray_cluster


#: A field to leave out of the state file.
DROP = object()


@pytest.mark.parametrize(
    "content, mode, problem",
    [
        pytest.param(
            "{",
            0o600,
            "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
            id="not-json",
        ),
        pytest.param("[]", 0o600, "holds list, expected a JSON object", id="not-an-object"),
        pytest.param(
            {"head_pid": DROP, "head_started_at": DROP},
            0o600,
            "lacks head_pid, head_started_at (written by an older airflow-ray?)",
            id="older-format",
        ),
        pytest.param({"extra": 1}, 0o600, "has unknown fields extra", id="unknown-field"),
        pytest.param(
            {"address": "10.1.2.3:6379"},
            0o600,
            "has address = '10.1.2.3:6379', expected '127.0.0.1:<port>'",
            id="address-off-loopback",
        ),
        pytest.param(
            {"temp_dir": "/"},
            0o600,
            "has temp_dir = '/', expected an absolute, normalized path to an airflow_ray_* directory",
            id="temp-dir-that-names-everything",
        ),
        pytest.param(
            {"head_pid": "1"}, 0o600, "has head_pid = '1', expected a positive integer", id="pid-str"
        ),
        pytest.param({}, 0o666, "is writable by other users (mode 0666, expected 0600)", id="world-writable"),
        pytest.param({}, 0o620, "is writable by other users (mode 0620, expected 0600)", id="group-writable"),
    ],
)
def test_state_file_is_validated(state_dir, content, mode, problem):
    """A state file that is not ours or not well-formed is refused with what is wrong and how to fix."""
    from airflow_ray import cluster

    path = state_dir / "cluster.json"
    if isinstance(content, dict):
        state = {**dataclasses.asdict(_stale_state()), **content}
        content = json.dumps({k: v for k, v in state.items() if v is not DROP})
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(LocalClusterError) as raised:
        cluster.current()
    assert str(raised.value) == (
        f"The embedded Ray cluster's state file {path} {problem}: airflow-ray does not use it. To fix: "
        "run `airflow-ray cluster stop` (it removes the state file) and `airflow-ray cluster start`, "
        f"or remove {path}."
    )
    with pytest.raises(LocalClusterError, match="airflow-ray does not use it"):
        cluster.ensure_running()


def test_state_file_of_another_user_is_refused_and_stop_acts_on_nothing_it_says(state_dir):
    """A state file owned by someone else (here root's file given to nobody, or a symlink) is
    refused; ``stop()`` removes it without killing the processes it names."""
    from airflow_ray import cluster

    path = state_dir / "cluster.json"
    named = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "/tmp/airflow_ray_victim"]
    )
    try:
        _write_state(path, dataclasses.replace(_stale_state(), temp_dir="/tmp/airflow_ray_victim"))
        if os.getuid() == 0:
            os.chown(path, NOBODY, NOBODY)
            with pytest.raises(LocalClusterError, match=f"is owned by uid {NOBODY}, not by this user"):
                cluster.current()
        else:
            path.rename(state_dir / "elsewhere.json")
            path.symlink_to(state_dir / "elsewhere.json")
            with pytest.raises(LocalClusterError, match="cannot be opened"):
                cluster.current()
        assert cluster.stop() is True
        assert not path.exists() and named.poll() is None
    finally:
        named.kill()
        named.wait()


NOBODY = 65534


@pytest.mark.parametrize(
    "prepare, problem",
    [
        pytest.param(
            lambda path: os.chmod(path, 0o777),
            "is open to other users (mode 0777, expected 0700): anything in it may be planted",
            id="world-writable",
        ),
        pytest.param(
            lambda path: os.chmod(path, 0o750),
            "is open to other users (mode 0750, expected 0700): anything in it may be planted",
            id="group-readable",
        ),
        pytest.param(
            lambda path: os.chown(path, NOBODY, NOBODY),
            f"belongs to uid {NOBODY}, not to this user (uid {os.getuid()}): someone else created it",
            id="another-users",
            marks=pytest.mark.skipif(os.getuid() != 0, reason="chown to nobody needs root"),
        ),
    ],
)
def test_temp_dir_someone_else_prepared_is_refused(state_dir, prepare, problem):
    """Ray's temp dir has a predictable name in /tmp: one that exists and is not ours and
    private stops the start before ``ray start`` (no cluster, no token in its logs)."""
    from airflow_ray import cluster

    temp_dir = cluster.temp_dir_path()
    os.mkdir(temp_dir)
    try:
        prepare(temp_dir)
        with pytest.raises(LocalClusterError) as raised:
            cluster.ensure_running()
        assert str(raised.value) == (
            f"The embedded Ray cluster's temp dir {temp_dir} {problem}. To fix: remove it (as its owner "
            "or root), or move it elsewhere with [ray] local_cluster_dir (the temp dir's name follows it) "
            "or TMPDIR."
        )
        assert not (state_dir / "ray-start.log").exists()  # refused before `ray start`
    finally:
        shutil.rmtree(temp_dir)


def test_temp_dir_symlink_is_refused(state_dir, tmp_path):
    from airflow_ray import cluster

    temp_dir = cluster.temp_dir_path()
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, temp_dir)
    try:
        with pytest.raises(LocalClusterError, match="is not a directory \\(a symlink\\?\\)"):
            cluster.ensure_running()
    finally:
        os.unlink(temp_dir)


def _write_state(path: Path, state: LocalCluster) -> None:
    path.write_text(json.dumps(dataclasses.asdict(state)))
    path.chmod(0o600)


@functools.cache
def _stale_state(port: int | None = None) -> LocalCluster:
    """A state file's cluster whose head is gone: a pid that just exited, a port nothing listens on."""
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return LocalCluster(
        address=f"127.0.0.1:{port}",
        client_address="ray://127.0.0.1:1",
        dashboard_url=None,
        temp_dir="/tmp/airflow_ray_stale",
        started_at=1.0,
        head_pid=int(exited.stdout),
        head_started_at=1.0,
    )


def test_concurrent_token_creation_gives_every_caller_the_one_whole_token(tmp_path, monkeypatch):
    """On a fresh host several processes create Ray's token file at once (pytest workers, task
    processes starting the embedded cluster): none fails, none reads a half-written token, all use
    the first writer's, and no temp file is left beside it."""
    for attempt in range(25):
        path = tmp_path / f"host{attempt}" / "auth_token"
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        barrier = threading.Barrier(8)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            tokens = [f.result() for f in [pool.submit(_token_after, barrier) for _ in range(8)]]
        assert len(set(tokens)) == 1 and re.fullmatch(r"[0-9a-f]{64}", tokens[0]), tokens
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["auth_token"]


def _token_after(barrier: threading.Barrier) -> str:
    from airflow_ray import cluster

    barrier.wait()
    return cluster.ensure_token().read_text()
