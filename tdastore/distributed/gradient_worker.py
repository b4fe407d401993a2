"""Compute one shard of (projected) per-example gradients and write it into the store.

`ShardComputer` is plain Python (usable in-process and in tests); `GradientWorker` is the Ray actor
that holds one ShardComputer, so each worker loads the model and data exactly once.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from tdastore.config import Config, load_config
from tdastore.devices import resolve_device
from tdastore.errors import GradientError, StoreError
from tdastore.grads.basis import Basis
from tdastore.grads.batching import padded_tokens, plan_batches
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.factored import FactoredLinearGradients, KroneckerStatistics
from tdastore.grads.normaliser import Normaliser
from tdastore.grads.per_example import all_finite, check_finite
from tdastore.store.fitted import store_basis, store_normaliser
from tdastore.store.location import store_path, zarr_store
from tdastore.store.manifest import GRADS_DIR
from tdastore.store.writer import Shard, write_shard
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Examples, Task, model_fingerprint
from tdastore.tasks.objects import ModelTask
from tdastore.training import load_model

FLOAT16_MAX = 65504.0


class ShardComputer:
    """Everything a worker needs, loaded once: task, model and the (projected) gradient computer."""

    def __init__(
        self,
        config: Config,
        split: str,
        task: Task | None = None,
        normaliser: Normaliser | None = None,
        source: dict | None = None,
        basis: Basis | None = None,
    ):
        self.config = config
        self.split = split
        self.task = resolve_task(config.task, config.model, task)
        self.device = resolve_device(config.device)  # the worker's own hardware decides `auto`
        self.model = load_model(config, self.task).to(self.device)
        loss_fn = self.task.per_example_loss if split == "train" else self.task.test_function
        normaliser = normaliser.bind(self.model) if normaliser is not None else None
        self.gradients = make_gradient_computer(
            self.model, loss_fn, config.gradients, config.projection, normaliser, basis
        )
        self.data = self.task.examples(split) if source is None else source_examples(self.task, split, source)
        self.dtype = getattr(torch, config.store.dtype)
        self.unprojected = self.gradients.spec()["kind"] == "none"
        self._buffer: torch.Tensor | None = None
        warm = self.data.slice(0, 2)
        self.gradients(warm.inputs.to(self.device), warm.targets.to(self.device))  # warm up, fail fast
        self.gather_statistics = split == "train" and isinstance(self.gradients, FactoredLinearGradients)

    def compute(self, shard: Shard) -> tuple[np.ndarray, pa.Table]:
        """Rows [shard.rows, k] in the store dtype (a view valid until the next call) and their metadata;
        batches start at shard.start, so a shard's rows never depend on the rest of the build."""
        rows = self._rows_buffer(shard.rows)  # [n, k], written in place
        if self.gather_statistics:  # K-FAC factor sums of this shard, from the hooks' own pass
            self.gradients.statistics = KroneckerStatistics(self.gradients, self.task.token_mask)
        losses = torch.empty(shard.rows)
        norms = torch.empty(shard.rows)
        part = self.data.slice(shard.start - shard.offset, shard.stop - shard.offset)  # an appended segment's own
        cfg = self.config.gradients
        lengths = part.inputs[:, 1].sum(1).numpy() if part.padded else None  # [n] real tokens per document
        batches = plan_batches(shard.rows, cfg.batch_size, lengths, cfg.max_tokens)
        self.tokens = (int(lengths.sum()), padded_tokens(batches, lengths)) if lengths is not None else (0, 0)
        for index in batches:
            batch = part.take(index)
            lo, hi = int(index[0]), int(index[-1]) + 1
            contiguous = hi - lo == len(index)  # fixed batches: rows computed in place
            out = rows[lo:hi] if contiguous and self.device.type == "cpu" else None  # in place on the CPU
            inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
            computed, loss, sq_norm = self.gradients(inputs, targets, out=out)  # [b, k], [b], [b]
            loss, sq_norm = loss.float().cpu(), sq_norm.float().cpu()
            check_finite(loss, batch.ids, f"the {self.split} loss")
            check_finite(sq_norm, batch.ids, "the gradient")
            if out is None:
                rows[index] = computed.to(device="cpu", dtype=rows.dtype)
            self._check_rows(rows[lo:hi] if contiguous else rows[index], sq_norm, shard.start + lo)
            losses[index] = loss
            norms[index] = sq_norm.sqrt()
        columns = {
            "example_id": pa.array(part.ids, pa.int64()),
            "row": pa.array(np.arange(shard.start, shard.stop), pa.int64()),
            "label": pa.array(part.labels),
            "loss": pa.array(losses.numpy()),
            "grad_norm": pa.array(norms.numpy()),
            "shard": pa.array(np.full(shard.rows, shard.index, dtype=np.int32)),
        }
        if part.texts is not None:  # text tasks: the document itself, so query results can show it
            columns["text"] = pa.array([str(t) for t in part.texts], pa.string())
        meta = pa.table(columns)
        return rows.numpy(), meta

    def _rows_buffer(self, n_rows: int) -> torch.Tensor:
        """One output buffer reused across shards: fresh pages would cost a page fault per 4 KB written."""
        if self._buffer is None or self._buffer.shape[0] < n_rows:
            self._buffer = torch.empty(n_rows, self.gradients.out_dim, dtype=self.dtype)
        return self._buffer[:n_rows]

    def _check_rows(self, rows: torch.Tensor, sq_norm: torch.Tensor, start: int) -> None:
        """Refuse rows that overflowed the store dtype. Unprojected entries are bounded by the gradient
        norm (already checked finite), so wide exact rows skip the scan unless float16 could overflow."""
        if self.unprojected and (self.dtype == torch.float32 or float(sq_norm.max()) < FLOAT16_MAX**2):
            return
        if not all_finite(rows):
            raise GradientError(
                f"a gradient in rows {start}..{start + rows.shape[0]} overflows {self.dtype}: set store.dtype: float32"
            )


def source_examples(task: Task, split: str, source: dict) -> Examples:
    """The rows an append adds (see tdastore.distributed.build.append_rows): `source["dataset"]` encoded by the
    store's task, or the objects task's split with its row-number ids continued from `source["id_offset"]`."""
    if "dataset" in source:
        return task.encode(source["dataset"])
    examples = task.examples(split)
    if isinstance(task, ModelTask):  # its ids are row numbers: the store's rows
        examples = replace(examples, ids=examples.ids + source["id_offset"])
    return examples


@ray.remote
class GradientWorker:
    """A Ray actor computing and writing whole shards; returns a small report per shard."""

    def __init__(
        self,
        config_dict: dict,
        root: str,
        split: str,
        model_fp: str,
        threads: int,
        fault: dict | None = None,
        task: Task | None = None,
        source: dict | None = None,
    ):
        torch.set_num_threads(max(1, threads))
        self.root = store_path(root)
        self.computer = ShardComputer(
            load_config(config_dict), split, task, store_normaliser(self.root), source, store_basis(self.root)
        )
        if model_fingerprint(self.computer.model) != model_fp:
            raise StoreError("the model weights changed on disk while the build ran: restart the build")
        self.fault = fault

    def run(self, shard: Shard) -> dict:
        began = time.perf_counter()
        rows, meta = self.computer.compute(shard)
        computed = time.perf_counter()
        if self.fault and self.fault.get("shard") == shard.index:
            _crash_part_way(self.root, shard, rows, self.fault)
        statistics = self.computer.gradients.statistics.arrays() if self.computer.gather_statistics else None
        write_shard(self.root, shard, rows, meta, statistics)
        return {
            "shard": shard.index,
            "rows": shard.rows,
            "seconds": time.perf_counter() - began,
            "compute_seconds": computed - began,
            "tokens": self.computer.tokens,  # (real, padded) tokens of token-sequence batches
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def _crash_part_way(root: Path, shard: Shard, rows: np.ndarray, fault: dict) -> None:
    """Testing hook: write half the shard's rows, then SIGKILL this worker (once per store)."""
    flag = root / ".fault-fired"
    if flag.exists():
        return
    flag.touch()
    import zarr

    half = shard.rows // 2
    zarr.open_array(store=zarr_store(root / GRADS_DIR), mode="r+")[shard.start : shard.start + half] = rows[:half]
    os.kill(os.getpid(), signal.SIGKILL)
