"""Checkpoint write/read throughput against a plain copy of the same data to the same store.

    .venv/bin/python benchmarks/checkpoint_io.py                      # ~1 GB, file://
    .venv/bin/python benchmarks/checkpoint_io.py --target s3          # moto S3 server on loopback
    .venv/bin/python benchmarks/checkpoint_io.py --size-mb 256 --target all

Cases, each timed as ``write_checkpoint``/``read_checkpoint`` ("ours") and as the plain copy:

* DataFrame (float64/int64 columns, ``--size-mb`` in memory). Plain: ``pa.Table.from_pandas`` +
  ``pyarrow.parquet.write_table(table, path, filesystem=fs)``, and ``read_table(...).to_pandas()``.
  Ours does the same conversion, plus hashing, the round-trip check and the manifest.
* numpy float64 array (``--size-mb``). Plain: ``fs.open(path, "wb").write(arr.data)`` and
  ``fs.open(path, "rb").readinto(out)``. Ours streams ``.npy`` in blocks, hashed on the way.

Ratio = plain seconds / our seconds (1.0 = as fast as the plain copy; the target is >= 0.8).
CPU seconds (this process, all threads) are printed too: on a shared machine they are steadier
than wall-clock time.
Best of ``--repeat`` runs (3 on file, 1 on the slow moto server), ours and plain interleaved.
Timings only: nothing here asserts speed. moto serves about 30-100 MB/s and re-reads a whole
object for every ranged GET: 1 GiB on S3 takes ~3 minutes per repeat (``--size-mb 256`` for a
quick look).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_ray.checkpoint import (  # noqa: E402
    CheckpointLocation,
    delete_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

MB = 1024 * 1024


@dataclasses.dataclass
class Timing:
    """Best wall-clock and best CPU seconds (all threads of this process) over the repeats."""

    wall: float = float("inf")
    cpu: float = float("inf")

    def add(self, wall: float, cpu: float) -> None:
        self.wall = min(self.wall, wall)
        self.cpu = min(self.cpu, cpu)


# case, size in MB, ours, plain
Row = tuple[str, float, Timing, Timing]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="in-memory size of each object (MiB)")
    parser.add_argument("--target", choices=["file", "s3", "all"], default="file")
    parser.add_argument(
        "--repeat", type=int, help="runs per measurement, the best counts (default: 3 on file, 1 on s3)"
    )
    args = parser.parse_args()

    targets = ["file", "s3"] if args.target == "all" else [args.target]
    rows: list[Row] = []
    for target in targets:
        repeat = args.repeat or (3 if target == "file" else 1)
        with _store(target) as (base_uri, options):
            rows += _run_cases(target, base_uri, options, args.size_mb, repeat)
    _print_table(rows)


@contextlib.contextmanager
def _store(target: str) -> Iterator[tuple[str, dict]]:
    if target == "file":
        with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as tmp:
            yield Path(tmp).as_uri(), {}
    else:
        from tests.s3_server import moto_s3_server

        with moto_s3_server(bucket="bench") as server:
            print(f"moto S3 server at {server.endpoint_url}", flush=True)
            yield f"s3://{server.bucket}", server.storage_options()


def _run_cases(target: str, base_uri: str, options: dict, size_mb: int, repeat: int) -> list[Row]:
    import fsspec.core

    fs, base_path = fsspec.core.url_to_fs(base_uri, **options)
    if target == "file":
        fs.makedirs(f"{base_path}/plain", exist_ok=True)
    return _frame_case(target, base_uri, options, fs, base_path, size_mb, repeat) + _array_case(
        target, base_uri, options, fs, base_path, size_mb, repeat
    )


def _frame_case(
    target: str, base_uri: str, options: dict, fs: Any, base_path: str, size_mb: int, repeat: int
) -> list[Row]:
    df = _dataframe(size_mb)
    mb = df.memory_usage(index=True, deep=False).sum() / MB
    loc = CheckpointLocation(f"{base_uri}/ours/frame/", options)
    plain_path = f"{base_path}/plain/frame.parquet"

    def plain_write() -> None:
        pq.write_table(pa.Table.from_pandas(df), plain_path, filesystem=fs)

    def plain_read() -> pd.DataFrame:
        return pq.read_table(plain_path, filesystem=fs).to_pandas()

    print(f"[{target}] DataFrame {mb:.0f} MB ...", flush=True)
    write = _best_of(repeat, lambda: write_checkpoint(df, loc), plain_write)
    read = _best_of(repeat, lambda: read_checkpoint(loc), plain_read)
    pd.testing.assert_frame_equal(read_checkpoint(loc), df, check_exact=True)
    delete_checkpoint(loc.uri, options)
    fs.rm(plain_path)
    return [
        (f"{target} DataFrame write", mb, *write),
        (f"{target} DataFrame read", mb, *read),
    ]


def _array_case(
    target: str, base_uri: str, options: dict, fs: Any, base_path: str, size_mb: int, repeat: int
) -> list[Row]:
    array = np.random.default_rng(0).random(size_mb * MB // 8)
    mb = array.nbytes / MB
    loc = CheckpointLocation(f"{base_uri}/ours/array/", options)
    plain_path = f"{base_path}/plain/array.bin"

    def plain_write() -> None:
        with fs.open(plain_path, "wb") as f:
            f.write(array.data)

    def plain_read() -> np.ndarray:
        out = np.empty_like(array)
        with fs.open(plain_path, "rb") as f:
            f.readinto(memoryview(out).cast("B"))
        return out

    print(f"[{target}] ndarray {mb:.0f} MB ...", flush=True)
    write = _best_of(repeat, lambda: write_checkpoint(array, loc), plain_write)
    read = _best_of(repeat, lambda: read_checkpoint(loc), plain_read)
    np.testing.assert_array_equal(read_checkpoint(loc), array)
    np.testing.assert_array_equal(plain_read(), array)
    delete_checkpoint(loc.uri, options)
    fs.rm(plain_path)
    return [
        (f"{target} ndarray write", mb, *write),
        (f"{target} ndarray read", mb, *read),
    ]


def _dataframe(size_mb: int) -> pd.DataFrame:
    """Eight 8-byte columns: seven float64 (incompressible, like measurements) and one int64 id."""
    rows = size_mb * MB // 64
    rng = np.random.default_rng(0)
    columns = {f"x{i}": rng.random(rows) for i in range(7)}
    columns["id"] = np.arange(rows, dtype="int64")
    return pd.DataFrame(columns)


def _best_of(repeat: int, ours: Callable[[], object], plain: Callable[[], object]) -> tuple[Timing, Timing]:
    """Best times of each, alternating which goes first so neither always gets the warmer cache."""
    timings = {"ours": Timing(), "plain": Timing()}
    for i in range(repeat):
        order = [("plain", plain), ("ours", ours)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            timings[name].add(*_timed(fn))
    return timings["ours"], timings["plain"]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    gc.collect()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    del result
    return elapsed, cpu


def _print_table(rows: list[Row]) -> None:
    header = (
        f"{'case':<22} {'MB':>6} {'ours s':>8} {'plain s':>8} {'ours MB/s':>10} {'plain MB/s':>10} "
        f"{'ratio':>6} {'ours cpu s':>11} {'plain cpu s':>12}"
    )
    print()
    print(header)
    print("-" * len(header))
    for case, mb, ours, plain in rows:
        print(
            f"{case:<22} {mb:>6.0f} {ours.wall:>8.2f} {plain.wall:>8.2f} {mb / ours.wall:>10.0f} "
            f"{mb / plain.wall:>10.0f} {plain.wall / ours.wall:>6.2f} {ours.cpu:>11.2f} {plain.cpu:>12.2f}"
        )
    print("\nratio = plain s / ours s (target >= 0.8); cpu = CPU seconds of this process, all threads")


if __name__ == "__main__":
    main()
