"""The manifest: the small JSON file that makes a checkpoint directory a complete checkpoint.

It is written last, so a directory without one is an interrupted write. Its keys:
``format_version``, ``format`` (``parquet``/``arrow_ipc``/``npy``/``pickle``), ``data_file``,
``python_type``, ``bytes``, ``checksum``, ``rows``, ``schema`` (Arrow fields, for tables),
``dtype``/``shape`` (arrays), ``options`` (format details), ``producer`` (versions of what wrote
it, to explain a failed read years later), ``created_at`` (UTC ISO 8601).
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from .filesystem import display
from .streams import HASHES, expected_checksum

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .formats import Plan
    from .streams import Checksum

#: Version of the on-store layout and manifest; readers refuse newer versions. Version 2 replaced
#: the ``sha256`` key with ``checksum``; version 1 checkpoints stay readable.
MANIFEST_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: The data file of each format: one stable name per format, so a retry overwrites.
DATA_FILES = {
    "parquet": "data.parquet",
    "arrow_ipc": "data.arrow",
    "npy": "data.npy",
    "pickle": "data.pkl",
}
_REQUIRED_KEYS = frozenset({"format_version", "format", "data_file", "bytes"})


def new_manifest(value: Any, plan: Plan, checksum: Checksum, producer: Mapping[str, str]) -> dict[str, Any]:
    """The manifest of ``value``, just written as ``plan`` says with this ``checksum``.

    ``producer`` (from the location) joins the versions of the libraries found here.
    """
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "format": plan.format,
        "data_file": DATA_FILES[plan.format],
        "python_type": type_name(value),
        "bytes": checksum.nbytes,
        "checksum": checksum.value(),
        "rows": plan.rows,
        "schema": plan.schema,
        "dtype": plan.dtype,
        "shape": plan.shape,
        "options": plan.options,
        "producer": {**_library_versions(), **producer},
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }


def type_name(value: Any) -> str:
    """The value's type as the manifest's ``python_type`` names it (``pandas.core.frame.DataFrame``)."""
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def save_manifest(fs: AbstractFileSystem, dir_path: str, manifest: dict[str, Any]) -> None:
    with fs.open(f"{dir_path}/{MANIFEST_NAME}", "wb") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())


def load_manifest(fs: AbstractFileSystem, dir_path: str) -> dict[str, Any]:
    """The manifest of the checkpoint in ``dir_path``, checked before anyone acts on it.

    :raises CheckpointNotFoundError: no manifest (never written, or the write did not finish).
    :raises CheckpointCorruptError: not valid JSON, required keys missing, a foreign data file.
    :raises CheckpointError: written by a newer airflow-ray (format version, checksum algorithm).
    """
    path = f"{dir_path}/{MANIFEST_NAME}"
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"No checkpoint at {display(fs, dir_path)}/: {MANIFEST_NAME} is missing "
            "(never written, deleted, or the write did not finish)",
            display(fs, path),
        ) from exc
    try:
        manifest = json.loads(raw)
        missing = set(_REQUIRED_KEYS) - set(manifest)
        if "checksum" not in manifest and "sha256" not in manifest:
            missing.add("checksum")
    except (ValueError, TypeError) as exc:
        raise CheckpointCorruptError(
            f"Checkpoint manifest {display(fs, path)} is not valid JSON: {exc}", display(fs, path)
        ) from exc
    if missing:
        raise CheckpointCorruptError(
            f"Checkpoint manifest {display(fs, path)} lacks {sorted(missing)}", display(fs, path)
        )
    if manifest["data_file"] not in DATA_FILES.values():
        raise CheckpointCorruptError(
            f"Checkpoint manifest {display(fs, path)} names an unexpected data file "
            f"{manifest['data_file']!r}",
            display(fs, path),
        )
    if manifest["format_version"] > MANIFEST_FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {display(fs, path)} has format_version {manifest['format_version']}; this "
            f"airflow-ray reads up to {MANIFEST_FORMAT_VERSION}: upgrade airflow-ray where it is read",
            display(fs, path),
        )
    algorithm = expected_checksum(manifest).partition(":")[0]
    if algorithm not in HASHES:
        raise CheckpointError(
            f"Checkpoint manifest {display(fs, path)} uses checksum {algorithm!r}; this airflow-ray "
            f"knows {sorted(HASHES)}: upgrade airflow-ray where it is read",
            display(fs, path),
        )
    return manifest


def _library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that encode the data, as installed here.

    Looked up on every write (a few ms): a ``functools.cache`` wrapper would be pickled by
    reference, and this module could no longer travel to a cluster without airflow-ray.
    """
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("pyarrow", "numpy", "pandas", "cloudpickle", "ray", "fsspec"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
