"""``@ray_task`` / ``@task.ray`` on a real Airflow 3 (dag.test) and a real Ray head."""

from __future__ import annotations

import os
import time

import pytest
from airflow.sdk import dag, task

from airflow_ray import ray_task
from airflow_ray.decorators.ray import _RayDecoratedOperator
from tests.dags import basics, failures


@pytest.mark.parametrize("backend", ["ray", "default"])
def test_plain_ray_ray_plain(run_dag, request, backend):
    if backend == "default":
        request.getfixturevalue("default_xcom")
    result = run_dag(basics.mixing_dag)
    assert result.state == "success", result.states
    out = result.xcom("load")
    assert out["values"] == [1003, 1012, 1027]  # closure global SCALE + helper module OFFSET
    assert out["ray_pid"] != os.getpid()  # the function really ran in a Ray worker
    if backend == "default":
        assert result.xcom_raw("square")["pid"] == out["ray_pid"]  # the value itself is in the table
    else:
        # `-> dict` makes TaskFlow infer multiple_outputs; small JSON-like values stay in the table
        assert result.xcom_raw("square")["values"] == [3, 12, 27]
        assert result.xcom_raw("square", key="values") == [3, 12, 27]


def test_dashboard_link_opens_the_run_owner(run_dag, ray_cluster):
    """The "Ray Dashboard" button of a Ray task opens the owner actor of its DAG run (its id asked
    here through the dashboard's own state API)."""
    from ray.util.state import list_actors

    from airflow_ray.links.dashboard import RayDashboardLink
    from airflow_ray.owners import owner_name

    result = run_dag(basics.mixing_dag)
    assert result.state == "success", result.states
    link = result.xcom_raw("square", key=RayDashboardLink().xcom_key)
    name = owner_name(result.dag_id, result.run_id)
    [owner] = list_actors(ray_cluster.dashboard_url, filters=[("name", "=", name), ("state", "=", "ALIVE")])
    assert link == f"{ray_cluster.dashboard_url}/#/actors/{owner.actor_id}"


def test_operator_attributes_and_task_ray_registration():
    from airflow.providers_manager import ProvidersManager

    assert "ray" in ProvidersManager().taskflow_decorators

    @dag(dag_id="attrs", schedule=None)
    def attrs():
        @task.ray(
            num_cpus=2,
            num_gpus=0,
            memory=2**30,
            resources={"trainer": 1},
            retries=3,
            runtime_env={"env_vars": {"A": "1"}},
            accelerator_type="A100",
            max_retries=2,
            ray_conn_id="other",
            task_id="custom",
        )
        def f():
            return 1

        f()

    op = attrs().get_task("custom")
    assert isinstance(op, _RayDecoratedOperator)
    assert op.custom_operator_name == "@task.ray"
    assert (op.num_cpus, op.memory, op.ray_resources, op.retries, op.ray_conn_id) == (
        2,
        2**30,
        {"trainer": 1},
        3,
        "other",
    )
    options = op.ray_options({"env_vars": {"B": "2"}, "pip": ["x"]})
    assert options["runtime_env"] == {"env_vars": {"B": "2", "A": "1"}, "pip": ["x"]}
    assert options["accelerator_type"] == "A100"
    assert options["max_retries"] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"num_cpus": -1}, "num_cpus must be >= 0", id="negative-cpus"),
        pytest.param({"resources": {"GPU": 1}}, "Use num_cpus / num_gpus / memory", id="reserved-resource"),
        pytest.param({"runtime_env": "pip"}, "runtime_env must be a dict", id="runtime-env-type"),
    ],
)
def test_bad_options_fail_at_parse_time(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):

        @dag(dag_id="bad", schedule=None)
        def bad():
            @ray_task(**kwargs)
            def f():
                return 1

            f()

        bad()


def test_checkpoint_options_without_checkpoint_warn():
    with pytest.warns(UserWarning, match="ignored without checkpoint=True"):

        @dag(dag_id="warn", schedule=None)
        def warn():
            @ray_task(checkpoint_path="file:///tmp/x")
            def f():
                return 1

            f()

        warn()


def test_bare_decorator_multiple_outputs_and_templates(run_dag):
    result = run_dag(basics.options_dag)
    assert result.state == "success", result.states
    stats = result.xcom("stats")
    assert stats["label"] == f"run-{result.run_id}"  # templated argument rendered
    assert stats["ti"] == "stats/1"
    assert result.xcom("check") == {"n": len(f"run-{result.run_id}"), "name": "x", "sum": 499500}
    # multiple_outputs: one XCom per key; the array is a Ray object, the short string inline
    array_ref = result.xcom_raw("both", key="array")
    assert array_ref["summary"]["shape"] == [1000]
    assert result.xcom_raw("both", key="name") == "x"
    assert result.xcom_raw("both")["__airflow_ray_outputs__"]["name"] == "x"


def test_dynamic_task_mapping(run_dag):
    result = run_dag(basics.mapping_dag)
    assert result.state == "success", result.states
    assert result.xcom("total") == 2 * sum(range(5))
    assert [result.xcom("times", map_index=i) for i in range(5)] == [0, 2, 4, 6, 8]
    assert [result.xcom("times__1", map_index=i) for i in range(3)] == [30, 33, 36]


def test_exception_fails_task_with_remote_traceback_and_retries(run_dag, capfd, tmp_path):
    result = run_dag(failures.flaky_dag, run_conf={"marker": str(tmp_path / "attempts")})
    text = "".join(capfd.readouterr())
    assert result.states["sometimes"] == "success"
    assert result.xcom("sometimes") == 2  # Airflow's retry re-ran it on Ray
    assert result.states["always"] == "failed"
    assert "failed on Ray with KeyError: 'no such thing'" in text
    assert "inner_helper" in text  # the remote traceback, down to the user's frame
    assert "ValueError: first attempt fails (1)" in text


def test_print_and_logging_reach_the_task_log(run_dag, capfd):
    result = run_dag(failures.chatty_dag)
    text = "".join(capfd.readouterr())
    assert result.state == "success"
    assert "[ray] hello from the ray worker" in text
    assert "[ray] INFO user.module: an info record" in text
    assert "[ray] WARNING user.module: a warning record" in text


def test_execution_timeout_cancels_the_ray_task(run_dag):
    """The worker running the function is gone within 10 s of Airflow's timeout.

    The session cluster runs without the dashboard, so Ray's HTTP state API is not there; the
    runner reports its worker pid to the owner, which is what we check.
    """
    import psutil
    import ray

    from airflow_ray.owners import get_owner, owner_name

    result = run_dag(failures.timeout_dag)
    assert result.states["sleepy_for_timeout"] == "failed"
    owner = get_owner(owner_name(result.dag_id, result.run_id))
    state = ray.get(owner.poll.remote((result.dag_id, result.run_id, "sleepy_for_timeout", -1), 0))
    pid = state["started"]["pid"]
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the Ray worker still runs the task 10 s after the timeout"
        time.sleep(0.2)


@pytest.mark.timeout(300)  # never hang: [ray] infeasible_task_timeout is 5 s here (60 s by default)
def test_infeasible_resources_fail_with_a_message(run_dag, capfd):
    result = run_dag(failures.infeasible_dag)
    text = "".join(capfd.readouterr())
    assert result.states == {"needs_gpu": "failed", "needs_custom": "failed"}
    assert "task 'needs_gpu' of DAG 'infeasible'" in text and "GPU=1 (node has 0)" in text
    assert "no_such=1 (node has 0)" in text


def test_unpicklable_function_and_return_value(run_dag, capfd):
    result = run_dag(failures.unpicklable_dag)
    text = "".join(capfd.readouterr())
    assert result.states == {"uses_lock": "failed", "returns_lock": "failed"}
    assert "Cannot send the function of task 'uses_lock'" in text
    assert "lock" in text.lower()
    assert "The return value of task 'returns_lock'" in text


def test_on_kill_cancels_the_running_ray_task(ray_cluster):
    """Airflow calls ``on_kill`` when it kills a task (SIGTERM): the Ray task must stop too."""
    import logging
    import threading

    import psutil
    import ray

    from airflow_ray import tasks
    from airflow_ray._worker.keys import TaskKey
    from airflow_ray.exceptions import RayTaskFailedError
    from airflow_ray.hooks import RayHook
    from airflow_ray.operators import RayPythonOperator
    from airflow_ray.owners import get_owner, owner_name

    RayHook().connect()
    task_key = TaskKey("killed", "run", "sleeper", -1)
    failure: list[BaseException] = []

    def run() -> None:
        request = tasks.TaskRequest(
            fn=time.sleep, args=(300,), kwargs={}, task_key=task_key, options={"num_cpus": 0.1}
        )
        try:
            tasks.run(request, logging.getLogger("tests"))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    owner = get_owner(owner_name("killed", "run"), create=True)
    deadline = time.monotonic() + 120
    while not (state := ray.get(owner.poll.remote(task_key, 0)))["started"]:
        assert time.monotonic() < deadline, "the Ray task never started"
        time.sleep(0.2)
    op = RayPythonOperator(task_id="sleeper", python_callable=time.sleep)
    op._running, op._task_key = True, task_key
    op.on_kill()
    thread.join(timeout=30)
    assert failure and isinstance(failure[0], RayTaskFailedError)
    assert "was cancelled" in str(failure[0])
    pid = state["started"]["pid"]
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the Ray worker still runs 10 s after on_kill"
        time.sleep(0.2)


def test_small_outputs_cost_one_owner_call_per_ray_task(run_dag):
    """The owner's reply to ``run`` carries small outputs as values: no lookup, get or release after.

    Before the owner replied with values, each small output cost ``run`` + ``lookup`` (and a
    ``ray.get``) + ``release``. ``poll`` calls are left out: a task still running after the first
    0.2 s poll interval streams its log through them, and how many there are depends on the machine.
    """
    from collections import Counter

    from airflow_ray import owners
    from airflow_ray.hooks import RayHook

    RayHook().connect()
    name = owners.owner_names()[0]  # one shard in the tests: every run's owner
    calls: Counter[str] = Counter()
    owners._handles[name] = _CountingOwner(owners.get_owner(name, create=True), calls)
    try:
        result = run_dag(basics.mixing_dag)
    finally:
        owners.forget_owners()
    assert result.state == "success", result.states
    assert result.xcom("load")["values"] == [1003, 1012, 1027]  # square, then shift, through XCom values
    assert {method: n for method, n in calls.items() if method != "poll"} == {"run": 2}


class _CountingOwner:
    """An owner actor handle that counts the calls made through it, by method."""

    def __init__(self, handle, calls) -> None:
        self._handle, self._calls = handle, calls

    def __getattr__(self, method: str):
        target, calls = getattr(self._handle, method), self._calls
        if method.startswith("_"):  # not a method call (e.g. the actor id for the dashboard link)
            return target

        class _Method:
            def remote(self, *args, **kwargs):
                calls[method] += 1
                return target.remote(*args, **kwargs)

        return _Method()
