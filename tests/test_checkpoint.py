# ruff: noqa: F811  (pytest fixtures imported from tests.s3_server are redefined as arguments)
"""Checkpoint storage: real files (``tmp_path`` + ``file://``) and a real S3 endpoint (moto server).

Connections come from ``AIRFLOW_CONN_*`` env vars: outside a task, Airflow 3.3's Task SDK
``BaseHook.get_connection`` reads them (and secrets backends) without a metadata DB.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import xxhash

from airflow_ray import checkpoint, config
from airflow_ray._worker.checkpoint import paths, streams
from airflow_ray.checkpoint import (
    MANIFEST_FORMAT_VERSION,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLocation,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    checkpoint_uri,
    delete_checkpoint,
    delete_run_checkpoints,
    read_checkpoint,
    read_manifest,
    resolve_checkpoint_location,
    write_checkpoint,
)
from tests import helpers
from tests.s3_server import aws_connection, s3_server  # noqa: F401

SECRET = "testing-secret-key-do-not-log"


class LinearModel:
    """Stands in for a fitted sklearn estimator: numpy state plus a closure cloudpickle must carry."""

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef_ = coef
        self.intercept_ = intercept
        self.link = lambda z: z * 2.0 + intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.link(x @ self.coef_)


@pytest.fixture(autouse=True)
def _clean_config(monkeypatch: pytest.MonkeyPatch):
    for name in ("AIRFLOW__RAY__CHECKPOINT_PATH", "AIRFLOW__RAY__CHECKPOINT_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    config.clear_caches()
    yield
    config.clear_caches()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the streaming block so small test data still crosses many block boundaries."""
    monkeypatch.setattr(streams, "BLOCK_SIZE", 4096)


@pytest.fixture
def location(tmp_path: Path) -> CheckpointLocation:
    """A location as the Airflow side resolves it: it names airflow-ray as the producer."""
    loc = resolve_checkpoint_location(
        checkpoint_path=tmp_path.as_uri(), checkpoint_source=None, dag_id="d", run_id="r", task_id="t"
    )
    assert loc == CheckpointLocation(checkpoint_uri(tmp_path.as_uri(), dag_id="d", run_id="r", task_id="t"))
    return loc


def _dir(location: CheckpointLocation) -> Path:
    return Path(location.uri.removeprefix("file://"))


def _data_file(location: CheckpointLocation) -> Path:
    manifest = json.loads((_dir(location) / "manifest.json").read_text())
    return _dir(location) / manifest["data_file"]


def _edit_manifest(location: CheckpointLocation, drop: tuple[str, ...] = (), **changes: object) -> None:
    """Rewrite the manifest as a damaged, older or newer checkpoint would have it."""
    manifest_file = _dir(location) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for key in drop:
        del manifest[key]
    manifest.update(changes)
    manifest_file.write_text(json.dumps(manifest))


def _mixed_frame(rows: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "i64": np.arange(rows, dtype="int64"),
            "u8": (np.arange(rows) % 250).astype("uint8"),
            "f32": rng.random(rows, dtype="float32"),
            "f64": np.where(np.arange(rows) % 7 == 0, np.nan, rng.random(rows)),
            "flag": np.arange(rows) % 2 == 0,
            "text": [f"row {i}" for i in range(rows)],
            "obj_text": np.array([f"o{i}" for i in range(rows)], dtype=object),
            "nullable": pd.array([None if i % 5 == 0 else i for i in range(rows)], dtype="Int64"),
            "when": pd.date_range("2024-01-01", periods=rows, freq="min", tz="UTC"),
            "took": pd.to_timedelta(np.arange(rows), unit="ms"),
            "kind": pd.Categorical(np.array(["a", "b", "c"])[np.arange(rows) % 3]),
        },
        index=pd.Index([f"key-{i}" for i in range(rows)], name="key"),
    )


# ------------------------------------------------------------------------------------------------
# Formats round-trip exactly.


def test_dataframe_round_trips_as_parquet(location, small_blocks):
    df = _mixed_frame()
    manifest = write_checkpoint(df, location)
    back = read_checkpoint(location)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert manifest["format"] == "parquet"
    assert manifest["data_file"] == "data.parquet"
    assert manifest["rows"] == len(df)
    assert manifest["shape"] == list(df.shape)
    assert {f["name"] for f in manifest["schema"]} >= {"i64", "when", "key"}
    # Other tools read the data file directly.
    pd.testing.assert_frame_equal(pd.read_parquet(_data_file(location)), df, check_exact=True)


@pytest.mark.parametrize(
    "df",
    [
        pytest.param(pd.DataFrame({"a": np.arange(10)}, index=pd.RangeIndex(5, 25, 2)), id="range-index"),
        pytest.param(
            pd.DataFrame({"v": np.arange(6.0)}, index=pd.date_range("2024", periods=6, freq="h", name="ts")),
            id="datetime-index-with-freq",
        ),
        pytest.param(
            pd.DataFrame(
                {"v": [1, 2, 3]},
                index=pd.MultiIndex.from_arrays([["a", "a", "b"], [1, 2, 1]], names=["g", None]),
            ),
            id="multi-index",
        ),
        pytest.param(pd.DataFrame(np.ones((3, 2)), columns=[0, 1]), id="int-column-labels"),
        pytest.param(pd.DataFrame({"a": pd.Series([], dtype="float32")}), id="empty"),
        pytest.param(
            pd.DataFrame({"d": [decimal.Decimal("1.10"), None], "day": [datetime.date(2024, 1, 2), None]}),
            id="decimal-and-date-objects",
        ),
    ],
)
def test_dataframe_variants_round_trip_as_parquet(location, df):
    assert write_checkpoint(df, location)["format"] == "parquet"
    back = read_checkpoint(location)
    pd.testing.assert_frame_equal(back, df, check_exact=True, check_freq=True)
    assert back.index.equals(df.index) and type(back.index) is type(df.index)


@pytest.mark.parametrize(
    "df",
    [
        pytest.param(pd.DataFrame({"l": [[1, 2], [3]]}), id="lists-in-object-column"),
        pytest.param(pd.DataFrame({"m": pd.Series(["a", 1], dtype=object)}), id="mixed-objects"),
        pytest.param(pd.DataFrame({"m": pd.Series([1, 1.5], dtype=object)}), id="numbers-as-objects"),
        pytest.param(pd.DataFrame({"s": pd.Series(["a", None, np.nan], dtype=object)}), id="none-and-nan"),
        pytest.param(pd.DataFrame({"c": [1j, 2 + 0.5j]}), id="complex"),
        pytest.param(pd.DataFrame([[1, 2]], columns=["a", "a"]), id="duplicate-columns"),
    ],
)
def test_dataframe_parquet_would_change_falls_back_to_pickle(location, df):
    assert write_checkpoint(df, location)["format"] == "pickle"
    back = read_checkpoint(location, expected_format="pickle")
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    for column in range(df.shape[1]):
        assert [type(v) for v in back.iloc[:, column]] == [type(v) for v in df.iloc[:, column]]


def test_dataframe_attrs_fall_back_to_pickle(location):
    df = pd.DataFrame({"a": [1, 2]})
    df.attrs["source"] = "sensor-7"
    assert write_checkpoint(df, location)["format"] == "pickle"
    assert read_checkpoint(location, expected_format="pickle").attrs == {"source": "sensor-7"}


def test_arrow_table_round_trips_as_arrow_ipc(location, small_blocks):
    n = 2000
    table = pa.table(
        {
            "i": pa.array(range(n), pa.int32()),
            "big_text": pa.array([f"t{i}" for i in range(n)], pa.large_string()),
            "dict": pa.array(["x", "y"] * (n // 2)).dictionary_encode(),
            "lists": pa.array([[i, None] for i in range(n)], pa.list_(pa.int64())),
            "struct": pa.array([{"a": i, "b": str(i)} for i in range(n)]),
            "ts": pa.array(range(n), pa.timestamp("ns", tz="Europe/Paris")),
            "dec": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(12, 2)),
            "nulls": pa.nulls(n),
        },
        metadata={"owner": "team-a"},
    )
    manifest = write_checkpoint(table, location)
    back = read_checkpoint(location)
    assert back.equals(table, check_metadata=True)
    assert back.schema.equals(table.schema, check_metadata=True)
    assert manifest["format"] == "arrow_ipc" and manifest["data_file"] == "data.arrow"
    assert manifest["rows"] == n
    assert [f["name"] for f in manifest["schema"]] == table.column_names
    with pa.memory_map(str(_data_file(location))) as source:
        assert pa.ipc.open_file(source).read_all().equals(table)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.arange(30000, dtype="float64").reshape(300, 100), id="c-contiguous"),
        pytest.param(np.asfortranarray(np.arange(30000, dtype="int16").reshape(100, 300)), id="fortran"),
        pytest.param(np.arange(60000, dtype="float32").reshape(200, 300)[::3, 1::2], id="strided"),
        pytest.param(np.arange(24, dtype="int64").reshape(2, 3, 4).transpose(1, 0, 2), id="transposed"),
        pytest.param(np.arange(5000, dtype=">i4"), id="big-endian"),
        pytest.param(np.datetime64("2024-01-01", "s") + np.arange(5000), id="datetime64"),
        pytest.param(
            np.array([(1, 2.5, b"ab"), (3, 4.5, b"cd")], dtype=[("a", "<i4"), ("b", "<f8"), ("c", "S2")]),
            id="structured",
        ),
        pytest.param(np.array(["ab", "çé", "🙂"]), id="unicode"),
        pytest.param(np.array(3.25), id="zero-dim"),
        pytest.param(np.empty((0, 3), dtype="uint8"), id="empty"),
        pytest.param(np.array([True, False, True]), id="bool"),
    ],
)
def test_ndarray_round_trips_as_npy(location, small_blocks, array):
    manifest = write_checkpoint(array, location)
    back = read_checkpoint(location)
    assert manifest["format"] == "npy" and manifest["data_file"] == "data.npy"
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array, strict=True)
    assert manifest["dtype"] == str(array.dtype) and manifest["shape"] == list(array.shape)
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert back.flags.f_contiguous and manifest["options"]["fortran_order"]
    # Written exactly as np.save would lay it out, so numpy (and anything reading .npy) loads it.
    np.testing.assert_array_equal(np.load(_data_file(location)), array, strict=True)


def test_read_only_array_as_returned_by_ray_get(location):
    array = np.arange(100.0)
    array.setflags(write=False)
    write_checkpoint(array, location)
    np.testing.assert_array_equal(read_checkpoint(location), array)


def test_object_array_uses_pickle(location):
    array = np.array([{"a": 1}, None, "x"], dtype=object)
    assert write_checkpoint(array, location)["format"] == "pickle"
    back = read_checkpoint(location, expected_format="pickle")
    assert back.dtype == object and list(back) == list(array)


def test_arbitrary_object_round_trips_with_cloudpickle(location, small_blocks):
    model = LinearModel(np.linspace(0, 1, 5000), intercept=0.5)
    value = {"model": model, "metrics": [0.91, 0.88], "name": "run-1"}
    manifest = write_checkpoint(value, location)
    back = read_checkpoint(location, expected_format="pickle")
    assert manifest["format"] == "pickle" and manifest["data_file"] == "data.pkl"
    assert manifest["python_type"] == "builtins.dict" and manifest["rows"] == 3
    assert manifest["options"]["pickler"] in {"ray.cloudpickle", "cloudpickle"}
    restored = back["model"]
    assert isinstance(restored, LinearModel)
    np.testing.assert_array_equal(restored.coef_, model.coef_, strict=True)
    x = np.ones((2, 5000))
    np.testing.assert_array_equal(restored.predict(x), model.predict(x))
    assert back["metrics"] == [0.91, 0.88] and back["name"] == "run-1"


# ------------------------------------------------------------------------------------------------
# Manifest and layout.


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(pd.DataFrame({"a": range(100)}), id="parquet"),
        pytest.param(pa.table({"a": range(100)}), id="arrow"),
        pytest.param(np.arange(100), id="npy"),
        pytest.param({"a": 1}, id="pickle"),
    ],
)
def test_manifest_describes_the_data_file(location, small_blocks, value):
    manifest = write_checkpoint(value, location)
    data = _data_file(location).read_bytes()
    assert manifest == read_manifest(location)
    assert manifest["format_version"] == MANIFEST_FORMAT_VERSION
    assert manifest["bytes"] == len(data)
    if manifest["format"] == "pickle":  # bytes that become code: a cryptographic digest
        assert manifest["checksum"] == f"sha256:{hashlib.sha256(data).hexdigest()}"
    else:
        assert manifest["checksum"] == f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"
    assert manifest["python_type"] == f"{type(value).__module__}.{type(value).__qualname__}"
    assert set(manifest["producer"]) >= {"python", "pyarrow", "numpy", "pandas", "airflow_ray"}
    assert manifest["producer"]["airflow_ray"] == __import__("airflow_ray.version").version.__version__
    created = datetime.datetime.fromisoformat(manifest["created_at"])
    assert created.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 600
    assert sorted(p.name for p in _dir(location).iterdir()) == sorted(
        ["manifest.json", manifest["data_file"]]
    )


def test_retry_overwrites_and_leaves_one_set_of_files(location):
    write_checkpoint(pd.DataFrame({"a": [1]}), location)
    write_checkpoint(pd.DataFrame({"a": [2]}), location)
    assert sorted(p.name for p in _dir(location).iterdir()) == ["data.parquet", "manifest.json"]
    assert read_checkpoint(location)["a"].tolist() == [2]
    # A retry that returns another type replaces the first attempt's data file too.
    write_checkpoint(np.arange(3), location)
    assert sorted(p.name for p in _dir(location).iterdir()) == ["data.npy", "manifest.json"]
    np.testing.assert_array_equal(read_checkpoint(location), np.arange(3))


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_interrupted_write_leaves_no_manifest_then_retry_succeeds(location):
    write_checkpoint({"old": True}, location)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        write_checkpoint([np.zeros(10_000), _Unpicklable()], location)
    with pytest.raises(CheckpointNotFoundError):
        read_checkpoint(location)
    assert list(_dir(location).iterdir()) == []  # the partial data file was removed
    write_checkpoint({"new": True}, location)
    assert read_checkpoint(location, expected_format="pickle") == {"new": True}
    assert sorted(p.name for p in _dir(location).iterdir()) == ["data.pkl", "manifest.json"]


# ------------------------------------------------------------------------------------------------
# Damage is detected and named.


VALUES = [
    pytest.param(_mixed_frame(500), id="parquet"),
    pytest.param(pa.table({"a": np.arange(5000)}), id="arrow"),
    pytest.param(np.arange(5000.0), id="npy"),
    pytest.param({"blob": bytes(5000)}, id="pickle"),
]


@pytest.mark.parametrize("value", VALUES)
def test_truncated_data_file_is_corrupt_and_named(location, value):
    written = write_checkpoint(value, location)["format"]
    data_file = _data_file(location)
    data_file.write_bytes(data_file.read_bytes()[:-100])
    with pytest.raises(CheckpointCorruptError, match="truncated") as info:
        read_checkpoint(location, expected_format=written)
    assert str(data_file) in str(info.value)
    assert info.value.path.endswith(str(data_file))


@pytest.mark.parametrize("value", VALUES)
def test_flipped_byte_fails_checksum(location, small_blocks, value):
    written = write_checkpoint(value, location)["format"]
    data_file = _data_file(location)
    data = bytearray(data_file.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="checksum") as info:
        read_checkpoint(location, expected_format=written)
    assert str(data_file) in str(info.value)


def test_truncated_file_with_matching_manifest_fails_to_parse(location):
    """Even if a manifest were rewritten to match, unparsable data is reported, not returned."""
    write_checkpoint(pd.DataFrame({"a": range(1000)}), location)
    data_file = _data_file(location)
    data = data_file.read_bytes()[:-50]
    data_file.write_bytes(data)
    _edit_manifest(location, bytes=len(data), checksum=f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}")
    with pytest.raises(CheckpointCorruptError, match="not readable Parquet") as info:
        read_checkpoint(location)
    assert str(data_file) in str(info.value)


def test_missing_checkpoint_is_not_found(location):
    with pytest.raises(CheckpointNotFoundError, match=r"manifest\.json is missing") as info:
        read_checkpoint(location)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path.endswith("/d/r/t/-1/manifest.json")
    assert location.uri.removeprefix("file://") in str(info.value)


def test_data_without_manifest_is_not_found(location):
    _dir(location).mkdir(parents=True)
    (_dir(location) / "data.npy").write_bytes(b"partial upload")
    with pytest.raises(CheckpointNotFoundError):
        read_checkpoint(location)


def test_missing_data_file_is_corrupt(location):
    write_checkpoint(np.arange(10), location)
    _data_file(location).unlink()
    with pytest.raises(CheckpointCorruptError, match="missing"):
        read_checkpoint(location)


def test_unparsable_manifest_is_corrupt(location):
    write_checkpoint(np.arange(10), location)
    (_dir(location) / "manifest.json").write_text('{"format": "npy", ')
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json is not valid JSON"):
        read_checkpoint(location)


def test_manifest_cannot_point_outside_the_checkpoint(location):
    write_checkpoint(np.arange(10), location)
    _edit_manifest(location, data_file="../../../etc/passwd")
    with pytest.raises(CheckpointCorruptError, match="unexpected data file"):
        read_checkpoint(location)


@pytest.mark.parametrize("value", VALUES)
def test_format_version_1_checkpoints_read_and_verify_with_sha256(location, small_blocks, value):
    written = write_checkpoint(value, location)["format"]
    # what airflow-ray wrote before checksums moved to XXH3: ``sha256`` instead of ``checksum``
    sha256 = hashlib.sha256(_data_file(location).read_bytes()).hexdigest()
    _edit_manifest(location, drop=("checksum",), format_version=1, sha256=sha256)
    assert read_manifest(location)["format_version"] == 1
    back = read_checkpoint(location, expected_format=written)
    if isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(back, value, check_exact=True)
    elif isinstance(value, pa.Table):
        assert back.equals(value)
    elif isinstance(value, np.ndarray):
        np.testing.assert_array_equal(back, value)
    else:
        assert back == value

    data_file = _data_file(location)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="fails its checksum: sha256:"):
        read_checkpoint(location, expected_format=written)


def test_unknown_checksum_algorithm_is_refused(location):
    write_checkpoint(np.arange(10), location)
    _edit_manifest(location, checksum="blake9:00")
    with pytest.raises(CheckpointError, match=r"uses checksum 'blake9'.*upgrade airflow-ray"):
        read_checkpoint(location)


def test_newer_format_version_is_refused(location):
    write_checkpoint(np.arange(10), location)
    _edit_manifest(location, format_version=MANIFEST_FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="upgrade airflow-ray"):
        read_checkpoint(location)


def test_manifest_rewritten_to_say_pickle_is_refused_and_never_unpickled(location, tmp_path):
    written = write_checkpoint(pd.DataFrame({"a": range(10)}), location)
    marker = tmp_path / "unpickled-here"
    payload = pickle.dumps(helpers.MarkerPayload(marker))
    _data_file(location).unlink()
    (_dir(location) / "data.pkl").write_bytes(payload)
    digest = f"sha256:{hashlib.sha256(payload).hexdigest()}"  # anyone can compute it
    _edit_manifest(location, format="pickle", data_file="data.pkl", bytes=len(payload), checksum=digest)

    with pytest.raises(CheckpointMismatchError) as info:
        read_checkpoint(location, expected_format="parquet", expected_digest=written["checksum"])
    assert str(info.value).startswith(
        f"Checkpoint {location.uri} is not the one that was written: its manifest says format "
        "'pickle', expected 'parquet'"
    )
    assert info.value.path == location.uri
    with pytest.raises(
        CheckpointMismatchError, match="is a pickle checkpoint and its reader does not expect one"
    ):
        read_checkpoint(location)  # nothing expected: anything but pickle
    assert not marker.exists()


def test_manifest_with_another_digest_is_refused(location):
    written = write_checkpoint(np.arange(100), location)
    other = np.arange(100) * 2  # valid data, and a manifest checksum that matches it
    np.save(_data_file(location), other)
    data = _data_file(location).read_bytes()
    _edit_manifest(location, bytes=len(data), checksum=f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}")
    np.testing.assert_array_equal(read_checkpoint(location), other)  # the checksum alone cannot tell
    with pytest.raises(CheckpointMismatchError) as info:
        read_checkpoint(location, expected_format="npy", expected_digest=written["checksum"])
    found = read_manifest(location)["checksum"]
    assert f"its manifest says digest {found!r}, expected {written['checksum']!r}" in str(info.value)
    assert location.uri in str(info.value)


def test_pickle_forbidden_refuses_before_writing(location):
    with pytest.raises(CheckpointError, match=r"checkpoint_allow_pickle = False") as info:
        write_checkpoint({"a": 1}, location, allow_pickle=False)
    assert "Cannot checkpoint a builtins.dict" in str(info.value) and location.uri in str(info.value)
    assert "pandas DataFrame" in str(info.value) and "numpy array" in str(info.value)
    assert not _dir(location).exists() or list(_dir(location).iterdir()) == []
    assert write_checkpoint(np.arange(3), location, allow_pickle=False)["format"] == "npy"


@pytest.mark.parametrize("cls", [CheckpointCorruptError, CheckpointNotFoundError, CheckpointError])
def test_errors_survive_pickling_as_from_a_ray_worker(cls):
    error = pickle.loads(pickle.dumps(cls("bad data at s3://b/k", "s3://b/k")))
    assert type(error) is cls and error.path == "s3://b/k" and str(error) == "bad data at s3://b/k"
    assert isinstance(error, RuntimeError if cls is CheckpointCorruptError else Exception)


# ------------------------------------------------------------------------------------------------
# Deletion.


def test_delete_checkpoint_and_run(tmp_path):
    base = tmp_path.as_uri()
    locs = {
        (run, task): CheckpointLocation(checkpoint_uri(base, dag_id="d", run_id=run, task_id=task))
        for run in ("run-1", "run-2")
        for task in ("a", "b")
    }
    for loc in locs.values():
        write_checkpoint([1, 2, 3], loc)
    delete_checkpoint(locs["run-1", "a"].uri)
    delete_checkpoint(locs["run-1", "a"].uri)  # already gone: fine
    with pytest.raises(CheckpointNotFoundError):
        read_checkpoint(locs["run-1", "a"])
    assert read_checkpoint(locs["run-1", "b"], expected_format="pickle") == [1, 2, 3]
    delete_run_checkpoints(base, "d", "run-1")
    delete_run_checkpoints(base, "d", "run-1")
    assert not (tmp_path / "d" / "run-1").exists()
    assert read_checkpoint(locs["run-2", "a"], expected_format="pickle") == [1, 2, 3]


def test_list_run_checkpoints_finds_each_run_with_its_newest_write(tmp_path):
    """A run is as old as its newest file or directory, manifest or not (a write in progress)."""
    base = tmp_path.as_uri()
    run_id = "manual__2024-01-01T00:00:00+00:00"
    run_dir = tmp_path / "d" / checkpoint.path_component(run_id)
    write_checkpoint([1], CheckpointLocation(checkpoint_uri(base, dag_id="d", run_id=run_id, task_id="a")))
    write_checkpoint([2], CheckpointLocation(checkpoint_uri(base, dag_id="d", run_id=run_id, task_id="b")))
    for n, path in enumerate(sorted(run_dir.rglob("*"))):
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
    os.utime(run_dir, (1_600_000_000, 1_600_000_000))
    interrupted = tmp_path / "e" / "interrupted"
    (interrupted / "t" / "-1").mkdir(parents=True)  # no manifest yet
    for path in (interrupted, interrupted / "t", interrupted / "t" / "-1"):
        os.utime(path, (1_700_000_500, 1_700_000_500))

    runs = {(run.dag, run.run): run for run in checkpoint.list_run_checkpoints(base)}
    assert set(runs) == {("d", checkpoint.path_component(run_id)), ("e", "interrupted")}
    found = runs["d", checkpoint.path_component(run_id)]
    newest = 1_700_000_000 + len(list(run_dir.rglob("*"))) - 1
    assert found.newest_written == datetime.datetime.fromtimestamp(newest, datetime.UTC)
    assert runs["e", "interrupted"].newest_written == datetime.datetime.fromtimestamp(
        1_700_000_500, datetime.UTC
    )
    delete_checkpoint(found.uri)
    assert not run_dir.exists()
    assert list(checkpoint.list_run_checkpoints((tmp_path / "nothing").as_uri())) == []


# ------------------------------------------------------------------------------------------------
# Locations: layout and secrecy (resolution: test_checkpoint_location.py).


def test_checkpoint_uri_layout_is_safe_and_readable():
    run_id = "manual__2024-01-01T00:00:00+00:00"
    uri = checkpoint_uri("s3://bucket/prefix/", dag_id="etl", run_id=run_id, task_id="grp.load", map_index=3)
    assert uri.startswith("s3://bucket/prefix/etl/manual__2024-01-01T00_00_00_00_00-")
    assert uri.endswith("/grp.load/3/")
    other = checkpoint_uri("s3://bucket/prefix", dag_id="etl", run_id=run_id[:-1] + "1", task_id="grp.load")
    assert other.split("/")[5] != uri.split("/")[5]
    assert checkpoint_uri("s3://b", dag_id="d", run_id="scheduled__x", task_id="t") == (
        "s3://b/d/scheduled__x/t/-1/"
    )
    traversal = checkpoint_uri("file:///base", dag_id="d", run_id="..", task_id="t")
    assert "/../" not in traversal and traversal.startswith("file:///base/d/")
    # Every component goes through the one sanitiser: no '/' in it, none starts with '.'.
    hostile = checkpoint_uri("file:///base", dag_id="../../x", run_id="../..", task_id="../x", map_index=2)
    components = hostile.removeprefix("file:///base/").removesuffix("/").split("/")
    assert len(components) == 4 and components[3] == "2", hostile
    assert all(c and not c.startswith(".") for c in components), hostile
    assert checkpoint_uri("/tmp/base", dag_id="d", run_id="r", task_id="t").startswith("file:///tmp/base/")


def test_location_never_shows_credentials():
    loc = CheckpointLocation("s3://b/p/d/r/t/-1/", {"key": "AKIA-test", "secret": SECRET, "token": SECRET})
    for text in (repr(loc), str(loc), f"{loc}", f"{loc!r}"):
        assert SECRET not in text and "AKIA-test" not in text
    assert repr(loc) == "CheckpointLocation(uri='s3://b/p/d/r/t/-1/')"
    restored = pickle.loads(pickle.dumps(loc))  # it travels to a Ray worker
    assert restored.uri == loc.uri and restored.storage_options == loc.storage_options
    assert hash(loc) == hash(CheckpointLocation(loc.uri))


# ------------------------------------------------------------------------------------------------
# S3 end to end, through the Airflow connection.


def test_s3_end_to_end_via_aws_connection(aws_connection, s3_server):
    run_id = "manual__2024-05-01T10:00:00+00:00"
    loc = resolve_checkpoint_location(
        checkpoint_path=None, checkpoint_source=aws_connection, dag_id="d", run_id=run_id, task_id="t"
    )
    loc = pickle.loads(pickle.dumps(loc))  # as shipped to a Ray worker
    assert loc.uri.startswith(f"s3://{s3_server.bucket}/ckpt/d/manual__2024-05-01T10_00_00_00_00-")

    df = _mixed_frame(2000)
    manifest = write_checkpoint(df, loc)
    pd.testing.assert_frame_equal(read_checkpoint(loc), df, check_exact=True)
    # Large enough for a multipart upload (32 MiB parts) and several read blocks.
    array = np.random.default_rng(1).random((5_000_000, 2))
    write_checkpoint(array, loc)
    np.testing.assert_array_equal(read_checkpoint(loc), array, strict=True)

    client = s3_server.boto3_client()
    prefix = loc.uri.removeprefix(f"s3://{s3_server.bucket}/")
    keys = sorted(
        o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]
    )
    assert keys == [prefix + "data.npy", prefix + "manifest.json"]
    stored = json.loads(
        client.get_object(Bucket=s3_server.bucket, Key=prefix + "manifest.json")["Body"].read()
    )
    assert stored["format"] == "npy" and stored["bytes"] == array.nbytes + 128
    assert manifest["format"] == "parquet"

    # A reader given only the URI and options (e.g. another worker) sees the same checkpoint.
    np.testing.assert_array_equal(read_checkpoint(loc.uri, loc.storage_options), array)

    # Damage on the store is caught and named with its s3:// URI.
    body = bytearray(client.get_object(Bucket=s3_server.bucket, Key=prefix + "data.npy")["Body"].read())
    body[1000] ^= 0xFF
    client.put_object(Bucket=s3_server.bucket, Key=prefix + "data.npy", Body=bytes(body))
    with pytest.raises(CheckpointCorruptError, match="checksum") as info:
        read_checkpoint(loc)
    assert f"s3://{s3_server.bucket}/{prefix}data.npy" in str(info.value)

    delete_run_checkpoints(f"s3://{s3_server.bucket}/ckpt", "d", run_id, loc.storage_options)
    remaining = client.list_objects_v2(Bucket=s3_server.bucket, Prefix="ckpt/d/manual__2024-05-01")
    assert remaining.get("KeyCount", 0) == 0
    with pytest.raises(CheckpointNotFoundError):
        read_checkpoint(loc)


# ------------------------------------------------------------------------------------------------
# Runs on a Ray worker without Airflow.


def test_worker_side_needs_no_airflow(tmp_path):
    script = f"""
import sys
import airflow_ray
before = set(sys.modules)
from airflow_ray import checkpoint
heavy = {{"airflow", "pandas", "pyarrow", "numpy", "fsspec", "ray"}}
loaded = {{m.split(".")[0] for m in set(sys.modules) - before}}
assert not loaded & heavy, loaded & heavy

import numpy as np, pandas as pd
loc = checkpoint.CheckpointLocation({tmp_path.as_uri()!r} + "/d/r/t/-1/")
for value in (pd.DataFrame({{"a": [1, 2]}}), np.arange(5), {{"k": "v"}}):
    written = checkpoint.write_checkpoint(value, loc)
    checkpoint.read_checkpoint(loc, expected_format=written["format"], expected_digest=written["checksum"])
assert not any(m == "airflow" or m.startswith("airflow.") for m in sys.modules), "airflow imported"
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("module", [checkpoint, paths], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_format_version_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="MANIFEST_FORMAT_VERSION"):
        from airflow_ray.checkpoint import FORMAT_VERSION
    assert FORMAT_VERSION == MANIFEST_FORMAT_VERSION
