"""The HIGGS pipeline as a plain script vs. as an Airflow DAG: what does the DAG cost?

One command::

    .venv/bin/python benchmarks/pipeline_vs_notebook.py              # 200k rows, 100 rounds
    .venv/bin/python benchmarks/pipeline_vs_notebook.py --rows 50000 --rounds 50

Same data, same Ray cluster (a private embedded one, stopped at the end), one timed run each:

1. **script**: the notebook's four functions called in order in this process (the functions of
   ``examples/dags/higgs_xgboost.py`` without their decorators, which ``tests/test_higgs_bodies.py``
   proves are the notebook's), data passed as Python objects;
2. **dag.test()**: the DAG, every task in this process (what ``airflow dags test`` does), each
   ``@ray_task`` a Ray task, DataFrames through Ray's object store via ``RayXComBackend``;
3. **LocalExecutor**: the same DAG under a real scheduler, DAG processor and API server
   (``benchmarks/_common.LocalExecutorStack``), one process per task instance, timed from the
   trigger to the run's end (includes the scheduler's own latency between tasks);
4. **reference**: single-process ``xgboost.train`` on the same split, no Ray at all.

Small warm-up runs of both (reported as "cold start") come first, so the timed runs compare
steady states, as on a long-running deployment. Target: DAG <= 1.2x script.
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

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "examples" / "dags"
DAG_ID = "higgs_xgboost"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 CPU each)")
    parser.add_argument("--no-local-executor", dest="local_executor", action="store_false")
    args = parser.parse_args()
    conf = {"n_rows": args.rows, "num_boost_round": args.rounds, "num_workers": args.workers, "seed": 0}

    home = Path(tempfile.mkdtemp(prefix="airflow-ray-bench-"))
    _configure(home)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)

    from airflow_ray import cluster
    from airflow_ray.hooks import RayHook

    target = RayHook().connect()  # starts the embedded cluster; dag.test() below reuses it
    try:
        pipeline = _pipeline()
        # Warm both paths the same way (Ray workers, the Train stack, the DAG's object owner and
        # dag.test()'s in-process API server), so the timed runs compare steady states.
        tiny = {**conf, "n_rows": 5_000, "num_boost_round": 2}
        _log(f"cluster {target.address}; warm-up runs on {tiny['n_rows']:,} rows (cold start)")
        cold = {"script": _run_script(pipeline, tiny)["seconds"], "dag": _run_dag_test(tiny)["seconds"]}

        _log(f"script: {args.rows:,} rows, {args.rounds} rounds, {args.workers} workers")
        script = _run_script(pipeline, conf)
        _log("DAG: dag.test()")
        dag = _run_dag_test(conf)
        _log("DAG: LocalExecutor (api-server, scheduler, dag-processor)")
        local = _run_local_executor(conf, home) if args.local_executor else None
        _log("reference: single-process xgboost.train")
        reference = _run_reference(pipeline, conf)
    finally:
        cluster.stop()

    _report(args, script, dag, local, reference, cold)


def _configure(home: Path) -> None:
    """Airflow reads its configuration once, at import: set it before importing anything."""
    for var in ("RAY_ADDRESS", "RAY_URL"):
        os.environ.pop(var, None)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__XCOM_BACKEND": "airflow_ray.xcom.RayXComBackend",
            "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": str(home / "ray"),
            "AIRFLOW_RAY_EXAMPLES_STORAGE": (home / "storage").as_uri(),
        }
    )
    sys.path[:0] = [str(DAGS), str(ROOT), str(ROOT / "benchmarks")]


def _pipeline() -> dict[str, Any]:
    """The four step functions as plain Python (``.function`` is the undecorated function)."""
    import higgs_data
    import higgs_training
    import higgs_xgboost
    import ray

    # What @ray_task does for DAG-folder modules: Ray workers cannot import them by name.
    for module in (higgs_data, higgs_training, higgs_xgboost):
        ray.cloudpickle.register_pickle_by_value(module)
    return {
        name: getattr(higgs_xgboost, name).function for name in ("load_data", "split", "train", "evaluate")
    }


def _run_script(pipeline: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any]:
    steps: dict[str, float] = {}
    started = time.perf_counter()

    def timed(name: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        value = pipeline[name](*args, **kwargs)
        steps[name] = time.perf_counter() - t0
        return value

    df = timed("load_data", None, n_rows=conf["n_rows"], seed=conf["seed"])
    data = timed("split", df, seed=conf["seed"])
    model = timed(
        "train", data["train"], num_workers=conf["num_workers"], num_boost_round=conf["num_boost_round"]
    )
    metrics = timed("evaluate", model, data["test"])
    return {"seconds": time.perf_counter() - started, "steps": steps, "metrics": metrics, "data": data}


def _run_dag_test(conf: dict[str, Any]) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_ray.xcom import RayXComBackend

    dag = DagBag(dag_folder=str(DAGS)).get_dag(DAG_ID)
    started = time.perf_counter()
    run = dag.test(run_conf=conf)
    seconds = time.perf_counter() - started
    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run.run_id)
        ).all()
        steps = {ti.task_id: (ti.end_date - ti.start_date).total_seconds() for ti in tis if ti.end_date}
        row = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == DAG_ID,
                XComModel.run_id == run.run_id,
                XComModel.task_id == "evaluate",
                XComModel.key == "return_value",
            )
        ).one_or_none()
        metrics = RayXComBackend.deserialize_value(row) if row is not None else {}
    return {"seconds": seconds, "steps": steps, "metrics": metrics, "state": str(run.state)}


def _run_local_executor(conf: dict[str, Any], home: Path) -> dict[str, Any]:
    """One run under a real scheduler: every task instance is its own process."""
    from _common import LocalExecutorStack, task_instances

    with LocalExecutorStack(dict(os.environ), home) as stack:
        stack.wait_parsed([DAG_ID])
        stack.unpause(DAG_ID)
        started = time.perf_counter()
        run_id = stack.trigger(DAG_ID, conf=conf)
        state = stack.wait(DAG_ID, run_id, timeout=1800)
        seconds = time.perf_counter() - started
    tis = task_instances(DAG_ID, run_id)
    steps = {task_id: ti["duration"] for task_id, ti in tis.items() if ti["duration"] is not None}
    return {"seconds": seconds, "steps": steps, "state": state}


def _run_reference(pipeline: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any]:
    """Plain xgboost on the script's split, with the DAG's default parameters, all CPUs."""
    import xgboost
    from higgs_data import FEATURES, LABEL
    from sklearn.metrics import accuracy_score, roc_auc_score

    df = pipeline["load_data"](None, n_rows=conf["n_rows"], seed=conf["seed"])
    data = pipeline["split"](df, seed=conf["seed"])
    params = {"objective": "binary:logistic", "eval_metric": ["logloss", "error"], "tree_method": "hist"}
    params |= {"max_depth": 6, "eta": 0.1, "nthread": os.cpu_count()}
    started = time.perf_counter()
    train = data["train"]
    booster = xgboost.train(
        params, xgboost.DMatrix(train[FEATURES], label=train[LABEL]), num_boost_round=conf["num_boost_round"]
    )
    seconds = time.perf_counter() - started
    proba = booster.predict(xgboost.DMatrix(data["test"][FEATURES]))
    y = data["test"][LABEL]
    metrics = {"accuracy": accuracy_score(y, proba > 0.5), "auc": roc_auc_score(y, proba)}
    return {"seconds": seconds, "metrics": metrics}


def _report(
    args: argparse.Namespace, script: dict, dag: dict, local: dict | None, reference: dict, cold: dict
) -> None:
    def quality(metrics: dict[str, Any]) -> str:
        if "accuracy" not in metrics:
            return "(no metrics)"
        return f"accuracy {metrics['accuracy']:.4f}  AUC {metrics['auc']:.4f}"

    def steps(timings: dict[str, float]) -> str:
        return ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items())

    ratio = dag["seconds"] / script["seconds"]
    print()
    print(f"HIGGS synthetic, {args.rows:,} rows, {args.rounds} rounds, {args.workers} Ray Train workers")
    print(f"  script (notebook functions) {script['seconds']:8.1f} s   {quality(script['metrics'])}")
    print(f"      steps: {steps(script['steps'])}")
    print(
        f"  DAG, dag.test()             {dag['seconds']:8.1f} s   {quality(dag['metrics'])}  [{dag['state']}]"
    )
    print(f"      tasks: {steps(dag['steps'])}")
    print(f"  ratio DAG / script          {ratio:8.2f} x  (target <= 1.2 x)")
    if local is not None:
        print(f"  DAG, LocalExecutor          {local['seconds']:8.1f} s   [{local['state']}]")
        print(f"      tasks: {steps(local['steps'])}")
        print(f"  ratio LocalExecutor / script {local['seconds'] / script['seconds']:7.2f} x")
    print(f"  reference xgboost.train     {reference['seconds']:8.1f} s   {quality(reference['metrics'])}")
    print(f"  cold start, 5,000 rows x 2 rounds: script {cold['script']:.1f} s, DAG {cold['dag']:.1f} s")
    summary = {
        "script_s": script["seconds"],
        "dag_test_s": dag["seconds"],
        "local_executor_s": local["seconds"] if local else None,
        "ratio": ratio,
        "cold": cold,
    }
    print(json.dumps(summary))


def _log(message: str) -> None:
    print(f"[{time.strftime('%X')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
