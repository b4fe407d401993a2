"""What checking every chunk's crc32c costs on a store's streamed pass (the read every query, index build and
fit makes): the same rows in two arrays of the store's layout, one with the crc32c codec (every store written
now) and one without (stores written before), read block by block as `GradientStore.iter_blocks` reads them.

    python benchmarks/checksum_cost.py [--rows 400000] [--dim 256] [--dtype float16]

Prints the pass time of each and the ratio, per compressor (zstd is the default layout, none the worst case: no
decompression to hide the checksum behind). The best of --repeats passes each, read from the page cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from tdastore.store.checksums import checksummed, read_region
from tdastore.store.writer import _compressors


def write(path: Path, rows: np.ndarray, compressor: str, checked: bool, chunk_rows: int) -> zarr.Array:
    compressors = _compressors(compressor)
    array = zarr.create_array(
        store=str(path),
        shape=rows.shape,
        chunks=(chunk_rows, rows.shape[1]),
        dtype=rows.dtype,
        fill_value=0,
        compressors=checksummed(compressors) if checked else compressors,
    )
    array[:] = rows
    return array


def streamed_pass(array: zarr.Array, block_rows: int) -> float:
    began, total = time.perf_counter(), 0.0
    for start in range(0, array.shape[0], block_rows):
        block = read_region(array, slice(start, start + block_rows), what="bench", fix="")
        total += float(block[0, 0])  # keep the read
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32).astype(args.dtype)
    print(f"{args.rows:,} rows x {args.dim} {args.dtype} ({rows.nbytes / 2**20:.0f} MiB), chunks of {args.chunk_rows}")
    print("| compressor | without crc32c (s) | with crc32c (s) | cost |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for compressor in ("zstd", "none"):
            seconds = {}
            for checked in (False, True):
                array = write(Path(tmp) / f"{compressor}-{checked}", rows, compressor, checked, args.chunk_rows)
                seconds[checked] = min(streamed_pass(array, args.block_rows) for _ in range(args.repeats))
            cost = seconds[True] / seconds[False] - 1
            print(f"| {compressor} | {seconds[False]:.3f} | {seconds[True]:.3f} | {cost:+.1%} |")


if __name__ == "__main__":
    main()
