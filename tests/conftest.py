"""Shared fixtures: a real Airflow 3 (SQLite) and a real Ray head, for the whole session.

The environment is set at import time, before anything imports Airflow: Airflow reads its
home, DAGs folder and XCom backend once. The tests directory is the DAGs folder, Test DAGs live in
``tests/dags`` (Airflow 3.3's ``dag.test()`` finds DAGs through the DAG bundle), so their
functions are shipped to Ray by value, exactly like functions in users' DAG files.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
#: The session's Ray head is shared by the xdist workers, as Airflow deployments share a
#: production cluster: each worker has its own metadata DB, hence its own deployment id and
#: signing key (:mod:`airflow_ray.deployment`), on one head. CI time: one head's start and idle
#: daemons instead of two. The process that owns the session (the xdist controller, or a pytest
#: without xdist) makes ``SHARED``, and its workers inherit its path. Everything the head's
#: processes may read or write lives in it: the head's state dir, each worker's Airflow home,
#: the examples' storage (the head and its Ray workers run with the environment of the worker
#: that started it). Only the owner kills the head and removes ``SHARED``, once its
#: workers have exited (:func:`pytest_unconfigure`).
_OWNS_SESSION = "PYTEST_XDIST_WORKER" not in os.environ  # xdist sets it before conftest loads
if _OWNS_SESSION:
    SHARED = Path(tempfile.mkdtemp(prefix="airflow-ray-tests-"))
    os.environ["AIRFLOW_RAY_TESTS_SHARED"] = str(SHARED)
else:
    SHARED = Path(os.environ["AIRFLOW_RAY_TESTS_SHARED"])
HOME = Path(tempfile.mkdtemp(prefix="home-", dir=SHARED))  # this process's Airflow home
CLUSTER_DIR = str(SHARED / "ray")
for var in ("RAY_ADDRESS", "RAY_URL", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS"):
    os.environ.pop(var, None)
os.environ.update(
    {
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(TESTS / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__XCOM_BACKEND": "airflow_ray.xcom.RayXComBackend",
        "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": CLUSTER_DIR,
        # Two workers' tasks on one head (scripts/test: -n 2): as many CPU slots as a head per
        # worker had, each with a slot per core.
        "AIRFLOW__RAY__LOCAL_CLUSTER_NUM_CPUS": str(2 * (os.cpu_count() or 2)),
        "AIRFLOW__RAY__XCOM_THRESHOLD_BYTES": "1024",
        "AIRFLOW__RAY__INFEASIBLE_TASK_TIMEOUT": "5",
        # The Jobs API and the "Ray Dashboard" links need it: ~+1 GB RSS and ~+15 s at start,
        # cheaper than a second head for the job tests (measured in issue 6).
        "AIRFLOW__RAY__LOCAL_CLUSTER_DASHBOARD": "True",
        # No test reads a Ray worker's output through a driver (test_cluster.py turns it on once):
        # CI time, ~3% of a core per session head.
        "AIRFLOW__RAY__LOCAL_CLUSTER_LOG_MONITOR": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # Where the example DAGs' Ray Train/Tune runs write. Their tasks read it on the Ray
        # workers, which inherit it from whichever xdist worker started the head: the same
        # value in every worker.
        "AIRFLOW_RAY_EXAMPLES_STORAGE": (SHARED / "examples-storage").as_uri(),
        # Where the checkpoint assets of tests/dags/assets.py live (their URIs are parsed). Read
        # where the DAG is parsed, so each worker (deployment) has its own: a checkpoint base
        # belongs to one deployment (airflow_ray.checkpoint refuses another's).
        "AIRFLOW_RAY_TEST_ASSETS": (HOME / "assets").as_uri(),
        # CI time, for the raylets the tests start (Ray's system config, read from RAY_<name>):
        # keep up to 8 idle workers per node for 60 s, instead of num_cpus for 1 s. The
        # tests run bursts of fractional-CPU tasks; by default each burst started fresh worker
        # processes (~2 s CPU each). Measured on test_gc/test_xcom/test_checkpoint_restore:
        # 43 -> 24 worker starts, ~10% less CPU. Nothing here asserts Ray's idle-worker policy.
        "RAY_num_workers_soft_limit": "8",
        "RAY_idle_worker_killing_time_threshold_ms": "60000",
    }
)
#: The metadata DB as ``airflow db migrate`` leaves it (copied before any test writes to it):
#: another Airflow home starts from a copy instead of a second ``airflow db migrate`` (~10 s).
MIGRATED_DB = HOME / "migrated-airflow.db"

import pytest  # noqa: E402

from tests import helpers  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # the xdist controller runs no test: only its workers need a metadata DB
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ,
    )
    shutil.copyfile(HOME / "airflow.db", MIGRATED_DB)


#: Test files that share a session fixture too costly to start twice (the Airflow services,
#: ~45 s) run on the same xdist worker, one after the other; every other file is a unit of its
#: own, so its module fixtures are set up once. ``scripts/test`` runs two workers, each with its
#: own Airflow home, on the session's one Ray head. A group is named after its fixture, which is
#: stopped as soon as the group's last test ends (:func:`_stop_with_its_group`).
_SHARED_WORKER = {
    "test_local_executor.py": "airflow_services",
    "test_ui.py": "airflow_services",
    # One loopback cluster from a virtualenv without airflow-ray (~15 s to start, CI time).
    "test_bare_cluster.py": "bare_cluster",
    "test_keeper.py": "bare_cluster",
    # One MLflow tracking server (~20 s of CPU to start and keep; CI time).
    "test_higgs_dags.py": "mlflow_server",
    "test_serve.py": "mlflow_server",
    "test_tracking.py": "mlflow_server",
    # The multi-host topology (tests/topology.py): one per machine at a time, ~2 min to start.
    # (scripts/test runs it in a pytest of its own; this matters when it is named with others.)
    "test_topology.py": "topology",
}


#: The files that take longest (``scripts/test`` prints the slowest tests; this order is from
#: ``--durations=0`` summed per file), started first so that the two workers end together
#: instead of one waiting on a long file handed out last.
_LONGEST_FIRST = (
    "test_topology.py",
    "test_keeper.py",
    "test_local_executor.py",
    "test_ui.py",
    "test_deployments.py",
    "test_checkpoint_restore.py",
    "test_higgs_dags.py",
    "test_serve.py",
    "test_tracking.py",
    "test_hooks.py",
    "test_doctor.py",
    "test_lineage.py",
    "test_cluster.py",
    "test_higgs_notebook.py",
    "test_jobs.py",
    "test_xcom.py",
    "test_higgs_tune.py",
    "test_gc.py",
    "test_higgs_data.py",
    "test_version_skew.py",
    "test_multinode.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first, the files of a group together (a stable sort: tests keep their order
    within a file)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}

    def file_rank(name: str) -> int:
        return rank.get(name, len(rank))

    def group_rank(name: str) -> int:
        group = _SHARED_WORKER.get(name)
        return min(map(file_rank, _group_files(group) if group else [name]))

    def key(item: pytest.Item) -> tuple[int, str, int]:
        name = item.path.name
        return group_rank(name), _SHARED_WORKER.get(name, name), file_rank(name)

    items.sort(key=key)


def _group_files(group: str) -> set[str]:
    return {file for file, g in _SHARED_WORKER.items() if g == group}


#: Stop callbacks of the running group fixtures (see ``_SHARED_WORKER``), and the ones stopped.
_group_services: dict[str, Callable[[], None]] = {}
_stopped_services: set[str] = set()


def _stop_with_its_group(name: str, stop: Callable[[], None]) -> None:
    """Stop the session fixture ``name`` once the last test of its group ran, not at the end of
    the session: an idle Airflow (scheduler, API server, DAG processor, triggerer) or Ray head
    costs CPU that the rest of the suite, CPU-bound on 2 cores, waits for. ``stop`` must be
    idempotent (the fixture's own teardown calls it again)."""
    _group_services[name] = stop


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    result = yield  # the test's own module and function fixtures first: they may use the service
    for name, stop in list(_group_services.items()):
        files = _group_files(name)
        if item.path.name in files and (nextitem is None or nextitem.path.name not in files):
            del _group_services[name]
            _stopped_services.add(name)
            stop()
    return result


def pytest_runtest_setup(item: pytest.Item) -> None:
    if stopped := _stopped_services & set(item.fixturenames):
        pytest.fail(f"{item.path.name} uses {sorted(stopped)}, stopped after its group (_SHARED_WORKER)")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Hand out whole test files (or the group of files above) to the xdist workers.

    Not ``--dist loadgroup`` with marks: xdist 3.8 tags a test's group onto ``item._nodeid``,
    which pytest 9.2 no longer reads, so the groups are silently ignored.
    """
    from xdist.scheduler import LoadScopeScheduling

    # xdist's default re-sorts the files by their number of tests, which handed the few-test,
    # longest files out last (measured: the HIGGS DAGs started 15 minutes into a 24-minute run).
    config.option.loadscopereorder = False

    class _ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _SHARED_WORKER.get(Path(path).name, path)

    return _ByFile(config, log)


def new_airflow_home(home: Path) -> Path:
    """Make ``home`` an Airflow home with a migrated, empty metadata DB (SQLite)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MIGRATED_DB, home / "airflow.db")
    return home


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _OWNS_SESSION:
        return  # the owner cleans up, after every worker has exited
    from airflow_ray import cluster

    try:
        running = cluster.current()
    except cluster.LocalClusterError:  # its state file unreadable: found by its temp dir alone
        running = None
    # Killed, not stopped: nothing of it needs a graceful exit, and ``stop()`` (tested in
    # test_cluster.py) waits 10 s for the processes that ignore SIGTERM. By the temp dir, which
    # CLUSTER_DIR fixes, so that a head whose start was interrupted is found too.
    helpers.kill_cluster(cluster.temp_dir_path(), running.address if running else None)
    shutil.rmtree(SHARED, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head (``ray start --head`` on 127.0.0.1, token auth, dashboard + Jobs API),
    shared with the other xdist workers (``CLUSTER_DIR``): the first to ask starts it."""
    from airflow_ray import cluster

    yield cluster.ensure_running()
    import ray

    ray.shutdown()  # a driver leaves before its cluster is killed, or it would exit with it


#: What a Ray cluster for airflow-ray needs (docs/deploy: "the cluster side"), at this suite's versions.
CLUSTER_PACKAGES = ("ray", "numpy", "pandas", "pyarrow", "fsspec", "xxhash")


@pytest.fixture(scope="session")
def bare_cluster(tmp_path_factory):
    """A cluster that airflow-ray did not start, from a virtualenv without airflow-ray or Airflow:
    ``ray start --head`` on loopback (token auth, no dashboard, no log monitor) with 2 CPUs and
    the custom resource ``bare``. Yields its GCS ``address`` and the cluster's ``python``."""
    venv = tmp_path_factory.mktemp("bare-venv")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CLUSTER_PACKAGES]
    uv = [sys.executable, "-m", "uv"]
    python = venv / "bin" / "python"
    made = subprocess.run([*uv, "venv", "-q", "-p", sys.base_prefix + "/bin/python3", str(venv)], check=False)
    install = [*uv, "pip", "install", "-q", "--compile-bytecode", "-p", str(python), *pins]
    if made.returncode != 0 or subprocess.run(install, check=False).returncode != 0:
        pytest.skip(f"could not build a virtualenv with {pins} (no package index reachable?)")
    absent = subprocess.run([python, "-c", "import airflow_ray"], capture_output=True, cwd=venv)
    assert absent.returncode != 0, "the bare virtualenv must not see airflow-ray"

    resources = ["--num-cpus=2", "--resources=" + json.dumps({"bare": 2})]
    with contextlib.ExitStack() as running:
        head = helpers.loopback_head(str(venv / "bin" / "ray"), extra_args=resources, cwd=str(venv))
        address = running.enter_context(head)
        _stop_with_its_group("bare_cluster", running.close)
        yield {"address": address, "python": str(python)}


@pytest.fixture(scope="session")
def mlflow_server():
    """A real MLflow tracking server on loopback (sqlite backend, artifacts via the server)."""
    from tests.mlflow_server import local_mlflow_server

    with contextlib.ExitStack() as running:
        server = running.enter_context(local_mlflow_server())
        _stop_with_its_group("mlflow_server", running.close)
        yield server


@pytest.fixture(scope="session")
def airflow_services(ray_cluster, tmp_path_factory):
    """A real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, SQLite) with
    the cross-process test DAG and the example DAGs, shared by the end-to-end tests."""
    from tests.services import airflow_services as start

    examples = TESTS.parent / "examples" / "dags"
    dags = [TESTS / "dags" / f"{name}.py" for name in ("cross_process", "gc_under_load", "assets")]
    dag_files = [*dags, *(examples / f"{name}.py" for name in EXAMPLE_DAGS)]
    with contextlib.ExitStack() as running:
        services = running.enter_context(start(tmp_path_factory.mktemp("airflow-services"), dag_files))
        _stop_with_its_group("airflow_services", running.close)
        yield services


#: The example DAGs the end-to-end tests (and the browser test) run under the real services.
EXAMPLE_DAGS = ("example_ray_basics", "example_ray_job")


@pytest.fixture
def run_dag(ray_cluster):
    """Run a DAG with ``dag.test()`` against the session's Ray head; returns a RunResult."""
    return helpers.run_dag


@pytest.fixture
def default_xcom(monkeypatch):
    """Switch this test to Airflow's default XCom backend (the session default is Ray's)."""
    from airflow.sdk.bases.xcom import BaseXCom
    from airflow.sdk.execution_time import task_runner, xcom

    monkeypatch.setattr(xcom, "XCom", BaseXCom)
    monkeypatch.setattr(task_runner, "XCom", BaseXCom)
