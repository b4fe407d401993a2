"""A function over a store's rows as Ray tasks: each task reads one chunk-aligned row range from the store's
location and applies the function block by block; the driver gets the results in row order.

Fitting passes over the store (the EK-FAC eigenvalue correction) take this as FitInputs.map_blocks, so a big
store is read by the cluster's nodes instead of the driver alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ray
import torch

from tdastore.distributed.pool import get_alive
from tdastore.distributed.ray_session import ray_session
from tdastore.store.gradient_store import open_store


@ray.remote
def _apply_to_rows(fn: Callable, root: str, start: int, stop: int, block_rows: int, threads: int) -> list:
    torch.set_num_threads(threads)
    store = open_store(root)
    return [fn(store.read_rows(lo, min(lo + block_rows, stop))) for lo in range(start, stop, block_rows)]


def row_ranges(n_rows: int, chunk_rows: int, parts: int) -> list[tuple[int, int]]:
    """About `parts` ranges of whole chunks covering [0, n_rows)."""
    chunks = math.ceil(n_rows / chunk_rows)
    parts = max(1, min(parts, chunks))
    edges = [round(chunks * p / parts) * chunk_rows for p in range(parts + 1)]
    return [(edges[p], min(edges[p + 1], n_rows)) for p in range(parts) if edges[p] < n_rows]


def ray_block_map(store, workers: int, threads: int = 1, address: str | None = None, block_rows: int = 8192):
    """map_blocks(fn) -> [fn(rows [b, k] float32) for every block of the store, in row order], run as about
    4 x workers Ray tasks (each `threads` CPUs) over chunk-aligned row ranges."""

    def map_blocks(fn: Callable) -> list:
        chunk = store.grads.chunks[0]
        step = max(chunk, block_rows // chunk * chunk)
        with ray_session(address, num_cpus=max(2, workers * threads)):
            fn_ref = ray.put(fn)
            refs = [
                _apply_to_rows.options(num_cpus=threads).remote(fn_ref, str(store.root), lo, hi, step, threads)
                for lo, hi in row_ranges(store.n_rows, chunk, 4 * workers)
            ]
            return [result for part in get_alive(refs) for result in part]

    return map_blocks
