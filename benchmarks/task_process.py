"""Where a task process's time goes before its ``@ray_task`` function runs, phase by phase.

One command::

    .venv/bin/python benchmarks/task_process.py            # 12 task processes per row
    .venv/bin/python benchmarks/task_process.py --n 20

Airflow forks every task process from a long-lived parent (a Celery pool process, a
LocalExecutor worker). This benchmark does the same without Airflow's services around it: a
parent that has imported Airflow's Task SDK (as a Celery worker has) forks ``--n`` children one
after the other, and each child does what a ``@ray_task`` does against a cluster airflow-ray did
not start (a ``ray start --head`` on loopback, its keeper started with ``airflow-ray cluster
prepare``): look up the connection, probe the cluster, ``ray.init``, find the run's owner
(the deployment's identity) and run a trivial function through it (``tasks.run``). Each phase is
timed in the child; the table gives medians (the first two children are left out: cold caches).

Then each child checkpoints a small output (a ``file://`` base) twice, as ``checkpoint=True``
does after the function ran: ``ckpt_own_job`` writes it with a Ray task of its own (the way
airflow-ray wrote checkpoints before, less the base claim and the node preference: the task
process is a Ray job of its own, so its first task waits for a new Ray worker process), and
``ckpt_owner`` publishes it through ``outputs.publish`` (location, base claim and the writes,
which the run's owner submits: its Ray job's workers are warm). Their ratio is the last column.

Rows, each a parent of its own:

* **no bytecode**: Python compiles every module it imports (what ``PYTHONDONTWRITEBYTECODE`` and
  an install without compiled bytecode cost: ``PYTHONPYCACHEPREFIX`` points at an empty
  directory), with the parent importing Ray and airflow-ray's task modules (the preload as it
  was before this benchmark);
* **bytecode, Ray only**: the same with compiled bytecode;
* **bytecode, airflow_ray.preload**: the parent imports :mod:`airflow_ray.preload` (today's),
  which also loads what Ray imports on a driver's first call.

"parent import" is the parent's own import time (paid once per worker, not per task). No timing
is asserted anywhere: the machine is shared and noisy; compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

#: (key, title, parent preload, bytecode)
ROWS = (
    ("none", "no bytecode, Ray + task modules preloaded", "task_modules", False),
    ("ray", "bytecode, Ray + task modules preloaded", "task_modules", True),
    ("full", "bytecode, airflow_ray.preload", "airflow_ray.preload", True),
)
PHASES = ("lookup", "probe", "ray_init", "owner_name", "run", "task", "ckpt_own_job", "ckpt_owner")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="task processes per row (default 12)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a row's parent: its preload
    args = parser.parse_args()
    if args.child:
        print("ROW=" + json.dumps(_parent(args.child, args.n)), flush=True)
        return

    from tests.helpers import loopback_head

    home = common.make_home("airflow-ray-task-process-")
    env = common.airflow_env(
        home,
        AIRFLOW__RAY__DEPLOYMENT_ID="bench",
        AIRFLOW_VAR_AIRFLOW_RAY_DEPLOYMENT_SECRET="ab" * 32,  # no metadata DB read per child
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # the cluster listens on loopback only
    )
    results: dict[str, Any] = {}
    with loopback_head(str(Path(common.PYTHON).parent / "ray"), extra_args=["--num-cpus=2"]) as address:
        env["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps({"conn_type": "ray", "host": address})
        prepare = [
            common.PYTHON,
            "-m",
            "airflow_ray.cli",
            "cluster",
            "prepare",
            "--connection",
            "ray_default",
        ]
        common.log(
            subprocess.run(prepare, env=env, check=True, capture_output=True, text=True).stdout.strip()
        )
        for key, title, preload, bytecode in ROWS:
            with tempfile.TemporaryDirectory() as empty:
                row_env = (
                    env if bytecode else {**env, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
                )
                common.log(f"row: {title}")
                proc = subprocess.run(
                    [common.PYTHON, __file__, "--child", preload, "--n", str(args.n)],
                    env=row_env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW=")]
            if proc.returncode or not lines:
                raise SystemExit(f"row {title!r} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            results[key] = json.loads(lines[-1].removeprefix("ROW="))
    common.remove_home(home)
    _report(results)


def _parent(preload: str, n: int) -> dict[str, Any]:
    """A row: import like a long-lived Airflow worker, then fork ``n`` task processes in turn."""
    started = time.perf_counter()
    import airflow.sdk  # noqa: F401  (a Celery worker or LocalExecutor has loaded the Task SDK)

    if preload == "airflow_ray.preload":
        import airflow_ray.preload  # noqa: F401
    else:  # what airflow_ray.preload imported before it loaded Ray's first-call modules
        import ray  # noqa: F401

        from airflow_ray import outputs, tasks  # noqa: F401
        from airflow_ray.hooks import ray as _hook  # noqa: F401
    imported = time.perf_counter() - started
    samples = []
    for i in range(n):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                os.write(write, json.dumps(_task_process(i)).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status or not report:
            raise RuntimeError(f"task process {i} exited with status {status}")
        samples.append(json.loads(report))
    timed = samples[2:] if len(samples) > 2 else samples
    return {"parent_import_s": imported, **{p: common.median([s[p] for s in timed]) for p in PHASES}}


def _task_process(i: int) -> dict[str, float]:
    """One forked child: a ``@ray_task``'s steps, each timed (seconds)."""
    import logging

    from airflow_ray import owners, tasks
    from airflow_ray._worker.keys import TaskKey
    from airflow_ray.hooks import RayHook
    from airflow_ray.hooks import ray as hook_module

    times = dict.fromkeys(PHASES, 0.0)

    def timing(name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - started

        return timed

    hook_module.probe = timing("probe", hook_module.probe)
    RayHook._init = timing("ray_init", RayHook._init)  # type: ignore[method-assign]
    started = time.perf_counter()
    hook = RayHook()
    _ = timing("lookup", lambda: hook.target)()
    hook.connect()
    owner = timing("owner_name", owners.owner_name)("bench", "run")
    request = tasks.TaskRequest(
        fn=os.getpid, args=(), kwargs={}, task_key=TaskKey("bench", "run", f"t{i}", -1), inline_limit=None
    )
    timing("run", tasks.run)(request, logging.getLogger("bench"))
    times["task"] = time.perf_counter() - started
    assert owner.startswith(owners.OWNER_PREFIX)
    _checkpoint_twice(i, timing)
    return times


def _checkpoint_twice(i: int, timing: Any) -> None:
    """The two ways of checkpointing one kept output (see the module docstring), timed."""
    import logging

    import numpy as np
    import ray

    from airflow_ray import checkpoint, outputs, tasks
    from airflow_ray._worker.keys import TaskKey

    key = TaskKey("bench", "run", f"c{i}", -1)
    request = tasks.TaskRequest(fn=np.arange, args=(1000,), kwargs={}, task_key=key, inline_limit=0)
    reply = tasks.run(request, logging.getLogger("bench"))
    base = Path(os.environ["AIRFLOW_HOME"], "checkpoints").as_uri()  # removed with the home
    own = checkpoint.CheckpointLocation(uri=f"{base}/own-job/{i}/", base=f"{base}/own-job/")
    write: Any = ray.remote(checkpoint.write_checkpoint).options(num_cpus=0)
    manifest = timing("ckpt_own_job", lambda: ray.get(write.remote(reply["outputs"][0]["ref"][0], own)))()
    settings = outputs.CheckpointSettings(path=f"{base}/owner/")
    published = timing("ckpt_owner", outputs.publish)(
        key, reply, ray_conn_id="ray_default", checkpoint=settings, multiple_outputs=False
    )
    assert manifest["bytes"] > 0 and published.reference.checkpoint_uri.startswith(settings.path)


def _report(results: dict[str, Any]) -> None:
    base = results["none"]["task"]
    rows = [
        [
            title,
            f"{results[key]['parent_import_s']:.2f} s",
            *(f"{results[key][p] * 1000:.0f}" for p in PHASES),
            f"{base / results[key]['task']:.1f}x",
            f"{results[key]['ckpt_own_job'] / results[key]['ckpt_owner']:.1f}x",
        ]
        for key, title, _, _ in ROWS
    ]
    headers = ["parent", "parent import", *(f"{p} ms" for p in PHASES), "vs no bytecode", "owner vs own job"]
    print("\nA forked task process's @ray_task, medians (ms); 'task' is the whole of it:\n")
    print(common.table(headers, rows))


if __name__ == "__main__":
    main()
