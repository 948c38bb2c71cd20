"""Writing, reading, listing and deleting checkpoints: what runs on a Ray worker next to the data.

A 1 GB output never passes through the Airflow process: the Airflow side resolves a
:class:`~.paths.CheckpointLocation` and sends these functions to a worker with it. They need
fsspec (plus s3fs/gcsfs for those stores), pyarrow, numpy/pandas for those types, and nothing
from Airflow; the package imports only the standard library at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from . import streams
from .errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError, translate_timeouts
from .filesystem import display, is_local, modified_at, open_fs, remove_quietly, remove_tree, subdirectories
from .formats import PICKLE, READERS, plan
from .manifest import DATA_FILES, MANIFEST_NAME, load_manifest, new_manifest, save_manifest, type_name
from .marker import claim_base
from .paths import CheckpointLocation, normalize_base, run_uri
from .streams import expected_checksum

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from fsspec import AbstractFileSystem

T = TypeVar("T")


@translate_timeouts("Writing the checkpoint", "location")
def write_checkpoint(
    value: Any,
    location: CheckpointLocation,
    *,
    blocks: bool = False,
    allow_pickle: bool = True,
    deployment: str | None = None,
) -> dict[str, Any]:
    """Write ``value`` as a checkpoint at ``location`` and return its manifest.

    With ``blocks``, ``value`` is a Ray Data dataset as the owner holds it (a list of ObjectRefs
    to Arrow tables): it is written as one table, and restored as a one-block dataset. Without
    ``allow_pickle`` a value that only pickle can hold is refused before anything is written.
    The manifest's ``format`` and ``checksum`` are what a reader passes back to
    :func:`read_checkpoint` as ``expected_format`` / ``expected_digest``. With ``deployment`` (an
    Airflow deployment id), the write first claims ``location.base`` for that deployment
    (:func:`.marker.claim_base`): the first write leaves the marker that lets ``airflow-ray gc``
    expire checkpoints there, and a base another deployment claimed is refused before anything
    is written (:class:`~.errors.CheckpointBaseError`).

    The data streams to the store in large blocks and is checksummed on the way, so a 1 GB output
    is never copied whole in memory nor read back. Order makes it safe to retry: the old manifest
    is removed first, the data file written under its stable name, any data file of another
    format left by an earlier attempt removed, and ``manifest.json`` written last. A checkpoint
    without a manifest is incomplete and reads as not found. Returns once every file is closed
    (uploads completed); local files are not fsync-ed. The manifest's keys are listed in
    :mod:`.manifest`; its ``producer`` adds ``location.producer`` to the library versions.
    """
    if blocks:
        import pyarrow as pa
        import ray

        value = pa.concat_tables(ray.get(list(value)))
    if deployment is not None:
        if location.base is None:
            raise ValueError(
                f"Cannot claim the base of {location.uri} for {deployment!r}: location.base is unset"
            )
        claim_base(location.base, location.storage_options, deployment)
    fs, dir_path = open_fs(location.uri, location.storage_options)
    value_plan = plan(value)
    if value_plan.format == PICKLE and not allow_pickle:
        raise CheckpointError(_PICKLE_FORBIDDEN.format(type=type_name(value), uri=location.uri), location.uri)
    data_name = DATA_FILES[value_plan.format]
    data_path = f"{dir_path}/{data_name}"

    if is_local(fs):
        fs.makedirs(dir_path, exist_ok=True)
    remove_quietly(fs, f"{dir_path}/{MANIFEST_NAME}")

    checksum = streams.Checksum(value_plan.checksum)
    try:
        with fs.open(data_path, "wb", block_size=streams.BLOCK_SIZE) as raw:
            value_plan.write(streams.ChecksummingWriter(raw, checksum))
    except BaseException:
        # Closing the file committed whatever was written (an object store upload completes on
        # close): drop it, so a failed attempt leaves nothing behind but the directory.
        with contextlib.suppress(Exception):
            fs.rm_file(data_path)
        raise

    _remove_stale_data_files(fs, dir_path, keep=data_name)
    manifest = new_manifest(value, value_plan, checksum, location.producer)
    save_manifest(fs, dir_path, manifest)
    return manifest


@translate_timeouts("Reading the manifest of", "location_or_uri")
def read_manifest(
    location_or_uri: CheckpointLocation | str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return a checkpoint's manifest without reading its data.

    :raises CheckpointNotFoundError: no manifest (never written, or the write did not finish).
    :raises CheckpointCorruptError: the manifest is not valid JSON or lacks required keys.
    """
    uri, options = _uri_and_options(location_or_uri, storage_options)
    fs, dir_path = open_fs(uri, options)
    return load_manifest(fs, dir_path)


@translate_timeouts("Checking the manifest of", "location_or_uri")
def check_manifest(
    location_or_uri: CheckpointLocation | str,
    storage_options: dict[str, Any] | None = None,
    *,
    expected_format: str | None,
    expected_digest: str | None,
) -> dict[str, Any]:
    """Return a checkpoint's manifest if it is the one its writer recorded, without reading data.

    The check :func:`read_checkpoint` makes before it reads (what the UI shows as "verified");
    the data's own checksum is only computed by a read.

    :raises CheckpointNotFoundError: no manifest at the location.
    :raises CheckpointMismatchError: the manifest disagrees with the expected format or digest.
    :raises CheckpointCorruptError: the manifest is not valid JSON or lacks required keys.
    """
    uri, options = _uri_and_options(location_or_uri, storage_options)
    fs, dir_path = open_fs(uri, options)
    manifest = load_manifest(fs, dir_path)
    _check_expected(
        display(fs, dir_path) + "/", manifest, expected_format or manifest["format"], expected_digest
    )
    return manifest


@translate_timeouts("Reading the checkpoint", "location_or_uri")
def read_checkpoint(
    location_or_uri: CheckpointLocation | str,
    storage_options: dict[str, Any] | None = None,
    *,
    expected_format: str | None = None,
    expected_digest: str | None = None,
) -> Any:
    """Read a checkpoint back into the value that was written.

    The manifest is a file anyone who can write the store can rewrite, so it does not choose the
    reader on its own: given ``expected_format`` / ``expected_digest`` (the manifest's ``format``
    and ``checksum`` as :func:`write_checkpoint` returned them, kept by the caller), a manifest
    that disagrees is refused before any data is read. A pickle checkpoint is read only when
    ``expected_format`` is ``"pickle"``: unpickling runs code chosen by whoever wrote the file.

    Every byte is checked against the manifest's size and checksum before anything is returned.
    The data file is read once, in large blocks, into the buffer the value will live in: Parquet,
    Arrow IPC and pickle data are verified before they are parsed, an ``.npy`` file is read
    straight into the destination array. ``storage_options`` overrides those of a
    :class:`CheckpointLocation`.

    :raises CheckpointNotFoundError: no manifest at the location.
    :raises CheckpointMismatchError: the manifest disagrees with the expected format or digest,
        or says pickle when pickle is not expected; names the checkpoint and both values.
    :raises CheckpointCorruptError: truncated, altered or unparsable data; names the file.
    """
    uri, options = _uri_and_options(location_or_uri, storage_options)
    fs, dir_path = open_fs(uri, options)
    manifest = load_manifest(fs, dir_path)
    _check_expected(display(fs, dir_path) + "/", manifest, expected_format, expected_digest)
    data_path = f"{dir_path}/{manifest['data_file']}"
    reader = READERS.get(manifest["format"])
    if reader is None:
        raise CheckpointCorruptError(
            f"Checkpoint {display(fs, data_path)} has unknown format {manifest['format']!r}",
            display(fs, data_path),
        )
    try:
        size = fs.size(data_path)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(
            f"Checkpoint data file {display(fs, data_path)} is missing although its manifest exists",
            display(fs, data_path),
        ) from exc
    if size != manifest["bytes"]:
        raise CheckpointCorruptError(
            f"Checkpoint data file {display(fs, data_path)} is truncated or altered: "
            f"{size} bytes, manifest says {manifest['bytes']}",
            display(fs, data_path),
        )
    return reader(fs, data_path, manifest)


@translate_timeouts("Deleting the checkpoint", "uri")
def delete_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete one checkpoint directory, or a directory of them; a missing one is not an error.

    The manifest goes first, so an interrupted delete leaves a checkpoint that reads as not found
    rather than one that reads as corrupt.
    """
    fs, dir_path = open_fs(uri, storage_options or {})
    remove_quietly(fs, f"{dir_path}/{MANIFEST_NAME}")
    remove_tree(fs, dir_path)


@translate_timeouts("Deleting the run checkpoints under", "base_uri")
def delete_run_checkpoints(
    base_uri: str, dag_id: str, run_id: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Delete every checkpoint of one DAG run under ``base_uri`` (retention, run deletion)."""
    fs, run_path = open_fs(run_uri(base_uri, dag_id, run_id), storage_options or {})
    remove_tree(fs, run_path)


@dataclasses.dataclass(frozen=True)
class RunCheckpoints:
    """One DAG run's checkpoint directory, ``<base>/<dag>/<run>/``, as found on the store.

    ``dag`` and ``run`` are directory names, which spell ids as :func:`.paths.path_component` does.
    """

    uri: str
    dag: str
    run: str
    newest_written: datetime.datetime | None
    """When anything below it was last written: the newest modification time of its files and
    directories, so a checkpoint still being written (no manifest yet) counts as just written.
    None only when the store reports no time for any of them."""


def list_run_checkpoints(
    base_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    on_error: Callable[[str, Exception], None] | None = None,
) -> Iterator[RunCheckpoints]:
    """Every run directory under ``base_uri`` with when it was last written (retention).

    A directory that cannot be read (a permission error, a flaky store) goes to
    ``on_error(uri, exception)`` and is skipped, as :func:`os.walk` does, so one bad run does not
    hide the others; without ``on_error`` the error is raised. A directory whose files change
    while it is listed (a file vanishes between listing and ``stat``) is being written or deleted
    right now: it is skipped quietly, not judged.
    """
    fs, root = open_fs(base_uri, storage_options or {})
    fs.invalidate_cache(root)  # a long-lived process lists the same base again later
    base = normalize_base(base_uri)

    def reading(uri: str, read: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        try:
            return read(*args, **kwargs)
        except FileNotFoundError:  # it changed while listed: a retry's write, a concurrent delete
            return None
        except Exception as exc:
            if on_error is None:
                raise
            on_error(uri, exc)
            return None

    for dag_path in subdirectories(fs, root):
        dag = dag_path.rsplit("/", 1)[-1]
        for run_path in reading(f"{base}/{dag}/", subdirectories, fs, dag_path) or []:
            run = run_path.rsplit("/", 1)[-1]
            uri = f"{base}/{dag}/{run}/"
            found = reading(uri, fs.find, run_path, withdirs=True, detail=True)
            if found is None:
                continue
            times = [t for info in found.values() if (t := modified_at(info)) is not None]
            yield RunCheckpoints(uri, dag, run, max(times, default=None))


_PICKLE_FORBIDDEN = (
    "Cannot checkpoint a {type} to {uri}: only pickle can hold it, and pickle checkpoints are "
    "forbidden here ([ray] checkpoint_allow_pickle = False; env AIRFLOW__RAY__CHECKPOINT_ALLOW_PICKLE). "
    "Without pickle a checkpoint holds a pandas DataFrame that Parquet round-trips exactly (Parquet), "
    "a pyarrow Table (Arrow IPC) or a numpy array without Python objects (.npy): return one of "
    "those, turn checkpoint off for this task, or allow pickle checkpoints."
)


def _check_expected(
    uri: str, manifest: dict[str, Any], expected_format: str | None, expected_digest: str | None
) -> None:
    """Refuse a manifest that is not the one the caller expects (see :func:`read_checkpoint`)."""
    found_format, found_digest = manifest["format"], expected_checksum(manifest)
    if expected_format is None and found_format == PICKLE:
        raise CheckpointMismatchError(
            f"Checkpoint {uri} is a pickle checkpoint and its reader does not expect one: unpickling "
            "runs code chosen by whoever wrote the file, so its data is not read. Pass "
            f"expected_format={PICKLE!r} only for a checkpoint whose writer you trust.",
            uri,
        )
    if expected_format is not None and found_format != expected_format:
        problem = f"format {found_format!r}, expected {expected_format!r}"
    elif expected_digest is not None and found_digest != expected_digest:
        problem = f"digest {found_digest!r}, expected {expected_digest!r}"
    else:
        return
    raise CheckpointMismatchError(
        f"Checkpoint {uri} is not the one that was written: its manifest says {problem}. It was "
        "rewritten after the write its reader recorded, so its data is not read: re-run the task "
        "that wrote it, and check who else can write to this location.",
        uri,
    )


def _uri_and_options(
    location_or_uri: CheckpointLocation | str, storage_options: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    if isinstance(location_or_uri, CheckpointLocation):
        options = location_or_uri.storage_options if storage_options is None else storage_options
        return location_or_uri.uri, options
    return location_or_uri, storage_options or {}


def _remove_stale_data_files(fs: AbstractFileSystem, dir_path: str, keep: str) -> None:
    """Remove data files another format left behind, so a retry leaves one set of files."""
    fs.invalidate_cache(dir_path)
    for entry in fs.ls(dir_path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("data.") and name != keep:
            remove_quietly(fs, entry)
