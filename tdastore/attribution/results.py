"""What an attribution answers with: a running top-k over streamed score blocks, the optional full score
matrix (Zarr), and the result table (ids, ranks, scores, and the documents' text for text stores)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from tdastore.errors import StoreError
from tdastore.index.faiss_index import merge_top_k
from tdastore.store.checksums import checksummed, read_region
from tdastore.tasks.base import Examples


def stream_top_k(
    blocks: Iterable[tuple[int, torch.Tensor]],
    m: int,
    k: int,
    n: int,
    matrix=None,
    sign: float = 1.0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k of sign x scores over blocks [m, b] (sign -1: the most negative); every block is also
    written into `matrix` ([m, n] Zarr) when given. Returns (scores [m, k] in the blocks' sign, rows [m, k])."""
    best_scores = np.full((m, 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((m, 0), dtype=np.int64)
    bar = tqdm(total=n, desc="score", unit="row", disable=not progress)
    for start, block in blocks:
        block = torch.as_tensor(block)  # [m, b]
        if matrix is not None:
            matrix[:, start : start + block.shape[1]] = block.numpy()
        values, part = torch.topk(block if sign > 0 else -block, min(k, block.shape[1]), dim=1)
        best_scores = np.concatenate([best_scores, values.numpy()], 1)
        best_rows = np.concatenate([best_rows, part.numpy() + start], 1)
        best_scores, best_rows = merge_top_k(best_scores, best_rows, k)
        bar.update(block.shape[1])
    bar.close()
    return sign * best_scores, best_rows


def create_scores_array(path, test_ids: np.ndarray, train_ids: np.ndarray, chunks: tuple[int, int] | None = None):
    """A new Zarr group for the full score matrix, returned as its `scores` array [m, n] float32 (dimensions
    test x train) beside the coordinates `test_id` [m] and `train_id` [n] (the example ids, so the matrix
    describes itself; xarray reads it with `open_zarr`). An existing path is never overwritten."""
    import zarr
    from zarr.codecs import ZstdCodec

    path = Path(path)
    if path.exists():
        raise StoreError(f"--scores-out '{path}' exists: choose a new path (nothing was overwritten)")
    m, n = len(test_ids), len(train_ids)
    group = zarr.open_group(str(path), mode="w-")
    checked = checksummed([ZstdCodec(level=0)])  # every chunk's crc32c is checked when it is read
    for name, ids, dim in (("test_id", test_ids, "test"), ("train_id", train_ids, "train")):
        group.create_array(name, data=np.asarray(ids, dtype=np.int64), dimension_names=(dim,), compressors=checked)
    chunks = chunks or (min(m, 256), min(n, 8192))
    return group.create_array(
        "scores",
        shape=(m, n),
        chunks=chunks,
        dtype="float32",
        dimension_names=("test", "train"),
        fill_value=np.nan,
        compressors=checked,
    )


def open_scores(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [m, n], test ids [m], train ids [n]) of a score matrix written with --scores-out."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    what, fix = f"score matrix '{path}'", "recompute it with `tdastore query ... --scores-out NEW_PATH`"
    names = ("scores", "test_id", "train_id")
    return tuple(read_region(group[name], slice(None), what=what, fix=fix) for name in names)


class RowWindow:
    """Rows [lo, hi) of a [m, n] array, written as if they were the whole array (one worker's input block)."""

    def __init__(self, array, lo: int, hi: int):
        self.array, self.lo, self.hi = array, lo, hi

    def __setitem__(self, key, value) -> None:
        _, columns = key
        self.array[self.lo : self.hi, columns] = value


def result_table(store, test: Examples, scores: np.ndarray, rows: np.ndarray, info: dict) -> pa.Table:
    """One row per (test input, rank): test_id, rank, train_id, score, train_row (+ train_text, test_text)."""
    m, k = scores.shape
    train_ids = store.train_ids
    table = pa.table(
        {
            "test_id": np.repeat(test.ids, k),
            "rank": np.tile(np.arange(1, k + 1), m),
            "train_id": train_ids[rows.reshape(-1)],
            "score": scores.reshape(-1).astype(np.float32),
            "train_row": rows.reshape(-1),
        }
    )
    if "text" in store.meta_columns:  # text stores: the documents themselves, beside their scores
        train_text = store.meta_values("text", rows.reshape(-1))  # only the row groups that hold the hits
        table = table.append_column("train_text", pa.array(train_text.astype(str), pa.string()))
        if test.texts is not None:
            table = table.append_column("test_text", pa.array(np.repeat(test.texts, k).astype(str), pa.string()))
    return table.replace_schema_metadata({f"tdastore.{key}": str(value) for key, value in info.items()})
