"""Test DAGs for the Ray XCom backend: types, zero-copy, isolation, lost objects."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
from airflow.sdk import dag, task

from airflow_ray import ray_task


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"x": rng.normal(size=5000), "y": rng.integers(0, 2, 5000), "s": ["a", "b"] * 2500})


def _model():
    from sklearn.linear_model import LogisticRegression

    df = _frame()
    return LogisticRegression().fit(df[["x"]], df["y"])


def _booster():
    import xgboost as xgb

    df = _frame()
    return xgb.train({"max_depth": 2}, xgb.DMatrix(df[["x"]], label=df["y"]), num_boost_round=3)


def _payload() -> dict:
    return {
        "array": np.arange(100_000, dtype=np.float64),
        "frame": _frame(),
        "table": pa.Table.from_pandas(_frame()),
        "nested": {"a": [1, 2, {"b": (3, 4)}], "c": None},
        "model": _model(),
        "booster": _booster(),
    }


def _check(array, frame, table, nested, model, booster) -> dict:
    """Runs in both kinds of consumer: every type arrives as itself, with its data."""
    import xgboost as xgb

    expected = _frame()
    return {
        "array": type(array).__name__ == "ndarray" and float(array.sum()) == float(np.arange(100_000).sum()),
        "frame": isinstance(frame, pd.DataFrame) and frame.equals(expected),
        "table": isinstance(table, pa.Table) and table.equals(pa.Table.from_pandas(expected)),
        "nested": nested == {"a": [1, 2, {"b": (3, 4)}], "c": None},
        "model": float(model.coef_[0][0]) == float(_model().coef_[0][0]),
        "booster": booster.predict(xgb.DMatrix(expected[["x"]]))[:5].tolist()
        == _booster().predict(xgb.DMatrix(expected[["x"]]))[:5].tolist(),
    }


@dag(dag_id="types", schedule=None)
def types():
    @ray_task(multiple_outputs=True, num_cpus=0.5)
    def produce_on_ray() -> dict:
        return _payload()

    @task(multiple_outputs=True)
    def produce_in_airflow() -> dict:
        return _payload()

    @ray_task(num_cpus=0.5)
    def check_on_ray(array, frame, table, nested, model, booster) -> dict:
        return _check(array, frame, table, nested, model, booster)

    @task
    def check_in_airflow(array, frame, table, nested, model, booster) -> dict:
        return _check(array, frame, table, nested, model, booster)

    for producer in (produce_on_ray(), produce_in_airflow()):
        args = {k: producer[k] for k in ("array", "frame", "table", "nested", "model", "booster")}
        check_on_ray(**args)
        check_in_airflow(**args)


@dag(dag_id="zero_copy", schedule=None)
def zero_copy():
    @ray_task(num_cpus=0.5)
    def big() -> np.ndarray:
        return np.ones(20_000_000 // 8)

    @task
    def big_plain() -> np.ndarray:
        return np.ones(20_000_000 // 8)

    @ray_task(num_cpus=0.5)
    def inspect_on_ray(arr: np.ndarray, nested: list) -> dict:
        return {
            "pid": os.getpid(),
            "read_only": not arr.flags.writeable,
            "shared": arr.base is not None,
            "nested_read_only": not nested[0]["arr"].flags.writeable,
            "sum": float(arr.sum() + nested[0]["arr"].sum()),
        }

    @task
    def inspect_in_airflow(arr: np.ndarray) -> dict:
        return {"pid": os.getpid(), "read_only": not arr.flags.writeable, "sum": float(arr.sum())}

    b, p = big(), big_plain()
    inspect_on_ray(b, [{"arr": p}])
    inspect_in_airflow(b)


@dag(dag_id="isolation", schedule=None, params={"value": 0})
def isolation():
    @ray_task(num_cpus=0.25)
    def produce(value: str) -> np.ndarray:
        return np.full(10_000, int(value))

    @task
    def consume(arr: np.ndarray) -> int:
        return int(arr[0])

    consume(produce("{{ params.value }}"))


def _squares(batch: dict) -> dict:
    return {"id": batch["id"], "square": batch["id"] ** 2}


def _summary(ds) -> dict:
    """What a consumer sees of a dataset: its type, rows, blocks and a checksum of its data."""
    return {
        "type": type(ds).__name__,
        "rows": ds.count(),
        "blocks": ds.num_blocks(),
        # Read every block here rather than ds.sum(), whose aggregation is a shuffle job of
        # its own (~20 s of Ray Data tasks on a small machine, for 4 summaries per run).
        "sum": sum(int(batch["square"].sum()) for batch in ds.iter_batches(batch_format="numpy")),
    }


@dag(dag_id="datasets", schedule=None)
def datasets():
    @ray_task(multiple_outputs=True, num_cpus=0.5)
    def make_on_ray() -> dict:
        import ray.data

        ds = ray.data.range(1000, override_num_blocks=4).map_batches(_squares)
        return {"ds": ds, "pid": os.getpid()}  # not materialized: the provider must run it

    @task
    def kill_producer(pid: int) -> None:
        """The Ray worker that ran the dataset owned its blocks; without the owner they die here."""
        import signal
        import time

        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)

    @task
    def make_in_airflow():
        import ray.data

        from airflow_ray.hooks import RayHook

        RayHook().connect()  # a plain task that uses Ray is a driver of the same cluster
        return ray.data.range(500, override_num_blocks=2).map_batches(_squares).materialize()

    @ray_task(num_cpus=0.5)
    def check_on_ray(from_ray, from_airflow) -> dict:
        return {"from_ray": _summary(from_ray), "from_airflow": _summary(from_airflow)}

    @task
    def check_in_airflow(from_ray, from_airflow) -> dict:
        return {"from_ray": _summary(from_ray), "from_airflow": _summary(from_airflow)}

    made = make_on_ray()
    plain = make_in_airflow()
    killed = kill_producer(made["pid"])
    for check in (check_on_ray(made["ds"], plain), check_in_airflow(made["ds"], plain)):
        killed >> check


types_dag = types()
datasets_dag = datasets()
zero_copy_dag = zero_copy()
isolation_dag = isolation()
