"""The embedded local Ray cluster: what a newcomer gets when nothing is configured.

The cluster is a detached ``ray start --head`` on 127.0.0.1 that outlives the Airflow task
that started it, so later tasks share it and its object store (a private cluster per task
would take every object down with it). Starting is serialised with a file lock, so two tasks
that start at once end up with one cluster, and the address is kept in a small state file.
With the head starts the keeper (:mod:`airflow_ray.keeper`), a driver that creates the owner
actors and stays connected so that Ray keeps their workers between tasks.

Two Ray details shape this module (measured on Ray 2.60):

* ``--node-ip-address=127.0.0.1`` alone still binds most servers to every interface and
  advertises the machine's own IP. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's
  single-machine mode) makes every component bind to and advertise loopback; drivers need the
  same variable or they resolve "localhost" to the external IP and fail to connect.
* ``ray start --head`` turns token authentication on by default, but a driver only sends the
  token when ``RAY_AUTH_MODE=token``. We create the token (``~/.ray/auth_token``) if it is
  missing and set the mode explicitly on both sides.

.. code-block:: console

    $ airflow-ray cluster start
    $ airflow-ray cluster status
    $ airflow-ray cluster stop
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from airflow_ray import compat, config

LOOPBACK = "127.0.0.1"
#: Environment for every process that talks to the embedded cluster (see module docstring).
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
_START_TIMEOUT_S = 120.0
_LOCK_TIMEOUT_S = 300.0
_START_ATTEMPTS = 2
_KEEPER_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class LocalCluster:
    """Where the embedded cluster listens. Persisted as JSON in the state file."""

    address: str
    client_address: str
    dashboard_url: str | None
    temp_dir: str
    started_at: float

    @property
    def gcs_port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def ensure_running() -> LocalCluster:
    """Return the running embedded cluster, starting it first if needed (one at a time)."""
    cluster = _alive_cluster()
    if cluster is not None:
        return cluster
    with _locked():
        cluster = _alive_cluster()  # another process may have started it while we waited
        return cluster if cluster is not None else _start()


def start() -> LocalCluster:
    """Start the embedded cluster unless it is already running."""
    return ensure_running()


def stop() -> bool:
    """Stop the embedded cluster. Returns False if it was not running."""
    with _locked():
        cluster = _read_state()
        if cluster is None:
            return False
        _disconnect_from(cluster)
        _terminate_processes(cluster.temp_dir, cluster.address)
        _state_file().unlink(missing_ok=True)
        return True


def _disconnect_from(cluster: LocalCluster) -> None:
    """Leave the cluster before killing it if this process is one of its drivers.

    A Ray driver whose GCS dies ends its own process (exit status 1, unflushed output lost),
    which would take down e.g. a test session that stops the cluster in its teardown.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        gcs_address = ray.get_runtime_context().gcs_address
    except Exception:
        gcs_address = None
    if gcs_address in (None, cluster.address):
        ray.shutdown()
        from airflow_ray.owners import forget_owners

        forget_owners()


def current() -> LocalCluster | None:
    """The embedded cluster if it is running, without starting it."""
    return _alive_cluster()


def status(cluster: LocalCluster) -> dict[str, Any]:
    """Resources and object store use of the embedded cluster, read from its GCS and raylet."""
    compat.apply_env(LOCAL_ENV)
    return compat.cluster_status(cluster.address)


def ensure_token() -> Path:
    """Create Ray's default token file if it is missing; it is readable by its owner only."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def tcp_reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    """Cheap liveness probe: can we open a TCP connection?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- private helpers -----------------------------------------------------------------------


def _state_file() -> Path:
    return config.local_cluster_dir() / "cluster.json"


def _read_state() -> LocalCluster | None:
    try:
        return LocalCluster(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive_cluster() -> LocalCluster | None:
    cluster = _read_state()
    if cluster is not None and tcp_reachable(LOOPBACK, cluster.gcs_port):
        return cluster
    return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    directory = config.local_cluster_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "cluster.lock", "w") as lock:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Timed out waiting for {directory / 'cluster.lock'}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _start() -> LocalCluster:
    ensure_token()
    directory = config.local_cluster_dir()
    gcs_port, client_port = _free_port(), _free_port()
    # Ray's unix socket paths must stay short: keep the temp dir near the root, one per state
    # dir (stop() finds this cluster's processes by it).
    tag = zlib.crc32(str(directory.resolve()).encode())
    temp_dir = os.path.join(tempfile.gettempdir(), f"airflow_ray_{os.getuid()}_{tag:08x}")
    dashboard = config.local_cluster_dashboard()
    dashboard_port = _free_port() if dashboard else None
    cmd = [
        *_ray_cli(),
        "start",
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={gcs_port}",
        f"--ray-client-server-port={client_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--include-dashboard={str(dashboard).lower()}",
        f"--dashboard-host={LOOPBACK}",
        # The agent's HTTP port (the Jobs API submits through it) defaults to a fixed 52365:
        # a second cluster on the machine would fail to bind it and could never run a job.
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    if dashboard_port:
        cmd.append(f"--dashboard-port={dashboard_port}")
    if (num_cpus := config.local_cluster_num_cpus()) is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if (store := config.local_cluster_object_store_bytes()) is not None:
        cmd.append(f"--object-store-memory={store}")
    log_path = directory / "ray-start.log"
    env = {**os.environ, **LOCAL_ENV}
    # Ray Job entrypoints ("python train.py") run through the shell with this PATH: make
    # "python" the interpreter that runs Ray, also when its virtualenv is not activated.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    for var in ("RAY_ADDRESS", "RAY_URL", "RAY_AUTH_TOKEN"):
        env.pop(var, None)  # the embedded cluster always uses the local token file
    for attempt in range(1, _START_ATTEMPTS + 1):
        with open(log_path, "w") as log:
            proc = subprocess.run(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=_START_TIMEOUT_S,
                start_new_session=True,  # survive the Airflow task process that started it
                check=False,
            )
        if proc.returncode == 0:
            break
        # Ray gives its raylet a fixed 30 s to register; on an overloaded machine that can
        # fail once. Clean up what did start and try again before giving up.
        _terminate_processes(temp_dir, f"{LOOPBACK}:{gcs_port}")
        if attempt == _START_ATTEMPTS:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}); see {log_path}:\n{tail}")
    cluster = LocalCluster(
        address=f"{LOOPBACK}:{gcs_port}",
        client_address=f"ray://{LOOPBACK}:{client_port}",
        dashboard_url=f"http://{LOOPBACK}:{dashboard_port}" if dashboard_port else None,
        temp_dir=temp_dir,
        started_at=time.time(),
    )
    # Before the state file: no task may find the cluster and create an owner before the keeper.
    if config.local_cluster_keeper():
        _start_keeper(cluster, env)
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cluster), indent=2))
    tmp.replace(_state_file())
    return cluster


def _start_keeper(cluster: LocalCluster, env: dict[str, str]) -> None:
    """Start the driver that creates the owner actors and keeps their Ray job alive.

    See :mod:`airflow_ray.keeper`. Without it everything still works, each Ray task only
    waits for a fresh worker process, so a keeper that fails to start is a warning.
    """
    import logging

    from airflow_ray import deployment

    try:
        deployment_id = deployment.current().id
    except Exception as exc:  # e.g. `airflow-ray cluster start` where the metadata DB is out of reach
        logging.getLogger(__name__).warning(
            "No keeper for the embedded cluster (this deployment's id is unknown here: %s): "
            "Ray tasks will start a new worker process each",
            exc,
        )
        return
    directory = config.local_cluster_dir()
    ready = directory / "keeper.ready"
    ready.unlink(missing_ok=True)
    log_path = directory / "keeper.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "airflow_ray.keeper"),
                *(cluster.address, cluster.temp_dir, str(ready), deployment_id),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + _KEEPER_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            logging.getLogger(__name__).warning(
                "The embedded cluster's keeper did not start (see %s): Ray tasks will start a new "
                "worker process each",
                log_path,
            )
            return
        time.sleep(0.2)


def _terminate_processes(temp_dir: str, address: str) -> None:
    """Stop exactly this cluster's processes.

    ``ray stop`` kills every Ray process of the machine, other clusters included; we only
    kill the processes that name our temp dir or GCS address, and their children (workers,
    agents), so a user's own Ray cluster next to the embedded one is left alone.
    """
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        # the whole argument: "--address=127.0.0.1:6379" must not match a cluster on port 63790
        if temp_dir in " ".join(args) or f"--address={address}" in args:
            roots.append(proc)
    victims = {p.pid: p for root in roots for p in [root, *_children(root)]}
    victims.pop(os.getpid(), None)  # a caller whose own command line names the temp dir
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(victims.values()), timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _children(proc: Any) -> list[Any]:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []
