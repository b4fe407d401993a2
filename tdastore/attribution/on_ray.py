"""Scoring many test inputs on Ray: actors over input blocks x store row ranges.

Each actor holds one Attributor (task, model, fitted operator) for the job; a unit is (an input block, a range
of store rows). The actor computes the block's test gradients once (kept while its next unit has the same
block), scores the range in streamed row blocks, writes that region of the score matrix (one Zarr chunk column
per range, so writers never share a chunk) and returns the range's top-k, which the driver merges per input
block. A query of a few inputs never comes here: the Attributor answers it in process.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np
import ray
import torch

from tdastore.attribution.results import RowWindow, stream_top_k
from tdastore.index.faiss_index import merge_top_k
from tdastore.store.gradient_store import open_store
from tdastore.tasks.base import Examples


@dataclass(frozen=True)
class ScoreUnit:
    block: int  # input block number
    test_lo: int
    test_hi: int
    row_lo: int
    row_hi: int


def plan_score_units(
    m: int, n: int, input_block: int, row_chunk: int, workers: int, ranges: int | None = None
) -> list[ScoreUnit]:
    """Input blocks x row ranges: ranges are whole chunk columns of the score matrix, and there are enough
    units to keep every worker busy even when the inputs make few blocks (each range recomputes its block's
    test gradients, so ranges are split only when blocks alone cannot fill the workers)."""
    blocks = [(lo, min(lo + input_block, m)) for lo in range(0, m, input_block)]
    chunks = math.ceil(n / row_chunk)
    ranges = min(chunks, ranges or max(1, math.ceil(2 * workers / len(blocks))))
    edges = [round(chunks * r / ranges) * row_chunk for r in range(ranges + 1)]
    spans = [(edges[r], min(edges[r + 1], n)) for r in range(ranges) if edges[r] < n]
    return [ScoreUnit(b, lo, hi, r_lo, r_hi) for b, (lo, hi) in enumerate(blocks) for r_lo, r_hi in spans]


@ray.remote
class ScoringWorker:
    """A Ray actor holding an Attributor of the store (model, fitted operator); kept between calls by an
    Attributor whose Ray session outlives the call, so a second large query starts warm."""

    def __init__(self, make, root: str, method: str, sections: dict, task, threads: int):
        """make: the Attributor class (handed in: the attributor module imports this one)."""
        torch.set_num_threads(max(1, threads))
        self.attributor = make(open_store(root), method, sections, task=task)
        self.attributor.read_ahead = threads > 1  # a read-ahead thread would take a CPU Ray gave another actor
        self._block: tuple | None = None  # ((call, input block), its test side), kept for the next unit
        self._matrix: tuple | None = None  # (path, the open Zarr array)

    def run(self, unit: ScoreUnit, call: dict) -> tuple[ScoreUnit, np.ndarray, np.ndarray]:
        """call: this query's k, sign, matrix path (or None) and input blocks (object refs, resolved here)."""
        part: Examples = ray.get(call["blocks"][unit.block])
        key = (call["id"], unit.block)
        if self._block is None or self._block[0] != key:
            self._block = (key, self.attributor.test_side(part))
        blocks = self.attributor.range_blocks(self._block[1], unit.row_lo, unit.row_hi)
        window = None
        if call["matrix"] is not None:
            if self._matrix is None or self._matrix[0] != call["matrix"]:
                import zarr

                self._matrix = (call["matrix"], zarr.open_group(call["matrix"], mode="r+")["scores"])
            window = RowWindow(self._matrix[1], unit.test_lo, unit.test_hi)
        k = min(call["k"], unit.row_hi - unit.row_lo)
        scores, rows = stream_top_k(blocks, len(part), k, unit.row_hi - unit.row_lo, window, call["sign"])
        return unit, scores, rows


def score_on_ray(attributor, test: Examples, k: int, sign: float, matrix, matrix_path, task_ref, keep) -> tuple:
    """(scores [m, k], rows [m, k]) as the in-process stream gives them, computed by the attributor's `workers`
    actors (`keep`: live actors to reuse, and the list that holds them afterwards); the full matrix is written
    into `matrix` (the `scores` array of the group at matrix_path)."""
    from tdastore.distributed.pool import device_options, run_pool

    store, config, workers = attributor.store, attributor.config, attributor.workers
    input_block, row_chunk = matrix.chunks if matrix is not None else attributor.score_chunks
    ranges = 1 if attributor.exact is not None else None  # the exact path's train side is one pass over the data
    units = plan_score_units(len(test), store.n_rows, input_block, min(row_chunk, store.n_rows), workers, ranges)
    threads = attributor.threads
    options = device_options(config.device, threads, config.build.gpus_per_worker)
    sections = {section: dict(getattr(config, section).__dict__) for section in ("attribution", "index")}
    args = (type(attributor), str(store.root), attributor.method.name, sections, task_ref, threads)
    blocks = {}
    for unit in units:
        if unit.block not in blocks:
            blocks[unit.block] = ray.put(test.slice(unit.test_lo, unit.test_hi))
    call = {"id": uuid.uuid4().hex, "k": k, "sign": sign, "matrix": matrix_path, "blocks": blocks}
    results = run_pool(
        units,
        lambda: ScoringWorker.options(**options).remote(*args),
        workers=workers,
        max_retries=config.build.max_retries,
        describe=lambda u: f"score unit (inputs {u.test_lo}..{u.test_hi}, rows {u.row_lo}..{u.row_hi})",
        desc="score",
        total=len(units),
        progress=attributor.progress,
        call=lambda actor, unit: actor.run.remote(unit, call),
        keep=keep,
    )
    by_block: dict[int, list] = {}
    for unit, scores, rows in results:
        by_block.setdefault(unit.block, []).append((unit, scores, rows))
    out_scores = np.empty((len(test), k), dtype=np.float32)
    out_rows = np.empty((len(test), k), dtype=np.int64)
    for pieces in by_block.values():
        lo, hi = pieces[0][0].test_lo, pieces[0][0].test_hi
        merged, rows = merge_top_k(
            np.concatenate([sign * s for _, s, _ in pieces], 1), np.concatenate([r for _, _, r in pieces], 1), k
        )
        out_scores[lo:hi], out_rows[lo:hi] = sign * merged, rows
    return out_scores, out_rows
