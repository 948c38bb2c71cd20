"""Checkpointed outputs survive the loss of their owner (real Airflow, real Ray, file:// store)."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from airflow_ray.errors import RayObjectLostError
from airflow_ray.store import forget_owners, get_owner, owner_name
from tests.dags import checkpointed


def _kill_owner(result) -> None:
    ray.kill(get_owner(owner_name(result.dag_id, result.run_id)), no_restart=True)
    forget_owners()


def test_owner_loss_restores_from_checkpoint_then_memory(run_dag, tmp_path, caplog):
    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": f"file://{tmp_path}"})
    assert result.state == "success", result.states
    expected = result.xcom("consume")
    ref = result.xcom_raw("produce", key="array")
    assert ref["checkpoint_uri"].startswith(f"file://{tmp_path}/checkpointed/")
    assert ref["checkpoint_uri"].endswith("/produce/-1/array/")
    assert (tmp_path / "checkpointed").exists()

    _kill_owner(result)  # every object of the run is gone with it
    with caplog.at_level("WARNING"):
        array = result.xcom("produce", key="array")
        frame = result.xcom("produce", key="frame")
    assert float(array.sum()) + float(frame["a"].sum()) == expected  # identical output
    assert "Restored the output of task 'produce'" in caplog.text

    # re-registered with the (new) owner: the next read comes from memory, not storage
    owner = get_owner(owner_name(result.dag_id, result.run_id))
    boxed = ray.get(owner.lookup.remote([(result.dag_id, result.run_id, "produce", -1, "array")]))
    assert boxed[0] is not None
    np.testing.assert_array_equal(ray.get(boxed[0][0]), array)


def test_corrupt_checkpoint_is_an_error_naming_the_path(run_dag, tmp_path):
    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": f"file://{tmp_path}"})
    assert result.state == "success", result.states
    uri = result.xcom_raw("produce", key="array")["checkpoint_uri"]
    data = next((tmp_path / uri.removeprefix(f"file://{tmp_path}/")).glob("data.*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    _kill_owner(result)
    with pytest.raises(RayObjectLostError, match="restoring it from its checkpoint") as excinfo:
        result.xcom("produce", key="array")
    assert str(data.parent) in str(excinfo.value)
