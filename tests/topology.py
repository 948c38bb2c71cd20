"""A production-shaped deployment on one machine: hosts as network namespaces, services on them.

Production is not one host: Airflow's workers run on their own machines, the Ray cluster is
remote and multi-node, and an Airflow worker reaches Ray either as a zero-CPU Ray node
(``auto``: a local raylet) or as a Ray Client (``ray://head:10001``). The embedded cluster
hides all of that (one loopback, one ``/tmp/ray``), so these hosts are made real enough to
break what only breaks across hosts:

==========  ==============  ==================================================================
host        address         runs
==========  ==============  ==================================================================
art_h1      198.18.0.1      Ray head: GCS :6379, Ray Client server :10001, dashboard/Jobs :8265
art_h2      198.18.0.2      Ray worker node with the custom resource ``host2``
art_h3      198.18.0.3      ``airflow celery worker`` on queue ``h3`` + a zero-CPU Ray node
art_h4      198.18.0.4      ``airflow celery worker`` on queue ``h4`` + a zero-CPU Ray node
art_h5      198.18.0.5      PostgreSQL, Redis, api-server :8080, scheduler, dag-processor,
                            triggerer (``CeleryExecutor``)
==========  ==============  ==================================================================

Each host is a network namespace on the bridge ``art_br0`` (198.18.0.254/24 in the root
namespace, where the tests run), with its own UTS namespace (hostname ``art-hN``, which Airflow
records as the task instance's hostname) and mount namespace, where ``/tmp/art_tmp`` (its
``TMPDIR``, so Ray's ``/tmp/art_tmp/ray``) is the host's own directory: every Ray node then
has the same temp path with its own contents, as on real hosts. That matters: a worker node
writes its cluster address (``ray_current_cluster``, read by ``address="auto"``) under the
head's temp path, and with per-host paths a driver's ``auto`` found no file and fell back to
any ``gcs_server`` process on the machine, another engineer's included. And its own PID
namespace (:meth:`Host.boot`): a driver that joins with ``auto`` chooses its node among the
raylet processes it sees, so seeing every host's made it choose the head's. Each host has an
on-link default route (no gateway, nothing forwards it): Ray finds a node's IP by connecting a
UDP socket to 8.8.8.8 (no packet is sent); without a route it falls back to 127.0.0.1 and a
driver on a zero-CPU node waits forever for a raylet there.

Everything belongs to one session at a time (a lock file): names and addresses are fixed,
and what a crashed earlier run left (namespaces, links, their processes, its directory) is
removed by name before starting. Processes are ended by the namespace they run in, never by
name, and never with ``ray stop`` (it kills every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TESTS
from tests.services import SHARED_CONFIG, AirflowServices, wait

PREFIX = "art_"
BRIDGE = f"{PREFIX}br0"
NET = "198.18.0"
BRIDGE_IP = f"{NET}.254"
HEAD, WORKER, AIRFLOW_A, AIRFLOW_B, SERVICES = 1, 2, 3, 4, 5
#: Each host's TMPDIR: one path, a directory of its own behind it (its mount namespace).
HOST_TMP = Path(f"/tmp/{PREFIX}tmp")
LOCK = Path(f"/tmp/{PREFIX}topology.lock")
VENV_BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
API_PORT, PG_PORT, REDIS_PORT = 8080, 5432, 6379
RAY_GCS, RAY_CLIENT, RAY_DASHBOARD = (
    f"{NET}.{HEAD}:6379",
    f"ray://{NET}.{HEAD}:10001",
    f"http://{NET}.{HEAD}:8265",
)
#: Celery queue each Airflow worker host listens on.
QUEUES = {AIRFLOW_A: "h3", AIRFLOW_B: "h4"}
#: Airflow connections of every Airflow host: both ways an Airflow worker reaches the cluster.
CONNECTIONS = {"ray_node": "auto", "ray_client": RAY_CLIENT}
OBJECT_STORE_BYTES = 200 * 1024**2
#: ``ray start`` on the hosts runs ahead of everything else on the machine: the topology's tests
#: run beside the rest of the suite (``scripts/test``), and Ray gives a raylet 30 s to register
#: with the GCS, which its nodes missed at equal priority on 2 loaded cores.
NICE = -10
#: PID 1 of each host: reaps the processes orphaned there (``ray start`` leaves its daemons).
_REAPER_MARK = "art-reaper"
_REAPER = f"""# {_REAPER_MARK}
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


@dataclass
class Host:
    """One machine of the topology: a network namespace with its own hostname, TMPDIR and HOME."""

    number: int
    root: Path
    #: PID 1 of the host's PID namespace (:meth:`boot`), as this machine's root namespace sees it.
    init_pid: int = 0
    #: The processes holding the host's namespaces: ``unshare`` and PID 1.
    holders: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{PREFIX}h{self.number}"

    @property
    def ip(self) -> str:
        return f"{NET}.{self.number}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    def boot(self) -> None:
        """The host's own namespaces, held by a reaper as PID 1 that every command then enters.

        UTS: its hostname (``art-hN``, which Airflow records as a task instance's hostname).
        Mount: its own ``/tmp/art_tmp`` and ``/proc``. PID: it sees only its own processes, as a
        real host does. That matters to Ray: a driver joining with ``address="auto"`` picks its
        node among the raylet processes it can see, and preferred the head's when it saw every
        host's; it then told the cluster the head's IP as its own, and whatever a Ray worker had
        to fetch from that driver (a plain task's output handed to its owner) never arrived.
        """
        setup = (
            f"hostname art-h{self.number} && mount --bind {self.root / 'tmp'} {HOST_TMP}"
            f' && exec "{sys.executable}" -c "$1"'
        )
        unshare = ["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", setup]
        with open(self.logs / "init.log", "w") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *unshare, "sh", _REAPER],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

        def reaping() -> bool:  # PID 1 exec'd the reaper: the hostname and mounts are in place
            pids = children.read_text().split() if children.exists() else []
            return bool(pids) and _REAPER_MARK in cmdline(int(pids[0]))

        wait(reaping, f"{self.name}'s namespaces", 60)
        self.init_pid = int(children.read_text().split()[0])
        self.holders = (proc.pid, self.init_pid)

    def argv(self, args: list[str]) -> list[str]:
        """``args`` run on this host: in its network, UTS, mount and PID namespaces."""
        namespaces = ["--net", "--uts", "--mount", "--pid"]
        return ["nsenter", f"--target={self.init_pid}", *namespaces, "--", *args]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment without Ray's variables (a test process that has connected
        to the embedded cluster carries its single-machine ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
        which makes ``ray start`` on another host refuse to join), with the host's home and temp."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**inherited, "HOME": str(self.home), "TMPDIR": str(HOST_TMP), **(extra or {})}

    def airflow_env(self, config: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of Airflow's processes here: ``config`` (the deployment's Airflow
        configuration) with this host's Airflow home, then ``extra`` over both."""
        return self.env({**config, "AIRFLOW_HOME": str(self.airflow_home), **(extra or {})})

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A long-running service, its output in ``logs/<name>.log``."""
        with open(self.logs / f"{name}.log", "w") as log:
            return subprocess.Popen(
                self.argv(args), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def run(self, args: list[str], env: dict[str, str], timeout: float = 300) -> str:
        """A command that ends; fails with its output unless it succeeds."""
        proc = subprocess.run(self.argv(args), env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(
                f"{args[:3]} on {self.name} exited {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def pids(self, command_containing: str = "") -> list[int]:
        """This host's processes (those whose command line contains ``command_containing``)."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        pids = [int(pid) for pid in out.split()]
        return [pid for pid in pids if not command_containing or command_containing in cmdline(pid)]


@dataclass
class CeleryAirflow(AirflowServices):
    """The Airflow services of the topology: their metadata DB is PostgreSQL, read over the bridge."""

    dsn: str = ""

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()  # type: ignore[arg-type]

    #: XCom values are JSON columns here: read as text, decoded as the SQLite rows are.
    xcom_value_sql = "value::text"


@dataclass
class Topology:
    """The running hosts, the Airflow services on them and the Ray cluster's token."""

    root: Path
    hosts: dict[int, Host]
    token: str
    airflow: CeleryAirflow
    checkpoints: Path
    #: The Airflow configuration every Airflow host shares (its own ``AIRFLOW_HOME`` aside).
    airflow_env: dict[str, str] = field(default_factory=dict)
    #: Each host's environment for its Ray node.
    ray_env: dict[int, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: Each Ray node's object store (``/dev/shm`` is shared by all hosts of this machine).
    object_store_bytes: int = OBJECT_STORE_BYTES

    def start_ray(self) -> None:
        """The head, then the other nodes (each ``ray start`` returns once its node runs)."""
        self.start_head()
        self.start_nodes()

    def start_nodes(self) -> None:
        """Host 2's node and the zero-CPU nodes of the Airflow hosts, in parallel."""
        nodes = {WORKER: ["--num-cpus=1", "--resources=" + json.dumps({"host2": 1})]}
        nodes |= {n: ["--num-cpus=0"] for n in QUEUES}
        with ThreadPoolExecutor(len(nodes)) as pool:
            for future in [pool.submit(self._start_node, n, args) for n, args in nodes.items()]:
                future.result()

    def _start_node(self, n: int, args: list[str], attempts: int = 3) -> None:
        """``ray start`` of a worker node, again if its raylet did not register in Ray's 30 s
        (``The current node timed out during startup``: seen while Airflow's processes start)."""
        host = self.hosts[n]
        for attempt in range(attempts):
            try:
                host.run(self._ray_start(host, f"--address={RAY_GCS}", *args), self.ray_env[n])
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                _kill(self._ray_pids(n))

    def start_head(self, attempts: int = 3) -> None:
        """``ray start --head``, until its Ray Client server stays up.

        Ray starts the client server beside the raylet, and the server gives up when the raylet
        has not registered with the GCS within 30 s (``get_node_with_retry``): on a loaded
        machine (2 cores, other test processes) the raylet waits ~20 s for the dashboard agent
        alone, and the head comes up without a client server. Then the head is started again.
        """
        head = self.hosts[HEAD]
        args = self._ray_start(
            head,
            "--head",
            "--port=6379",
            "--num-cpus=1",
            "--ray-client-server-port=10001",
            "--dashboard-host=0.0.0.0",
        )
        for _ in range(attempts):
            head.run(args, self.ray_env[HEAD])
            try:
                wait(lambda: _listening(head.ip, 10001) or _client_server_died(head), "the client server", 60)
                if _listening(head.ip, 10001):
                    return
            except TimeoutError:
                pass
            _kill(self._ray_pids(HEAD))  # not the processes holding the host's namespaces
            shutil.rmtree(head.root / "tmp" / "ray", ignore_errors=True)
        raise RuntimeError(f"the Ray Client server on {head.ip}:10001 did not stay up in {attempts} starts")

    def _ray_start(self, host: Host, *args: str) -> list[str]:
        """``ray start`` on ``host``: its own address and object store."""
        return [
            "nice",
            f"-n{NICE}",
            str(VENV_BIN / "ray"),
            "start",
            f"--node-ip-address={host.ip}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
            # Ray's log monitor tails every worker log on its node for drivers that print their
            # workers' output; no driver here does (the Ray Job prints from its own process).
            "--include-log-monitor=false",
            *args,
        ]

    def kill_ray(self) -> None:
        """SIGKILL every Ray process of every node, as a crash of the whole cluster would."""
        _kill([pid for n in (HEAD, WORKER, *QUEUES) for pid in self._ray_pids(n)])

    def kill_node(self, n: int) -> None:
        """SIGKILL the Ray node of host ``n`` (raylet, object store, workers), as a host crash would."""
        _kill(self._ray_pids(n))

    def airflow_host_env(self, n: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of Airflow's processes on host ``n`` (a Celery worker's, a CLI's)."""
        return self.hosts[n].airflow_env(self.airflow_env, extra)

    def _ray_pids(self, n: int) -> list[int]:
        """Ray's processes on host ``n``: those naming the host's Ray temp path (raylet, agents,
        workers, GCS), and on the head and host 2, which run nothing else, every process but
        those holding the host's namespaces."""
        host = self.hosts[n]
        if n in (HEAD, WORKER):
            return [pid for pid in host.pids() if pid not in host.holders]
        return host.pids(str(HOST_TMP / "ray"))

    def restart_ray(self) -> None:
        """A crash of the whole cluster and a fresh start: every object and actor is gone."""
        self.kill_ray()
        for n in (HEAD, WORKER, *QUEUES):
            shutil.rmtree(self.hosts[n].root / "tmp" / "ray", ignore_errors=True)
        self.start_ray()


@contextlib.contextmanager
def topology(
    dag_files: list[Path],
    *,
    airflow_env: dict[str, str] | None = None,
    object_store_bytes: int = OBJECT_STORE_BYTES,
) -> Iterator[Topology]:
    """Start the five hosts and their services (``dag_files`` are the DAGs); remove them on exit.

    ``airflow_env`` adds to the Airflow configuration of every Airflow host (benchmarks swap the
    XCom backend), ``object_store_bytes`` sizes each Ray node's object store.
    """
    if os.geteuid() != 0:
        pytest.skip("the topology needs root (network namespaces)")
    tools = ("ip", "unshare", "nsenter", "runuser", "redis-server")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        missing.append("postgresql (initdb)")
    if missing:
        pytest.skip(
            f"the topology needs {', '.join(missing)}: "
            "apt-get install iproute2 util-linux postgresql redis-server (.ci/run does)"
        )
    with _exclusive():
        _remove_leftovers()
        started = time.monotonic()
        root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        root.chmod(0o755)
        hosts = {n: Host(n, root / f"h{n}") for n in range(1, 6)}
        try:
            topo = _prepare(root, hosts, dag_files, airflow_env or {})
            topo.object_store_bytes = object_store_bytes
            _network(hosts)
            for host in hosts.values():
                host.boot()
            try:
                _start_phases(topo)
            except Exception:
                for log in sorted(root.glob("h*/logs/*.log")):  # before they are removed
                    print(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
                raise
            topo.timings["start"] = round(time.monotonic() - started, 1)
            yield topo
        finally:
            for host in hosts.values():
                _kill(host.pids())
            _remove_network()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def celery_topology() -> Iterator[Topology]:
    """The topology with ``tests/dags/topology.py``, shared by every multi-host test.

    A SIGTERM (``scripts/test`` stopped, a CI timeout) ends the session like Ctrl-C, so the hosts
    are removed and the lock released instead of left running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with topology([TESTS / "dags" / "topology.py"]) as topo:
        yield topo


# --- private helpers -----------------------------------------------------------------------


def _prepare(
    root: Path, hosts: dict[int, Host], dag_files: list[Path], extra_env: dict[str, str]
) -> Topology:
    """Directories, the cluster token (the head's, copied to every node as a deployment would)
    and the Airflow configuration shared by the Airflow hosts."""
    token = secrets.token_hex(32)
    for host in hosts.values():
        for sub in ("home/.ray", "tmp", "logs"):
            (host.root / sub).mkdir(parents=True)
        (host.root / "tmp").chmod(0o1777)  # the postgres user's temp files too
        (host.home / ".ray" / "auth_token").write_text(token)
    HOST_TMP.mkdir(exist_ok=True)
    dags = root / "dags"
    dags.mkdir()
    for path in dag_files:
        (dags / path.name).symlink_to(path)
    checkpoints = root / "checkpoints"  # every host sees it: a shared volume
    checkpoints.mkdir()
    services = hosts[SERVICES].ip
    db = f"airflow@{services}:{PG_PORT}/airflow"
    api = f"http://{services}:{API_PORT}"
    connection = {"conn_type": "ray", "password": token, "extra": {"dashboard_url": RAY_DASHBOARD}}
    airflow_env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql://{db}",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{services}:{REDIS_PORT}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{db}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        # As docs/deploy.md recommends: Ray imported before the worker forks task processes.
        "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": json.dumps({"imports": ["airflow_ray.preload"]}),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        **SHARED_CONFIG,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": services,
        "AIRFLOW__API__PORT": str(API_PORT),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__API_AUTH__JWT_SECRET": "topology-test-secret",
        "AIRFLOW__RAY__DEPLOYMENT_ID": "topology",
        "AIRFLOW__RAY__XCOM_CONN_ID": "ray_node",
        "AIRFLOW__RAY__CHECKPOINT_PATH": checkpoints.as_uri(),
        **{
            f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps({**connection, "host": address})
            for conn_id, address in CONNECTIONS.items()
        },
        "PYTHONPATH": str(TESTS.parent),
        **extra_env,
    }
    home = hosts[SERVICES].airflow_home
    airflow = CeleryAirflow(
        env=hosts[SERVICES].airflow_env(airflow_env),
        home=home,
        url=api,
        dsn=f"host={services} port={PG_PORT} user=airflow dbname=airflow",
    )
    home.mkdir(parents=True)
    airflow.logs.symlink_to(hosts[SERVICES].logs)  # where AirflowServices looks for scheduler.log
    return Topology(
        root=root,
        hosts=hosts,
        token=token,
        airflow=airflow,
        checkpoints=checkpoints,
        airflow_env=airflow_env,
        # Only the nodes' own processes run with RAY_AUTH_MODE: Airflow's get it from the hook.
        ray_env={n: host.env({"RAY_AUTH_MODE": "token"}) for n, host in hosts.items()},
    )


def _start_phases(topo: Topology) -> None:
    """Start everything in three phases, each pairing light work with heavy work.

    Ray gives a raylet 30 s to register with the GCS, and its client server as long: starting
    Airflow's six processes at the same time as the Ray nodes made both miss it on 2 cores.
    So the head starts beside the databases, the worker nodes beside ``airflow db migrate``, and
    the Airflow services once every Ray node runs.
    """
    with ThreadPoolExecutor(1) as pool:
        databases = pool.submit(_timed, topo, "databases", lambda: _start_databases(topo))
        _timed(topo, "ray head", topo.start_head)
        databases.result()
    migrate = [sys.executable, "-m", "airflow", "db", "migrate"]
    with ThreadPoolExecutor(1) as pool:
        migrated = pool.submit(
            _timed,
            topo,
            "db migrate",
            lambda: topo.hosts[SERVICES].run(migrate, topo.airflow.env, timeout=600),
        )
        _timed(topo, "ray nodes", topo.start_nodes)
        migrated.result()
    _timed(topo, "airflow", lambda: _start_airflow(topo))


def _start_databases(topo: Topology) -> None:
    """PostgreSQL (run as the ``postgres`` user: it refuses root) with an ``airflow`` database, and Redis."""
    host = topo.hosts[SERVICES]
    assert PG_BIN is not None
    pgdata = host.root / "pg"
    pgdata.mkdir()
    shutil.chown(pgdata, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    host.run(
        [
            *as_postgres,
            str(PG_BIN / "initdb"),
            "-D",
            str(pgdata),
            "-U",
            "airflow",
            "-A",
            "trust",
            "-E",
            "UTF8",
        ],
        host.env(),
    )
    with open(pgdata / "pg_hba.conf", "a") as hba:  # initdb's trust covers loopback only
        hba.write(f"host all all {NET}.0/24 trust\n")
    postgres = [
        *as_postgres,
        str(PG_BIN / "postgres"),
        f"--listen_addresses={host.ip}",
        f"--unix_socket_directories={pgdata}",
        "--max_connections=300",
        # A throw-away DB: no durability, and no flushing that a loaded machine waits on.
        "--fsync=off",
        "--synchronous_commit=off",
        "--full_page_writes=off",
        "-D",
        str(pgdata),
    ]
    host.start("postgres", postgres, host.env())
    redis = [
        "redis-server",
        "--bind",
        host.ip,
        "--port",
        str(REDIS_PORT),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    host.start("redis", redis, host.env())
    wait(lambda: _listening(host.ip, PG_PORT), "PostgreSQL", 60)
    host.run([str(PG_BIN / "createdb"), "-h", host.ip, "-U", "airflow", "airflow"], host.env())


def _start_airflow(topo: Topology) -> None:
    """The Airflow services on host 5 and a Celery worker on each Airflow host."""
    host = topo.hosts[SERVICES]
    airflow = [sys.executable, "-m", "airflow"]
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        host.start(name, [*airflow, name], topo.airflow.env)
    for n, queue in QUEUES.items():
        topo.hosts[n].start(
            "celery-worker",
            [*airflow, "celery", "worker", "--queues", queue, "--celery-hostname", f"{queue}@art-h{n}"],
            topo.airflow_host_env(n),
        )
    wait(topo.airflow.api_ready, "the api-server", 240)
    for n in QUEUES:
        log = topo.hosts[n].logs / "celery-worker.log"
        wait(lambda log=log: " ready." in log.read_text(), f"the Celery worker on {topo.hosts[n].name}", 240)


def _network(hosts: dict[int, Host]) -> None:
    """The bridge in the root namespace and one veth pair per host (``eth0`` inside it)."""
    commands = [
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ]
    for host in hosts.values():
        veth = f"{PREFIX}v{host.number}"
        commands += [
            ["ip", "netns", "add", host.name],
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"],
            ["ip", "link", "set", f"{veth}p", "netns", host.name],
            ["ip", "-n", host.name, "link", "set", f"{veth}p", "name", "eth0"],
            ["ip", "-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0"],
            ["ip", "-n", host.name, "link", "set", "eth0", "up"],
            ["ip", "-n", host.name, "link", "set", "lo", "up"],
            # On-link, no gateway: only so that Ray can tell the node's IP (see the module docstring).
            ["ip", "-n", host.name, "route", "add", "default", "dev", "eth0"],
            ["ip", "link", "set", veth, "master", BRIDGE],
            ["ip", "link", "set", veth, "up"],
        ]
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)


def _remove_network() -> None:
    """Every namespace and link named with the prefix: this run's, or a crashed earlier run's."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in [line.split()[0] for line in netns.splitlines() if line.startswith(PREFIX)]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def _remove_leftovers() -> None:
    """What a crashed earlier run left: the processes in its namespaces, then the namespaces,
    the links and its directory. Only called with the lock held, so nothing of it is live."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in [line.split()[0] for line in netns.splitlines() if line.startswith(PREFIX)]:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        _kill([int(pid) for pid in out.split()])
    _remove_network()
    for path in Path("/tmp").glob(f"{PREFIX}*"):
        if path.is_dir() and path != HOST_TMP:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One topology on the machine at a time: its names and addresses are fixed."""
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another session holds the topology ({LOCK}) for more than 15 minutes")
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids
    ):
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def cmdline(pid: int) -> str:
    """The command line of process ``pid`` (empty once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _listening(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((ip, port)) == 0


def _client_server_died(head: Host) -> bool:
    logs = (head.root / "tmp" / "ray").glob("session_*/logs/ray_client_server.err")
    return any("Timed out waiting for node info" in log.read_text(errors="replace") for log in logs)


def _timed(topo: Topology, what: str, start: Callable[[], None]) -> None:
    began = time.monotonic()
    start()
    topo.timings[what] = round(time.monotonic() - began, 1)


def api_json(url: str, token: str | None = None) -> Any:
    """GET a JSON document (the Ray dashboard's REST API) from the test process."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return json.loads(response.read())


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.topology
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID: stop and clean up too
    with topology([TESTS / "dags" / "topology.py"]) as running:
        print(
            f"topology up in {running.timings}; airflow at {running.airflow.url}; Ctrl-C to stop", flush=True
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
