"""``RayHook`` and the ``ray`` connection: address resolution, unreachable addresses, Ray Client,
token auth, and the provider registration, against the session's real Ray head.

Connections are ``AIRFLOW_CONN_<ID>`` environment variables in Airflow's JSON form. Anything that
would make the pytest process a driver of another cluster, or that depends on Ray's per-process
token cache, runs in a subprocess (``tests/scripts/connect.py``, ``airflow dags test``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_ray import cluster
from airflow_ray.cluster import LOCAL_ENV
from airflow_ray.exceptions import RayAuthenticationError, RayConnectionError
from airflow_ray.hooks import RayHook
from tests.dags import remote

ROOT = Path(__file__).resolve().parents[1]
CONNECT_SCRIPT = ROOT / "tests" / "scripts" / "connect.py"


@pytest.fixture(autouse=True)
def _no_address_env(monkeypatch):
    for var in ("RAY_URL", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def _set_conn(monkeypatch, conn_id: str, **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "ray", **fields}))


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subprocess_env(**extra: str) -> dict[str, str]:
    """The session's Airflow environment, without the Ray variables this process picked up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIRFLOW_CONN_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


# --- address resolution ------------------------------------------------------------------------


def test_connection_wins_over_environment(monkeypatch):
    _set_conn(monkeypatch, "ray_default", host="ray://head:10001")
    monkeypatch.setenv("RAY_URL", "url-head:6379")
    monkeypatch.setenv("RAY_ADDRESS", "address-head:6379")
    target = RayHook().target
    assert target.address == "ray://head:10001"
    assert target.source == "Airflow connection 'ray_default'"
    assert target.is_client


@pytest.mark.parametrize(
    "env, address, source",
    [
        pytest.param(
            {"RAY_URL": "url-head:6379", "RAY_ADDRESS": "address-head:6379"},
            "url-head:6379",
            "environment variable RAY_URL",
            id="ray-url-over-ray-address",
        ),
        pytest.param(
            {"RAY_ADDRESS": "ray://address-head:10001"},
            "ray://address-head:10001",
            "environment variable RAY_ADDRESS",
            id="ray-address",
        ),
        pytest.param({"RAY_ADDRESS": "auto"}, "auto", "environment variable RAY_ADDRESS", id="auto"),
    ],
)
def test_missing_connection_falls_through_to_environment(monkeypatch, env, address, source):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    target = RayHook("no_such_connection").target
    assert (target.address, target.source) == (address, source)


def test_connection_without_address_falls_through_but_keeps_its_extras(monkeypatch):
    _set_conn(monkeypatch, "ray_extras_only", extra={"namespace": "team-a"})
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    target = RayHook("ray_extras_only").target
    assert (target.address, target.source) == ("head:6379", "environment variable RAY_ADDRESS")
    assert target.namespace == "team-a"


def test_nothing_configured_uses_the_embedded_cluster(ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://dashboard-host:8265")  # a Jobs API URL, not a driver address
    target = RayHook("no_such_connection").target
    assert target.address == ray_cluster.address
    assert target.source.startswith("the embedded local cluster")
    assert target.env == LOCAL_ENV
    assert target.dashboard_url == "http://dashboard-host:8265"


@pytest.mark.parametrize(
    "host, port, address",
    [
        pytest.param("10.0.0.5", 6379, "10.0.0.5:6379", id="gcs"),
        pytest.param("ray://head", 10001, "ray://head:10001", id="client"),
        pytest.param("head:6379", 1234, "head:6379", id="port-in-host-wins"),
        pytest.param("ray://head:10001", 1234, "ray://head:10001", id="client-port-in-host-wins"),
        pytest.param("anyscale://prod-cluster", None, "anyscale://prod-cluster", id="anyscale"),
    ],
)
def test_port_field_is_appended(monkeypatch, host, port, address):
    _set_conn(monkeypatch, "ray_port", host=host, **({"port": port} if port else {}))
    assert RayHook("ray_port").target.address == address


def test_extras_and_token_are_parsed(monkeypatch):
    _set_conn(
        monkeypatch,
        "ray_full",
        host="ray://head:10001",
        password="s3cret-token",
        extra={
            "namespace": "ns",
            "runtime_env": json.dumps({"env_vars": {"A": "1"}}),  # the UI form stores JSON text
            "init_kwargs": {"log_to_driver": True},  # a JSON object works too
            "dashboard_url": "http://head:8265",
        },
    )
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://ignored:8265")  # the connection's wins
    hook = RayHook("ray_full")
    target = hook.target
    assert target.namespace == "ns"
    assert target.runtime_env == {"env_vars": {"A": "1"}}
    assert target.init_kwargs == {"log_to_driver": True}
    assert hook.get_dashboard_url() == "http://head:8265"
    assert target.token == "s3cret-token"
    assert target.env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cret-token"}
    assert "s3cret-token" not in repr(target)


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(
            {"runtime_env": "{'pip': ['x']}"},
            "Connection 'ray_bad' extra 'runtime_env' is not valid JSON",
            id="invalid-json",
        ),
        pytest.param(
            {"init_kwargs": "[1, 2]"},
            "Connection 'ray_bad' extra 'init_kwargs' must be a JSON object",
            id="list",
        ),
    ],
)
def test_invalid_json_extra_is_a_clear_error(monkeypatch, extra, message):
    _set_conn(monkeypatch, "ray_bad", host="head:6379", extra=extra)
    with pytest.raises(ValueError, match=message):
        RayHook("ray_bad").target  # noqa: B018
    ok, text = RayHook("ray_bad").test_connection()
    assert not ok and message in text


@pytest.mark.parametrize(
    "env, dashboard",
    [
        pytest.param(
            {"RAY_API_SERVER_ADDRESS": "http://jobs:8265", "RAY_ADDRESS": "http://other:8265"},
            "http://jobs:8265",
            id="api-server-address-first",
        ),
        pytest.param({"RAY_ADDRESS": "https://jobs:8443"}, "https://jobs:8443", id="https-ray-address"),
        pytest.param({"RAY_ADDRESS": "head:6379"}, None, id="gcs-address-is-not-a-dashboard"),
    ],
)
def test_dashboard_url_from_environment(monkeypatch, env, dashboard):
    _set_conn(monkeypatch, "ray_default", host="head:6379")  # no dashboard_url extra
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    hook = RayHook()
    assert hook.target.address == "head:6379"
    assert hook.get_dashboard_url() == dashboard


def test_env_address_gets_its_dashboard_from_ray_api_server_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert RayHook("no_such_connection").get_dashboard_url() == "http://head:8265"


# --- unreachable addresses ---------------------------------------------------------------------


def test_unreachable_connection_fails_fast_naming_address_and_source(ray_cluster, monkeypatch, closed_port):
    import ray

    _set_conn(monkeypatch, "ray_closed_port", host=f"127.0.0.1:{closed_port}")
    hook = RayHook("ray_closed_port")

    started = time.monotonic()
    ok, message = hook.test_connection()
    assert time.monotonic() - started < 30
    assert not ok
    assert f"127.0.0.1:{closed_port} (from Airflow connection 'ray_closed_port')" in message

    RayHook().connect()  # this process is a driver of the session cluster...
    started = time.monotonic()
    with pytest.raises(RayConnectionError, match="unreachable") as info:
        hook.connect()
    assert time.monotonic() - started < 30
    assert f"127.0.0.1:{closed_port} (from Airflow connection 'ray_closed_port')" in str(info.value)
    assert ray.is_initialized()  # ...and still is: a failed switch keeps the working connection
    assert ray.get(ray.put(1)) == 1


@pytest.mark.parametrize("var", ["RAY_URL", "RAY_ADDRESS"])
def test_unreachable_environment_address_names_the_variable(monkeypatch, closed_port, var):
    monkeypatch.setenv(var, f"127.0.0.1:{closed_port}")
    started = time.monotonic()
    ok, message = RayHook("no_such_connection").test_connection()
    assert time.monotonic() - started < 30
    assert not ok
    assert f"Ray cluster unreachable at 127.0.0.1:{closed_port} (from environment variable {var})" in message


def test_ray_task_with_unreachable_connection_fails_and_logs_why(run_dag, monkeypatch, closed_port, capfd):
    _set_conn(monkeypatch, "ray_closed_port", host=f"127.0.0.1:{closed_port}")
    result = run_dag(remote.unreachable_dag)
    text = "".join(capfd.readouterr())
    assert result.states == {"never_runs": "failed"}
    assert "RayConnectionError" in text
    assert (
        f"Ray cluster unreachable at 127.0.0.1:{closed_port} (from Airflow connection 'ray_closed_port')"
        in text
    )


def test_a_cluster_ray_started_in_the_process_before_connecting_is_refused(tmp_path):
    """A plain task that calls Ray before connecting (here ``ray.init()`` as Ray's auto-init does)
    runs a private in-process cluster: adopting it would put the task's outputs there, to vanish
    with the process. The hook says so and how to fix it, instead of using it."""
    code = (
        "import ray; from airflow_ray.hooks import RayHook\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "try:\n    RayHook().connect()\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RayConnectionError This process already runs a Ray cluster of its own" in proc.stdout
    assert "started by ray.init() without an address or by a Ray API" in proc.stdout
    assert "Connect first: RayHook('ray_default').connect() at the top of the task" in proc.stdout


# --- Ray Client --------------------------------------------------------------------------------


@pytest.mark.slow
def test_dag_through_ray_client_connection(ray_cluster):
    """``airflow dags test`` in a subprocess whose ``ray_default`` is the head's Ray Client port."""
    import ray

    conn = json.dumps({"conn_type": "ray", "host": ray_cluster.client_address})
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "remote_client"],
        env=_subprocess_env(AIRFLOW_CONN_RAY_DEFAULT=conn),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert (
        f"Connected to Ray at {ray_cluster.client_address} (from Airflow connection 'ray_default')" in output
    )

    run = _latest_run("remote_client")
    assert run.state == "success", run.states
    RayHook().connect()  # this process reads the result from the same cluster, as a GCS driver
    total, node_id = run.xcom("describe")  # plain task -> Ray task over Ray Client, via the owner
    assert total == 6
    assert node_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _latest_run(dag_id: str):
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    from tests.helpers import RunResult

    with create_session() as session:
        dr = session.query(DagRun).filter_by(dag_id=dag_id).order_by(DagRun.id.desc()).first()
        tis = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=dr.run_id).all()
        states = {ti.task_id: str(ti.state) for ti in tis}
        return RunResult(dag_id=dag_id, run_id=dr.run_id, state=str(dr.state), states=states)


# --- token auth (each case in a fresh process: Ray caches the token per process) ----------------


def _connect_in_subprocess(ray_cluster, password: str | None) -> subprocess.Popen:
    conn = {"conn_type": "ray", "host": ray_cluster.address, **({"password": password} if password else {})}
    proc = subprocess.Popen(
        [sys.executable, str(CONNECT_SCRIPT)],
        env=_subprocess_env(
            AIRFLOW_CONN_RAY_DEFAULT=json.dumps(conn),
            RAY_AUTH_TOKEN_PATH=str(ROOT / "no-such-dir" / "auth_token"),  # only the connection's token
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def _report(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    lines = [line for line in stdout.splitlines() if line.startswith("CONNECT=")]
    assert lines, f"{stdout[-4000:]}\n{stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("CONNECT="))


@pytest.mark.slow
def test_token_auth_right_wrong_and_missing(ray_cluster):
    token = cluster.ensure_token().read_text().strip()  # the session head's token file
    procs = {  # three fresh processes at once
        "right": _connect_in_subprocess(ray_cluster, token),
        "wrong": _connect_in_subprocess(ray_cluster, "0" * len(token)),
        "missing": _connect_in_subprocess(ray_cluster, None),
    }
    reports = {case: _report(proc) for case, proc in procs.items()}
    where = f"{ray_cluster.address} (from Airflow connection 'ray_default')"

    right = reports["right"]
    assert right["test_connection"] == [True, f"Ray cluster reachable at {where}"]
    assert right["connect"] == "ok"
    assert right["roundtrip"] == {"x": 1}
    assert right["cpus"] >= 1

    for case in ("wrong", "missing"):
        report = reports[case]
        ok, message = report["test_connection"]
        assert not ok
        assert f"Ray authentication failed for {where}" in message
        assert report["connect"].startswith(f"{RayAuthenticationError.__name__}: Ray authentication failed")
        assert "Failed to connect" not in report["connect"]  # not Ray's own ~20 s timeout message


# --- provider registration ---------------------------------------------------------------------


def test_provider_info_through_the_entry_point():
    (entry_point,) = [
        ep
        for ep in importlib.metadata.entry_points(group="apache_airflow_provider")
        if ep.value.startswith("airflow_ray.")
    ]
    info = entry_point.load()()
    assert info["package-name"] == "airflow-ray"
    (conn_type,) = [c for c in info["connection-types"] if c["connection-type"] == "ray"]
    assert conn_type["hook-class-name"] == "airflow_ray.hooks.RayHook"
    assert {"name": "ray", "class-name": "airflow_ray.decorators.ray.ray_task"} in info["task-decorators"]


@pytest.mark.slow
def test_airflow_providers_list_shows_airflow_ray():
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "providers", "list", "--output", "json"],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.index("[")
    providers = {p["package_name"]: p for p in json.loads(proc.stdout[start:])}
    assert "airflow-ray" in providers


# --- the token goes only to the cluster it belongs to ---------------------------------------------


class _GrpcRecorder:
    """A gRPC server that records the metadata of every call and implements nothing."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        self.calls: list[dict[str, str]] = []
        recorder = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, handler_call_details):
                recorder.calls.append(dict(handler_call_details.invocation_metadata))
                return None  # UNIMPLEMENTED

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((Handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


class _HttpRecorder:
    """An HTTP server that records the Authorization header of every request and answers 404."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.authorization: list[str | None] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.authorization.append(self.headers.get("Authorization"))
                self.send_error(404)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def grpc_recorder():
    recorder = _GrpcRecorder()
    yield recorder
    recorder.server.stop(grace=None)


@pytest.fixture
def http_recorder():
    recorder = _HttpRecorder()
    yield recorder
    recorder.server.shutdown()


def test_a_token_for_cluster_a_is_not_sent_to_cluster_b(ray_cluster, grpc_recorder, http_recorder):
    """Connected to A with A's token (and the local token file present), B gets no token at all:
    neither on the gRPC call of its Ray Client address nor on its dashboard."""
    token = cluster.ensure_token().read_text().strip()
    conn_a = {"conn_type": "ray", "host": ray_cluster.address, "password": token}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "token_scope.py")],
        env=_subprocess_env(
            AIRFLOW_CONN_RAY_A=json.dumps(conn_a),
            AIRFLOW_CONN_RAY_B=json.dumps(
                {
                    "conn_type": "ray",
                    "host": f"ray://127.0.0.1:{grpc_recorder.port}",
                    "extra": {"dashboard_url": http_recorder.url},
                }
            ),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKEN_SCOPE=")]
    assert lines, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1].removeprefix("TOKEN_SCOPE="))
    assert report["a_roundtrip"] == "via A's token"  # A got its token
    assert report["b_probe"][0] is False  # the recorder implements nothing
    assert grpc_recorder.calls, "B's Ray Client address was never called"
    assert all("authorization" not in call for call in grpc_recorder.calls), grpc_recorder.calls
    assert http_recorder.authorization == [None]


def test_the_token_file_goes_to_the_embedded_dashboard_only(ray_cluster, monkeypatch, http_recorder):
    from airflow_ray.hooks import RayJobHook

    RayHook("no_such_connection").connect()  # a driver of the embedded cluster: token mode on
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", http_recorder.url)
    with pytest.raises(RuntimeError, match="Version check returned 404"):  # only the request matters
        RayJobHook("no_such_connection").client  # noqa: B018  # JobSubmissionClient asks the version
    assert http_recorder.authorization == [None]
    # The embedded cluster's own dashboard gets it (without it, the Jobs API answers 401).
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    dashboard = RayJobHook("no_such_connection").get_dashboard()
    assert dashboard.local_token and dashboard.token == cluster.ensure_token().read_text().strip()


@pytest.mark.parametrize(
    ("address", "failures", "outcome"),
    [
        ("ray://head:10001", 2, "connected"),  # lost the race twice, the third connection works
        ("ray://head:10001", 3, "raised"),  # three times: the error, not a fourth try
        ("head:6379", 1, "raised"),  # a driver address: not Ray Client's race, never retried
    ],
)
@pytest.mark.parametrize(
    "message",
    [
        "RuntimeError: Starting Ray client server failed. See ray_client_server_23002.err for detailed logs.",
        "psutil.ZombieProcess: PID still exists but it's a zombie (pid=1651)",  # died while starting
    ],
)
def test_ray_client_connects_again_when_its_server_did_not_start(
    monkeypatch, address, failures, outcome, message
):
    """Ray Client's proxy loses a fork race when connections arrive together ("Starting Ray
    client server failed", seen in tests/test_topology.py whenever two consumers on one host
    connected at once; or the new server died while starting: psutil's ZombieProcess). The race
    cannot be provoked on demand, so ``ray.init`` is replaced here by one that fails ``failures``
    times with the proxy's own message; no cluster is involved."""
    import ray

    from airflow_ray.hooks import ray as ray_hook

    calls = []

    def init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) <= failures:
            raise ConnectionAbortedError(f"Initialization failure from server:\n{message}")
        return "context"

    pauses = []
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_hook.time, "sleep", pauses.append)
    target = ray_hook.RayTarget(address=address, source="a test")
    hook = RayHook("ray_test")

    if outcome == "connected":
        assert hook._init(target, {"address": address}) == "context"
    else:
        with pytest.raises(ConnectionAbortedError, match="Initialization failure from server"):
            hook._init(target, {"address": address})
    assert len(calls) == (failures + 1 if outcome == "connected" else failures)
    assert len(pauses) == len(calls) - 1  # a pause before each new connection
    assert all(0.5 * n <= pause <= 2.0 * n for n, pause in enumerate(pauses, start=1))
