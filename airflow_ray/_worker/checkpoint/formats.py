"""How a value is stored: the four formats, each chosen, written and read back here.

Formats stay readable by other tools: pandas DataFrames -> Parquet (``data.parquet``, with pandas
metadata), pyarrow Tables -> Arrow IPC file (``data.arrow``, every Arrow type round-trips),
numpy arrays -> ``.npy`` (``data.npy``), anything else -> cloudpickle (``data.pkl``). A DataFrame
that Parquet would not round-trip exactly (lists in object columns, mixed objects, ``attrs``,
complex numbers ...) falls back to cloudpickle rather than come back changed.

A :class:`Plan` writes into a :class:`~.streams.ChecksummingWriter`; a reader in :data:`READERS`
takes the data file and its manifest and returns the value, verified before it is returned.

Pickle is the one format whose reader runs code from the file, so :func:`~.io.read_checkpoint`
reads it only when its caller expects :data:`PICKLE`, and its data is checksummed with sha256:
the digest recorded in the reference then pins the exact bytes that will be unpickled (XXH3 is
fast but not collision-resistant against someone choosing the bytes).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import sys
from typing import TYPE_CHECKING, Any

from . import streams
from .errors import CheckpointCorruptError, CheckpointError
from .filesystem import display, is_local
from .streams import expected_checksum

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

# First read of an .npy file: the header (usually 128 bytes) and the start of the data.
_NPY_PREFIX_BYTES = 1024 * 1024
# Rows compared after a Parquet round trip to decide whether a DataFrame can be stored as Parquet.
_FRAME_SAMPLE_ROWS = 64

#: The format whose reader unpickles: code runs, so it is read only when expected.
PICKLE = "pickle"
#: Checksum of pickle data files: cryptographic, because these bytes become code when read. The
#: price, measured on a dict holding a 200 MB array written to a local file: 0.28 s -> 0.45 s;
#: only values no other format holds pay it.
PICKLE_CHECKSUM_ALGORITHM = "sha256"


@dataclasses.dataclass
class Plan:
    """What write_checkpoint stores for a value: format, writer and manifest details."""

    format: str
    write: Callable[[streams.ChecksummingWriter], None]
    rows: int | None = None
    schema: list[dict[str, str]] | None = None
    dtype: str | None = None
    shape: list[int] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    checksum: str = streams.CHECKSUM_ALGORITHM


def plan(value: Any) -> Plan:
    """Pick the format; the type checks look only at modules already imported, to stay cheap."""
    pandas = sys.modules.get("pandas")
    if pandas is not None and type(value) is pandas.DataFrame:
        frame_plan = _plan_dataframe(value)
        if frame_plan is not None:
            return frame_plan
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None and type(value) is pyarrow.Table:
        return _plan_arrow_table(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and type(value) in (numpy.ndarray, numpy.memmap):
        array_plan = _plan_ndarray(value)
        if array_plan is not None:
            return array_plan
    return _plan_pickle(value)


def _arrow_schema_fields(schema: Any) -> list[dict[str, str]]:
    return [{"name": field.name, "type": str(field.type)} for field in schema]


def _plan_dataframe(df: Any) -> Plan | None:
    """Parquet when the frame provably round-trips (checked on a sample), else None (pickle)."""
    import pyarrow as pa

    if df.attrs:
        log.info("Checkpointing DataFrame with cloudpickle: DataFrame.attrs is not kept by Parquet")
        return None
    try:
        table = pa.Table.from_pandas(df)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        log.info("Checkpointing DataFrame with cloudpickle: Parquet cannot hold it (%s)", exc)
        return None
    options: dict[str, Any] = {"compression": "snappy"}
    freq = getattr(df.index, "freqstr", None)
    if freq and not isinstance(df.index, sys.modules["pandas"].PeriodIndex):
        options["index_freq"] = freq
    reason = _frame_roundtrip_problem(df, table, options)
    if reason:
        log.info("Checkpointing DataFrame with cloudpickle: Parquet would not round-trip it (%s)", reason)
        return None

    def write(sink: streams.ChecksummingWriter) -> None:
        import pyarrow.parquet as pq

        pq.write_table(table, sink, compression="snappy")

    return Plan(
        format="parquet",
        write=write,
        rows=len(df),
        schema=_arrow_schema_fields(table.schema),
        shape=list(df.shape),
        options=options,
    )


def _frame_roundtrip_problem(df: Any, table: Any, options: dict[str, Any]) -> str | None:
    """Why Parquet would change this frame, judged on its first rows; None when it would not.

    Dtype-level changes (object -> float, lost index freq, ...) show on any sample; value-level
    ones (lists coming back as arrays, None as NaN) show on rows that hold them. Whole columns of
    genuinely mixed objects already failed the Arrow conversion.
    """
    import pandas as pd

    sample = df.iloc[:_FRAME_SAMPLE_ROWS]
    back = _table_to_frame(table.slice(0, len(sample)), options)
    if isinstance(df.index, pd.RangeIndex):
        # A slice loses the RangeIndex metadata; the full table keeps start/stop/step exactly.
        back.index = sample.index
    try:
        pd.testing.assert_frame_equal(back, sample, check_exact=True, check_freq=True, check_flags=True)
    except AssertionError as exc:
        return " ".join(str(exc).split())[:200]
    for name in range(sample.shape[1]):
        if str(sample.dtypes.iloc[name]) == "object" and not _same_types(
            sample.iloc[:, name], back.iloc[:, name]
        ):
            return f"object column {sample.columns[name]!r} changes element types"
    for level in range(sample.index.nlevels):
        original = sample.index.get_level_values(level)
        if str(original.dtype) == "object" and not _same_types(original, back.index.get_level_values(level)):
            return "object index changes element types"
    return None


def _same_types(left: Any, right: Any) -> bool:
    return all(type(a) is type(b) for a, b in zip(left, right, strict=True))


def _table_to_frame(table: Any, options: dict[str, Any]) -> Any:
    frame = table.to_pandas()
    freq = options.get("index_freq")
    if freq:
        frame.index = type(frame.index)(frame.index, freq=freq)
    return frame


def _plan_arrow_table(table: Any) -> Plan:
    import pyarrow as pa

    def write(sink: streams.ChecksummingWriter) -> None:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    return Plan(
        format="arrow_ipc",
        write=write,
        rows=table.num_rows,
        schema=_arrow_schema_fields(table.schema),
        shape=[table.num_rows, table.num_columns],
    )


def _plan_ndarray(array: Any) -> Plan | None:
    """``.npy`` for arrays without Python objects; header built up front so failures fall back."""

    import numpy as np

    if array.dtype.hasobject or array.dtype.itemsize == 0:
        return None
    header_fields = np.lib.format.header_data_from_array_1_0(array)
    header = io.BytesIO()
    try:
        try:
            np.lib.format.write_array_header_1_0(header, header_fields)
        except ValueError:
            header = io.BytesIO()
            np.lib.format.write_array_header_2_0(header, header_fields)
    except (ValueError, UnicodeEncodeError):
        return None
    header_bytes = header.getvalue()

    def write(sink: streams.ChecksummingWriter) -> None:
        sink.write(header_bytes)
        for block in _ndarray_blocks(array, header_fields["fortran_order"]):
            sink.write(block)

    return Plan(
        format="npy",
        write=write,
        rows=int(array.shape[0]) if array.ndim else None,
        dtype=str(array.dtype),
        shape=[int(n) for n in array.shape],
        options={"fortran_order": bool(header_fields["fortran_order"])},
    )


def _ndarray_blocks(array: Any, fortran_order: bool) -> Iterator[memoryview]:
    """The array's bytes in ``.npy`` order, in blocks of about BLOCK_SIZE, copying only if strided."""
    import numpy as np

    if array.size == 0:
        return
    if array.flags.c_contiguous or (fortran_order and array.flags.f_contiguous):
        flat = memoryview(array.ravel(order="A").view(np.uint8))
        for start in range(0, flat.nbytes, streams.BLOCK_SIZE):
            yield flat[start : start + streams.BLOCK_SIZE]
        return
    row_bytes = array[:1].nbytes or 1
    rows_per_block = max(1, streams.BLOCK_SIZE // row_bytes)
    for start in range(0, array.shape[0], rows_per_block):
        block = np.ascontiguousarray(array[start : start + rows_per_block])
        yield memoryview(block.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy arrays are buffers


def _plan_pickle(value: Any) -> Plan:
    pickler_name, pickler = _cloudpickle()

    def write(sink: streams.ChecksummingWriter) -> None:
        pickler.dump(value, sink, protocol=5)

    # len() only of builtin containers: on arbitrary objects it may be costly or lazy.
    rows = len(value) if isinstance(value, list | tuple | dict | set | frozenset) else None
    return Plan(
        format=PICKLE,
        write=write,
        rows=rows,
        options={"pickler": pickler_name, "protocol": 5},
        checksum=PICKLE_CHECKSUM_ALGORITHM,
    )


def _cloudpickle() -> tuple[str, Any]:
    """Ray's vendored cloudpickle (what Ray itself uses on the worker), else cloudpickle."""
    try:
        from ray import cloudpickle
    except ImportError:
        import cloudpickle  # type: ignore[no-redef]

        return "cloudpickle", cloudpickle
    return "ray.cloudpickle", cloudpickle


def _read_parquet(fs: AbstractFileSystem, path: str, manifest: dict[str, Any]) -> Any:
    """Parquet back to the DataFrame, decoded from the verified bytes in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = _read_verified(fs, path, manifest, pa.allocate_buffer)
    try:
        table = pq.read_table(pa.BufferReader(buffer))
    except (pa.ArrowException, ValueError, TypeError, OSError) as exc:
        raise CheckpointCorruptError(
            f"Checkpoint data file {display(fs, path)} is not readable Parquet: {exc}", display(fs, path)
        ) from exc
    del buffer
    return _table_to_frame(table, manifest.get("options") or {})


def _read_arrow_ipc(fs: AbstractFileSystem, path: str, manifest: dict[str, Any]) -> Any:
    import pyarrow as pa

    buffer = _read_verified(fs, path, manifest, pa.allocate_buffer)
    try:
        return pa.ipc.open_file(buffer).read_all()  # zero-copy views into the verified buffer
    except (pa.ArrowException, ValueError) as exc:
        raise CheckpointCorruptError(
            f"Checkpoint data file {display(fs, path)} is not a readable Arrow IPC file: {exc}",
            display(fs, path),
        ) from exc


def _read_npy(fs: AbstractFileSystem, path: str, manifest: dict[str, Any]) -> Any:
    """Header parsed, then the bytes read straight into the destination array: no second copy.

    The header comes from one prefix read, data bytes in it go to the array too: on object stores
    that prefix is a whole read block, so a small array costs one GET, not one per header field.
    """
    import numpy as np

    size, expected = manifest["bytes"], expected_checksum(manifest)
    checksum = streams.Checksum.like(expected)
    with streams.open_for_reading(fs, path) as raw:
        first_read = _NPY_PREFIX_BYTES if is_local(fs) else streams.read_block_size(fs)
        prefix = raw.read(min(size, first_read))
        try:
            header_size = _npy_header_size(prefix)
            if header_size > len(prefix):
                prefix += raw.read(header_size - len(prefix))
            header = io.BytesIO(prefix[:header_size])
            version = np.lib.format.read_magic(header)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(header, max_header_size=header_size)
        except (ValueError, SyntaxError, EOFError) as exc:
            raise CheckpointCorruptError(
                f"Checkpoint data file {display(fs, path)} has an invalid .npy header: {exc}",
                display(fs, path),
            ) from exc
        checksum.update(memoryview(prefix))
        array = np.empty(shape, dtype=dtype, order="F" if fortran_order else "C")
        if array.nbytes != size - header_size:
            raise CheckpointCorruptError(
                f"Checkpoint data file {display(fs, path)} is truncated or altered: header says "
                f"{array.nbytes} data bytes, file holds {size - header_size}",
                display(fs, path),
            )
        if array.nbytes:
            target = memoryview(array.ravel(order="A").view(np.uint8))  # type: ignore[arg-type]
            head = len(prefix) - header_size
            target[:head] = memoryview(prefix)[header_size:]
            streams.read_exact(raw, target[head:], checksum, streams.read_block_size(fs))
    streams.verify(fs, path, checksum, size=size, expected=expected)
    return array


def _npy_header_size(prefix: bytes) -> int:
    """Total header length of an ``.npy`` file from its first bytes (magic, version, length)."""
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file (bad magic)")
    if prefix[6] == 1:
        return 10 + int.from_bytes(prefix[8:10], "little")
    if len(prefix) < 12:
        raise ValueError("truncated .npy header")
    return 12 + int.from_bytes(prefix[8:12], "little")


def _read_pickle(fs: AbstractFileSystem, path: str, manifest: dict[str, Any]) -> Any:
    import pickle

    buffer = _read_verified(fs, path, manifest, bytearray)
    try:
        return pickle.loads(buffer)
    except (ImportError, AttributeError) as exc:
        # The bytes are intact (checksum passed): this process lacks a module or class it needs.
        raise CheckpointError(
            f"Checkpoint {display(fs, path)} needs code that is not importable here: {exc}",
            display(fs, path),
        ) from exc
    except Exception as exc:
        raise CheckpointCorruptError(
            f"Checkpoint data file {display(fs, path)} could not be unpickled: {type(exc).__name__}: {exc}",
            display(fs, path),
        ) from exc


def _read_verified(
    fs: AbstractFileSystem, path: str, manifest: dict[str, Any], allocate: Callable[[int], Any]
) -> Any:
    return streams.read_verified(
        fs, path, size=manifest["bytes"], expected=expected_checksum(manifest), allocate=allocate
    )


#: Format name (the manifest's ``format``) -> reader of that format's data file.
READERS: dict[str, Callable[[Any, str, dict[str, Any]], Any]] = {
    "parquet": _read_parquet,
    "arrow_ipc": _read_arrow_ipc,
    "npy": _read_npy,
    PICKLE: _read_pickle,
}
