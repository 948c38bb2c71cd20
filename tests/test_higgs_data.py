"""HIGGS data: the UCI-format loader (through Ray Data) and the synthetic generator."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import connected_or_private_ray
from tests.s3_server import S3Server, moto_s3_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "dags"))
from higgs_data import (
    FEATURES,
    HIGGS_COLUMNS,
    HIGGS_DTYPES,
    HIGH_LEVEL_FEATURES,
    LABEL,
    LOW_LEVEL_FEATURES,
    load_higgs,
    make_synthetic_higgs,
)


@pytest.fixture(scope="module")
def ray_cluster():
    """The Ray this process is already connected to (the suite's head), else a private 2-CPU one.

    ``address="local"`` starts a new cluster: never join one someone else started on this machine.
    """
    yield from connected_or_private_ray()


def _write_uci(path: Path, frame: pd.DataFrame) -> None:
    """Write rows the way the UCI file has them: no header, every value a float in %.18e."""
    with gzip.open(path, "wt") as out:
        for row in frame.to_numpy(dtype=np.float64):
            out.write(",".join(f"{value:.18e}" for value in row) + "\n")


@pytest.fixture(scope="module")
def s3() -> S3Server:
    with moto_s3_server(bucket="higgs") as server:
        yield server


@pytest.fixture(scope="module")
def uci_rows() -> pd.DataFrame:
    return make_synthetic_higgs(500, seed=7)


@pytest.fixture(scope="module")
def uci_file(tmp_path_factory, uci_rows) -> Path:
    path = tmp_path_factory.mktemp("higgs") / "HIGGS.csv.gz"
    _write_uci(path, uci_rows)
    return path


def test_columns_are_the_uci_ones():
    assert len(HIGGS_COLUMNS) == 29
    assert HIGGS_COLUMNS[0] == LABEL
    assert len(LOW_LEVEL_FEATURES) == 21 and len(HIGH_LEVEL_FEATURES) == 7
    assert HIGGS_COLUMNS[1:6] == [
        "lepton_pt",
        "lepton_eta",
        "lepton_phi",
        "missing_energy_magnitude",
        "missing_energy_phi",
    ]
    assert HIGGS_COLUMNS[-7:] == ["m_jj", "m_jjj", "m_lv", "m_jlv", "m_bb", "m_wbb", "m_wwbb"]


def test_uci_file_is_really_in_the_uci_format(uci_file):
    with gzip.open(uci_file, "rt") as lines:
        first_line = lines.readline().strip()
    values = first_line.split(",")
    assert len(values) == 29 and values[0] in ("0.000000000000000000e+00", "1.000000000000000000e+00")


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_load_higgs_reads_the_gz_file(uci_file, uci_rows, as_uri):
    df = load_higgs(uci_file.as_uri() if as_uri else str(uci_file))

    assert list(df.columns) == HIGGS_COLUMNS
    assert df.dtypes.astype(str).to_dict() == HIGGS_DTYPES
    pd.testing.assert_frame_equal(df, uci_rows, check_exact=False, rtol=1e-6)


@pytest.mark.usefixtures("ray_cluster")
def test_load_higgs_n_rows_and_directory_of_parts(tmp_path, uci_rows):
    for i, part in enumerate(np.array_split(np.arange(len(uci_rows)), 3)):
        _write_uci(tmp_path / f"part-{i}.csv.gz", uci_rows.iloc[part])

    df = load_higgs(str(tmp_path))
    assert len(df) == len(uci_rows)
    assert sorted(df["lepton_pt"].round(5)) == sorted(uci_rows["lepton_pt"].round(5))

    assert len(load_higgs(str(tmp_path), n_rows=120)) == 120


@pytest.mark.usefixtures("ray_cluster")
def test_load_higgs_from_s3(s3, uci_file, uci_rows):
    """Any fsspec URI: here S3 on a real S3-compatible server (moto), credentials passed explicitly."""
    key = "higgs/HIGGS.csv.gz"
    s3.boto3_client().upload_file(str(uci_file), s3.bucket, key)

    df = load_higgs(f"s3://{s3.bucket}/{key}", n_rows=100, storage_options=s3.storage_options())

    pd.testing.assert_frame_equal(df, uci_rows.head(100), check_exact=False, rtol=1e-6)


def test_synthetic_schema_and_determinism():
    a = make_synthetic_higgs(2_000, seed=1)
    assert list(a.columns) == HIGGS_COLUMNS
    assert a.dtypes.astype(str).to_dict() == HIGGS_DTYPES
    assert not a.isna().any().any()
    pd.testing.assert_frame_equal(a, make_synthetic_higgs(2_000, seed=1))
    assert not a.equals(make_synthetic_higgs(2_000, seed=2))
    # Physical ranges like the real file: |eta| within the detector, phi an angle, pt positive.
    assert a.filter(like="_eta").abs().max().max() <= 2.5
    assert a.filter(like="_phi").abs().max().max() <= np.pi
    assert (a.filter(like="_pt") > 0).all().all()
    assert set(np.unique(a.filter(like="_btag"))) <= {0.0, np.float32(1.0865), np.float32(2.1731)}
    assert 0.45 < a[LABEL].mean() < 0.6


def test_synthetic_signal_is_learnable_and_needs_both_feature_groups():
    """XGBoost gets real-HIGGS-like accuracy, and only with low- and high-level features together."""
    import xgboost
    from sklearn.metrics import accuracy_score

    df = make_synthetic_higgs(60_000, seed=3)
    train, test = df.iloc[:45_000], df.iloc[45_000:]

    def accuracy(columns: list[str]) -> float:
        booster = xgboost.train(
            {"objective": "binary:logistic", "max_depth": 6, "eta": 0.1, "nthread": 2},
            xgboost.DMatrix(train[columns], label=train[LABEL]),
            num_boost_round=80,
        )
        return accuracy_score(test[LABEL], booster.predict(xgboost.DMatrix(test[columns])) > 0.5)

    both = accuracy(FEATURES)
    assert 0.70 < both < 0.80
    assert accuracy(LOW_LEVEL_FEATURES) < both - 0.02
    assert accuracy(HIGH_LEVEL_FEATURES) < both - 0.02
