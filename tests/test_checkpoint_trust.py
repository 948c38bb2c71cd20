"""Checkpoint trust: a restore reads the checkpoint its reference recorded, or nothing.

Real Airflow (``dag.test``), real Ray, checkpoints on ``file://`` and on S3 (moto server). Whoever
can write the bucket can rewrite a manifest (its checksum is no secret): the reference in XCom
records the format and digest of the write, and a restore refuses a manifest that disagrees,
before any data is read, so a pickle payload put there is never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import ray
import xxhash

from airflow_ray import config
from airflow_ray.checkpoint import BASE_MARKER
from airflow_ray.exceptions import RayObjectLostError
from airflow_ray.owners import forget_owners, get_owner, owner_name
from tests import helpers
from tests.dags import checkpointed
from tests.s3_server import aws_connection, s3_server  # noqa: F401

SANITISED_KEY = "_.._x-9cdf6a50"  # path_component("../../x")


def _kill_owner(dag_id: str, run_id: str) -> None:
    ray.kill(get_owner(owner_name(dag_id, run_id)), no_restart=True)
    forget_owners()


def _rewrite(directory: Path, data_file: str, data: bytes, **manifest_changes: object) -> None:
    """Replace a checkpoint's data and manifest as someone with write access to the store could."""
    for old in directory.glob("data.*"):
        old.unlink()
    (directory / data_file).write_bytes(data)
    manifest_file = directory / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest.update(data_file=data_file, bytes=len(data), **manifest_changes)
    manifest_file.write_text(json.dumps(manifest))


@pytest.fixture
def configure(monkeypatch):
    """Set ``[ray] checkpoint_allow_pickle`` for the tasks this process runs (``dag.test``)."""

    def allow_pickle(allowed: bool) -> None:
        monkeypatch.setenv("AIRFLOW__RAY__CHECKPOINT_ALLOW_PICKLE", str(allowed))
        config.clear_caches()

    yield allow_pickle
    monkeypatch.undo()
    config.clear_caches()


def test_rewritten_manifests_are_refused_and_a_pickle_payload_never_runs(run_dag, tmp_path, capfd):
    """Between the write and the restore the bucket is rewritten: ``frame`` (Parquet) now has a
    manifest that says pickle with a payload whose checksum is right; ``array`` (``.npy``) other
    valid data with a matching manifest checksum. Both consumers of each refuse them."""
    base, marker = tmp_path / "base", tmp_path / "unpickled-here"
    payload = pickle.dumps(helpers.MarkerPayload(marker))

    def rewrite_the_bucket(run_id: str) -> None:
        (frame_dir,) = base.glob("checkpoint_trust/*/produce/-1/frame")
        _rewrite(
            frame_dir,
            "data.pkl",
            payload,
            format="pickle",
            checksum=f"sha256:{hashlib.sha256(payload).hexdigest()}",
        )
        (array_dir,) = base.glob("checkpoint_trust/*/produce/-1/array")
        other = io.BytesIO()
        np.save(other, np.zeros(200_000))  # the same shape, other values
        data = other.getvalue()
        _rewrite(array_dir, "data.npy", data, checksum=f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}")
        _kill_owner("checkpoint_trust", run_id)  # the consumers must restore from the bucket

    helpers.HARNESS["rewrite_the_bucket"] = rewrite_the_bucket
    try:
        result = run_dag(checkpointed.checkpoint_trust_dag, run_conf={"base": base.as_uri()})
    finally:
        del helpers.HARNESS["rewrite_the_bucket"]
    text = "".join(capfd.readouterr())
    assert result.states["produce"] == "success" and result.states["rewrite_the_bucket"] == "success"
    for consumer in ("consume_frame", "consume_frame_on_ray", "consume_array"):
        assert result.states[consumer] == "failed", result.states
    assert not marker.exists(), "the payload was unpickled"

    frame = result.xcom_raw("produce", key="frame")
    assert frame["checkpoint_format"] == "parquet" and frame["checkpoint_digest"].startswith("xxh3_128:")
    refused_frame = (
        f"Checkpoint {frame['checkpoint_uri']} is not the one that was written: its manifest says "
        "format 'pickle', expected 'parquet'"
    )
    assert text.count(refused_frame) >= 2, text[-5000:]  # the plain and the Ray consumer
    array = result.xcom_raw("produce", key="array")
    assert f"expected {array['checkpoint_digest']!r}" in text
    with pytest.raises(RayObjectLostError, match="its manifest says digest 'xxh3_128:"):
        result.xcom("produce", key="array")
    assert not marker.exists()


def test_pickle_checkpoints_are_recorded_as_such_and_can_be_forbidden(run_dag, tmp_path, capfd, configure):
    base = tmp_path.as_uri()
    configure(allowed=False)
    refused = run_dag(checkpointed.checkpoint_pickle_dag, run_conf={"base": base})
    assert refused.states["produce"] == "failed"
    text = "".join(capfd.readouterr())
    assert "Cannot checkpoint a builtins.dict" in text and "checkpoint_allow_pickle = False" in text
    assert "a pyarrow Table (Arrow IPC)" in text  # which types do not need pickle
    assert not list(tmp_path.rglob("data.pkl"))

    configure(allowed=True)
    result = run_dag(checkpointed.checkpoint_pickle_dag, run_conf={"base": base})
    assert result.state == "success", result.states
    reference = result.xcom_raw("produce")
    assert reference["checkpoint_format"] == "pickle"
    assert reference["checkpoint_digest"].startswith("sha256:")  # these bytes become code

    _kill_owner(result.dag_id, result.run_id)
    configure(allowed=False)
    with pytest.raises(
        RayObjectLostError,
        match=r"is a pickle, which this deployment does not read \(\[ray\] checkpoint_allow_pickle = False",
    ):
        result.xcom("produce")
    configure(allowed=True)
    assert result.xcom("produce")["name"] == "model"  # restored: the reference said pickle


def test_a_key_with_dots_and_slashes_stays_in_its_task_directory(run_dag, tmp_path):
    """``../../x`` is sanitised like every id; Airflow then refuses the key (its API has no '/')."""
    base = tmp_path / "base"
    result = run_dag(checkpointed.checkpoint_traversal_dag, run_conf={"base": base.as_uri()})
    assert result.states["produce"] == "failed"  # after the checkpoints were written
    (task_dir,) = base.glob("checkpoint_traversal/*/produce/-1")
    assert (base / BASE_MARKER).is_file()  # the one file outside a task directory: gc's marker
    files = {
        path.relative_to(task_dir).as_posix()
        for path in tmp_path.rglob("*")
        if path.is_file() and path.name != BASE_MARKER
    }
    assert files == {
        f"{SANITISED_KEY}/data.npy",
        f"{SANITISED_KEY}/manifest.json",
        "kept/data.npy",
        "kept/manifest.json",
    }


def test_a_key_with_dots_and_slashes_stays_in_its_task_directory_on_s3(run_dag, aws_connection, s3_server):  # noqa: F811
    result = run_dag(checkpointed.checkpoint_traversal_s3_dag)
    assert result.states["produce"] == "failed"
    client = s3_server.boto3_client()
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]]
    ours = [
        key for key in keys if "checkpoint_traversal_s3" in key or key.rstrip("/").endswith("x/manifest.json")
    ]
    (task_dir,) = {key.split("/produce/-1/")[0] + "/produce/-1/" for key in ours}
    assert task_dir.startswith("ckpt/checkpoint_traversal_s3/")
    assert sorted(key.removeprefix(task_dir) for key in ours) == [
        f"{SANITISED_KEY}/data.npy",
        f"{SANITISED_KEY}/manifest.json",
        "kept/data.npy",
        "kept/manifest.json",
    ]
