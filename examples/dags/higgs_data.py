"""HIGGS data for the examples: the real UCI file through Ray Data, or a synthetic stand-in.

This module sits next to the DAG files on purpose. A DAG folder is on ``sys.path`` for Airflow, so
``from higgs_data import load_higgs`` works in a DAG file exactly as it does in a notebook, and
``@ray_task`` ships the functions that use it to the Ray workers.

>>> from higgs_data import HIGGS_COLUMNS, make_synthetic_higgs
>>> df = make_synthetic_higgs(1_000, seed=0)
>>> list(df.columns) == HIGGS_COLUMNS, df.shape
(True, (1000, 29))

The real data set (`UCI HIGGS <https://archive.ics.uci.edu/dataset/280/higgs>`_, 11M rows, 2.6 GB
``HIGGS.csv.gz``) is read with :func:`load_higgs` from a local path or any fsspec URI; nothing in
the examples downloads it, so they default to :func:`make_synthetic_higgs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.data

LABEL = "label"

# The UCI column order. Names are the data set description's, in snake case (xgboost and pandas
# prefer identifiers to "jet 1 b-tag").
LOW_LEVEL_FEATURES: list[str] = [
    "lepton_pt",
    "lepton_eta",
    "lepton_phi",
    "missing_energy_magnitude",
    "missing_energy_phi",
    *(f"jet{i}_{part}" for i in range(1, 5) for part in ("pt", "eta", "phi", "btag")),
]
HIGH_LEVEL_FEATURES: list[str] = ["m_jj", "m_jjj", "m_lv", "m_jlv", "m_bb", "m_wbb", "m_wwbb"]
FEATURES: list[str] = LOW_LEVEL_FEATURES + HIGH_LEVEL_FEATURES
HIGGS_COLUMNS: list[str] = [LABEL, *FEATURES]

# One schema for both sources, so code downstream never cares where the rows came from:
# float32 features halve the memory of the file's float64 without losing anything xgboost uses.
HIGGS_DTYPES: dict[str, str] = {LABEL: "int8", **dict.fromkeys(FEATURES, "float32")}

# Sized so the whole XGBoost demo (load, split, Ray Train, evaluate) takes a few minutes on 2 cores.
DEFAULT_ROWS = 200_000


def read_higgs(
    path_or_uri: str, n_rows: int | None = None, storage_options: dict[str, Any] | None = None
) -> ray.data.Dataset:
    """Read UCI-format HIGGS CSV (no header, gzip or plain) as a lazy, distributed Ray Dataset.

    Use this when the data should stay in the cluster (e.g. ``datasets=`` of a Ray trainer);
    :func:`load_higgs` is the same read collected into one pandas DataFrame.

    :param path_or_uri: a file or a directory of files (``HIGGS.csv.gz``, ``part-*.csv.gz``), as a
        local path or any fsspec URI (``file://``, ``s3://``, ``gs://``, ``abfs://``...). One gzip
        file is one read task (gzip cannot be split): to read in parallel, store several parts.
    :param n_rows: keep only the first ``n_rows`` rows; reading stops early, so a small sample of
        the 2.6 GB file is cheap.
    :param storage_options: fsspec options for the URI's filesystem (credentials, endpoint...);
        by default fsspec's own configuration and the environment apply.
    :returns: a Dataset with :data:`HIGGS_COLUMNS`, all float32 as in the file (the label is
        0.0/1.0 here; :func:`load_higgs` casts it to int8).
    """
    import pyarrow.csv
    import ray.data

    path, filesystem = _resolve(path_or_uri, storage_options or {})
    ds = ray.data.read_csv(
        path,
        filesystem=filesystem,
        # The UCI file has no header line: name the columns ourselves and type them on read.
        read_options=pyarrow.csv.ReadOptions(column_names=HIGGS_COLUMNS),
        convert_options=pyarrow.csv.ConvertOptions(column_types=_arrow_schema()),
        # Compression is inferred from the name (".csv.gz" -> gzip); list gz so directories work.
        file_extensions=["csv", "csv.gz", "gz"],
    )
    return ds.limit(n_rows) if n_rows is not None else ds


def load_higgs(
    path_or_uri: str, n_rows: int | None = None, storage_options: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Read UCI-format HIGGS CSV with Ray Data and return it as one pandas DataFrame.

    A DataFrame rather than a Dataset because that is what notebook code (and xgboost, sklearn)
    works with, and it is what the DAG passes between tasks through the object-store XCom. Rows
    keep the file's order. See :func:`read_higgs` for the arguments.
    """
    df = read_higgs(path_or_uri, n_rows, storage_options).to_pandas()
    return df[HIGGS_COLUMNS].astype(HIGGS_DTYPES).reset_index(drop=True)


def make_synthetic_higgs(n_rows: int = DEFAULT_ROWS, seed: int = 0) -> pd.DataFrame:
    """Make a HIGGS-like data set: same columns and dtypes, a learnable but noisy signal.

    Built like the physics, so that it behaves like the real thing for a classifier:

    * low-level features are kinematics of a lepton, missing energy and four jets (log-normal
      ``pt``, ``eta`` in the detector's +-2.5, uniform ``phi``, b-tags with the file's three values);
    * high-level features are invariant masses of groups of those objects (exact functions of the
      low-level ones, as in the paper), normalized to a median of 1 and smeared by ~8 % like a
      detector would;
    * the label is drawn from a logistic model that favours resonance peaks in ``m_bb``,
      ``m_wwbb`` and ``m_jj`` plus b-tags, so ~48/52 classes and label noise that caps accuracy.

    XGBoost gets ~0.74 accuracy / ~0.82 AUC on 200k rows (real HIGGS: ~0.75 / ~0.83); low-level
    or high-level features alone do clearly worse, so the model has something to learn.
    """
    rng = np.random.default_rng(seed)

    def particle(pt_sigma: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pt = rng.lognormal(0.0, pt_sigma, n_rows)
        eta = np.clip(rng.normal(0.0, 1.0, n_rows), -2.5, 2.5)
        phi = rng.uniform(-np.pi, np.pi, n_rows)
        return pt, eta, phi

    lepton = particle()
    met_pt, met_phi = rng.lognormal(0.0, 0.6, n_rows), rng.uniform(-np.pi, np.pi, n_rows)
    neutrino = (met_pt, np.zeros(n_rows), met_phi)  # missing energy has no measured eta
    jets = [particle() for _ in range(4)]
    btags = [rng.choice([0.0, 1.0865, 2.1731], size=n_rows, p=[0.55, 0.25, 0.2]) for _ in range(4)]

    j1, j2, j3, j4 = jets
    masses = {
        "m_jj": _invariant_mass(j1, j2),
        "m_jjj": _invariant_mass(j1, j2, j3),
        "m_lv": _invariant_mass(lepton, neutrino),
        "m_jlv": _invariant_mass(j1, lepton, neutrino),
        "m_bb": _invariant_mass(j3, j4),
        "m_wbb": _invariant_mass(j3, j4, lepton, neutrino),
        "m_wwbb": _invariant_mass(j1, j2, j3, j4, lepton, neutrino),
    }
    masses = {name: m / np.median(m) for name, m in masses.items()}

    logit = 1.8 * (
        1.6 * _peak(masses["m_bb"], 1.0, 0.25)
        + 1.2 * _peak(masses["m_wwbb"], 1.0, 0.2)
        + 0.6 * _peak(masses["m_jj"], 0.9, 0.3)
        + 0.35 * (btags[2] + btags[3])
        + 0.4 * np.tanh(met_pt - 1.0)
        - 0.3 * np.abs(lepton[1])
    )
    logit += 0.1 - np.median(logit)
    label = rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))

    columns: dict[str, np.ndarray] = {
        LABEL: label,
        "lepton_pt": lepton[0],
        "lepton_eta": lepton[1],
        "lepton_phi": lepton[2],
        "missing_energy_magnitude": met_pt,
        "missing_energy_phi": met_phi,
    }
    for i, ((pt, eta, phi), btag) in enumerate(zip(jets, btags, strict=True), start=1):
        columns |= {f"jet{i}_pt": pt, f"jet{i}_eta": eta, f"jet{i}_phi": phi, f"jet{i}_btag": btag}
    # The model sees smeared masses; the label was drawn from the true ones.
    columns |= {name: m * rng.lognormal(0.0, 0.08, n_rows) for name, m in masses.items()}
    return pd.DataFrame(columns)[HIGGS_COLUMNS].astype(HIGGS_DTYPES)


def train_test(
    source: str | None = None, n_rows: int = DEFAULT_ROWS, seed: int = 0, test_fraction: float = 0.2
) -> dict[str, pd.DataFrame]:
    """HIGGS rows (the file at ``source``, else synthetic) split into ``train`` and held-out ``test``.

    Shuffled, seeded and stratified on the label: a rerun (or a retried task) sees the same split.
    """
    from sklearn.model_selection import train_test_split

    df = load_higgs(source, n_rows=n_rows) if source else make_synthetic_higgs(n_rows, seed=seed)
    train_df, test_df = train_test_split(df, test_size=test_fraction, random_state=seed, stratify=df[LABEL])
    return {"train": train_df.reset_index(drop=True), "test": test_df.reset_index(drop=True)}


def _resolve(path_or_uri: str, storage_options: dict[str, Any]) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Map a path or fsspec URI to what Ray Data reads: ``(path, pyarrow filesystem or None)``.

    Plain paths and ``file://`` need no filesystem object; other schemes go through fsspec
    (wrapped for pyarrow), so anything fsspec can open works. The wrapped filesystem is pickled
    to the read tasks with its options, so they reach the same endpoint with the same credentials.
    """
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if "://" not in path_or_uri:
        return path_or_uri, None
    fs, path = fsspec.core.url_to_fs(path_or_uri, **storage_options)
    if "file" in fs.protocol:
        return path, None
    return path, PyFileSystem(FSSpecHandler(fs))


def _arrow_schema():
    import pyarrow as pa

    # Every column, the label included, is written as a float ("1.000000000000000000e+00").
    return dict.fromkeys(HIGGS_COLUMNS, pa.float32())


def _invariant_mass(*particles: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Mass of the sum of massless four-vectors given as ``(pt, eta, phi)``."""
    energy = px = py = pz = 0.0
    for pt, eta, phi in particles:
        px = px + pt * np.cos(phi)
        py = py + pt * np.sin(phi)
        pz = pz + pt * np.sinh(eta)
        energy = energy + pt * np.cosh(eta)
    return np.sqrt(np.clip(energy**2 - px**2 - py**2 - pz**2, 0.0, None))


def _peak(x: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - center) / width) ** 2)
