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

Whoever connects sends that token, and then pickled functions and credentials, to the address
in the state file; a stale file whose port another local user has since taken would hand them
over. So the state file records who the head is (the ``gcs_server`` process listening on the
port: its pid, start time and owner, found when the cluster starts) and is trusted only while
that very process still runs (0.06 ms a check, read from ``/proc``; no byte is sent). While it
runs it holds the port, so nobody else can listen there. The file itself is input too: it must
be ours, not writable by others, and well-formed. Ray's temp dir (sockets, logs, spilled
objects) lives in a dir with a predictable name in ``/tmp``: it is ours and 0700, or we refuse it.

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
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
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
#: A process's start time is derived from the boot time, which moves when the wall clock is set.
_START_TIME_TOLERANCE_S = 1.0
_MAX_STATE_BYTES = 64 * 1024
_FIX = (
    "run `airflow-ray cluster stop` (it removes the state file) and `airflow-ray cluster start`, "
    "or remove {path}"
)


class LocalClusterError(RuntimeError):
    """The embedded cluster's state file or temp dir cannot be trusted; the message says how to fix it."""


@dataclass(frozen=True)
class LocalCluster:
    """Where the embedded cluster listens and who its head is. Persisted as JSON in the state file.

    ``head_pid`` and ``head_started_at`` identify the head's ``gcs_server`` process (the one
    listening on ``address``): a connection trusts the address only while that process runs.
    ``temp_dir`` is the cluster's private dir (:func:`temp_dir_path`), Ray's own is ``<it>/ray``.
    """

    address: str
    client_address: str
    dashboard_url: str | None
    temp_dir: str
    started_at: float
    head_pid: int
    head_started_at: float

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
    """Stop the embedded cluster. Returns False if it was not running.

    A state file we cannot trust is removed without acting on anything it says; a stale one
    (its head is gone) stops what is left in its temp dir, but nothing found by its port, which
    may belong to someone else by now.
    """
    with _locked():
        try:
            cluster = _read_state()
        except LocalClusterError:
            _state_file().unlink(missing_ok=True)
            return True
        if cluster is None:
            return False
        _disconnect_from(cluster)
        is_head = _head_mismatch(cluster) is None
        _terminate_processes(cluster.temp_dir, cluster.address if is_head else None)
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
    """The embedded cluster if it is running, without starting it.

    None also when the state file is stale, whatever listens on its port now: that is not ours.
    """
    cluster = _read_state()
    return cluster if cluster is not None and _head_mismatch(cluster) is None else None


def status(cluster: LocalCluster) -> dict[str, Any]:
    """Resources and object store use of the embedded cluster, read from its GCS and raylet."""
    compat.apply_env(LOCAL_ENV)
    return compat.cluster_status(cluster.address)


def ensure_token() -> Path:
    """Create Ray's default token file if it is missing; it is readable by its owner only.

    Several processes may start the embedded cluster at once on a fresh host (Airflow task
    processes, pytest workers): the token is written to a private temp file and hard-linked into
    place, so the file appears whole or not at all and the first writer's token wins; a reader
    never sees it empty, and a loser of the race uses the winner's token.
    """
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        os.unlink(temp)
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
    """The state file's cluster, None if there is no file; raises if the file is not trustworthy.

    Opened without following a symlink, then checked on the open file (no swap in between).
    """
    path = _state_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _state_error(path, f"cannot be opened ({exc.strerror}); it must be a regular file") from exc
    with os.fdopen(fd) as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _state_error(path, "is not a regular file")
        if info.st_uid != os.getuid():
            raise _state_error(path, f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
        if info.st_mode & 0o022:
            raise _state_error(
                path, f"is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}, expected 0600)"
            )
        text = file.read(_MAX_STATE_BYTES)
    return _parse_state(path, text)


def _parse_state(path: Path, text: str) -> LocalCluster:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _state_error(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _state_error(path, f"holds {type(data).__name__}, expected a JSON object")
    names = [field.name for field in fields(LocalCluster)]
    if missing := [name for name in names if name not in data]:
        raise _state_error(path, f"lacks {', '.join(missing)} (written by an older airflow-ray?)")
    if unknown := sorted(set(data) - set(names)):
        raise _state_error(path, f"has unknown fields {', '.join(unknown)}")
    for name in names:
        valid, expected = _STATE_FIELDS[name]
        if not valid(data[name]):
            raise _state_error(path, f"has {name} = {data[name]!r}, expected {expected}")
    return LocalCluster(**data)


def _is_loopback_url(prefix: str) -> Callable[[Any], bool]:
    pattern = re.compile(re.escape(f"{prefix}{LOOPBACK}:") + r"([0-9]{1,5})")

    def valid(value: Any) -> bool:
        match = pattern.fullmatch(value) if isinstance(value, str) else None
        return match is not None and 0 < int(match.group(1)) < 65536

    return valid


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _is_temp_dir(value: Any) -> bool:
    """Our temp dir's shape: ``stop()`` kills the processes naming it, so never "/" or the like."""
    return (
        isinstance(value, str)
        and os.path.isabs(value)
        and os.path.normpath(value) == value
        and os.path.basename(value).startswith("airflow_ray_")
    )


#: What each field of the state file must be: (check, what the error says is expected).
_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "address": (_is_loopback_url(""), f"'{LOOPBACK}:<port>'"),
    "client_address": (_is_loopback_url("ray://"), f"'ray://{LOOPBACK}:<port>'"),
    "dashboard_url": (
        lambda value: value is None or _is_loopback_url("http://")(value),
        f"null or 'http://{LOOPBACK}:<port>'",
    ),
    "temp_dir": (_is_temp_dir, "an absolute, normalized path to an airflow_ray_* directory"),
    "started_at": (_is_number, "a positive number (seconds since the epoch)"),
    "head_pid": (lambda value: _is_number(value) and isinstance(value, int), "a positive integer"),
    "head_started_at": (_is_number, "a positive number (seconds since the epoch)"),
}


def _state_error(path: Path, problem: str) -> LocalClusterError:
    return LocalClusterError(
        f"The embedded Ray cluster's state file {path} {problem}: airflow-ray does not use it. To fix: "
        + _FIX.format(path=path)
        + "."
    )


def _head_mismatch(cluster: LocalCluster) -> str | None:
    """Why the process recorded as the head is not it any more; None if it is.

    Reads ``/proc`` only: nothing is sent to the port before the head is known to be ours.
    """
    import psutil

    pid = cluster.head_pid
    try:
        proc = psutil.Process(pid)
        started, uid, name = proc.create_time(), proc.uids().real, proc.name()
    except psutil.NoSuchProcess:
        return f"its head (gcs_server, pid {pid}) is no longer running"
    except psutil.Error as exc:
        return f"its head's pid {pid} cannot be inspected ({exc})"
    if abs(started - cluster.head_started_at) > _START_TIME_TOLERANCE_S:
        return (
            f"pid {pid} is no longer its head: that process started at {_iso(started)}, "
            f"the head at {_iso(cluster.head_started_at)}"
        )
    if uid != os.getuid() or name != "gcs_server":
        return f"pid {pid} is {name!r} of uid {uid}, not a gcs_server of this user (uid {os.getuid()})"
    return None


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _alive_cluster() -> LocalCluster | None:
    """The state file's cluster if its head still runs; None if a fresh one should start.

    A stale state file with nothing on its port is what a crash or reboot leaves: start anew.
    A stale state file with something listening on its port is refused: airflow-ray did not
    start that listener and must not send it the token (the probe only opens and closes a TCP
    connection, sending no byte).
    """
    cluster = _read_state()
    if cluster is None:
        return None
    mismatch = _head_mismatch(cluster)
    if mismatch is None:
        return cluster
    if tcp_reachable(LOOPBACK, cluster.gcs_port):
        path = _state_file()
        raise LocalClusterError(
            f"The embedded Ray cluster's state file {path} is stale: {mismatch}, yet something else "
            f"listens on its port {cluster.address}. airflow-ray sent nothing there (it could be another "
            "local user's process waiting for the cluster's token). To fix: " + _FIX.format(path=path) + "."
        )
    return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    directory = config.local_cluster_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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


def temp_dir_path() -> str:
    """The embedded cluster's private dir, which holds Ray's temp dir (``<it>/ray``).

    Ray's unix socket paths must stay short: the dir stays near the root, one per state dir
    (``stop()`` finds this cluster's processes by it), so its name is predictable and
    :func:`_private_dir` checks who made it. Ray makes its own temp dir world-writable (0777,
    "so others can use it"): that one lives inside ours, which nobody else may enter.
    """
    tag = zlib.crc32(str(config.local_cluster_dir().resolve()).encode())
    return os.path.join(tempfile.gettempdir(), f"airflow_ray_{os.getuid()}_{tag:08x}")


def _private_dir(path: str) -> None:
    """Create ``path`` with mode 0700, or accept an existing one only if it is ours and 0700.

    Someone who made the dir, or may read or write it, could read the cluster's logs and
    spilled objects, reach its sockets, or plant files Ray trusts.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory (a symlink?)"
    elif info.st_uid != os.getuid():
        problem = (
            f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): someone else created it"
        )
    elif mode & 0o077:
        problem = f"is open to other users (mode {mode:04o}, expected 0700): anything in it may be planted"
    else:
        return
    raise LocalClusterError(
        f"The embedded Ray cluster's temp dir {path} {problem}. To fix: remove it (as its owner or root), "
        "or move it elsewhere with [ray] local_cluster_dir (the temp dir's name follows it) or TMPDIR."
    )


def _start() -> LocalCluster:
    directory = config.local_cluster_dir()
    temp_dir = temp_dir_path()
    _private_dir(temp_dir)
    ensure_token()
    gcs_port, client_port = _free_port(), _free_port()
    dashboard = config.local_cluster_dashboard()
    dashboard_port = _free_port() if dashboard else None
    cmd = [
        *_ray_cli(),
        "start",
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={gcs_port}",
        f"--ray-client-server-port={client_port}",
        f"--temp-dir={os.path.join(temp_dir, 'ray')}",
        "--disable-usage-stats",
        f"--include-dashboard={str(dashboard).lower()}",
        f"--include-log-monitor={str(config.local_cluster_log_monitor()).lower()}",
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
    head = _find_head(temp_dir, gcs_port)
    cluster = LocalCluster(
        address=f"{LOOPBACK}:{gcs_port}",
        client_address=f"ray://{LOOPBACK}:{client_port}",
        dashboard_url=f"http://{LOOPBACK}:{dashboard_port}" if dashboard_port else None,
        temp_dir=temp_dir,
        started_at=time.time(),
        head_pid=head.pid,
        head_started_at=head.create_time(),
    )
    # Before the state file: no task may find the cluster and create an owner before the keeper.
    if config.local_cluster_keeper():
        _start_keeper(cluster, env)
    _write_state(cluster)
    return cluster


def _find_head(temp_dir: str, gcs_port: int) -> Any:
    """The ``gcs_server`` of ours that ``ray start`` left listening on the port (a psutil.Process)."""
    import psutil

    for proc in psutil.process_iter(["name", "uids", "cmdline"]):
        if proc.info["name"] != "gcs_server" or proc.info["uids"].real != os.getuid():
            continue
        if temp_dir not in " ".join(proc.info["cmdline"] or []):
            continue
        with contextlib.suppress(psutil.Error):
            listening = proc.net_connections(kind="tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == gcs_port for c in listening):
                return proc
    _terminate_processes(temp_dir, f"{LOOPBACK}:{gcs_port}")
    raise RuntimeError(
        f"`ray start --head` succeeded but no gcs_server of this user listens on {LOOPBACK}:{gcs_port}; "
        f"see {config.local_cluster_dir() / 'ray-start.log'}"
    )


def _write_state(cluster: LocalCluster) -> None:
    """Replace the state file atomically; mkstemp makes it 0600 (``_read_state`` insists on it)."""
    fd, tmp = tempfile.mkstemp(dir=_state_file().parent, prefix="cluster.", suffix=".tmp")
    with os.fdopen(fd, "w") as file:
        json.dump(asdict(cluster), file, indent=2)
    os.replace(tmp, _state_file())


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


def _terminate_processes(temp_dir: str, address: str | None) -> None:
    """Stop exactly this cluster's processes (:func:`processes_of`): SIGTERM, then SIGKILL
    whatever still runs after 10 s."""
    import psutil

    victims = processes_of(temp_dir, address)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(victims, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def processes_of(temp_dir: str, address: str | None) -> list[Any]:
    """The processes of one local cluster (``psutil.Process``), never this one.

    ``ray stop`` kills every Ray process of the machine, other clusters included; a cluster's
    own are those that name its temp dir or GCS address (None: the temp dir only), and their
    children (workers, agents), so a user's own Ray cluster next to the embedded one is left
    alone.
    """
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        # the whole argument: "--address=127.0.0.1:6379" must not match a cluster on port 63790
        if temp_dir in " ".join(args) or (address is not None and f"--address={address}" in args):
            roots.append(proc)
    found = {p.pid: p for root in roots for p in [root, *_children(root)]}
    found.pop(os.getpid(), None)  # a caller whose own command line names the temp dir
    return list(found.values())


def _children(proc: Any) -> list[Any]:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []
