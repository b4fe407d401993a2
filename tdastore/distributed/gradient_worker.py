"""Compute one shard of (projected) per-example gradients and write it into the store.

`ShardComputer` is plain Python (usable in-process and in tests); `GradientWorker` is the Ray actor
that holds one ShardComputer, so each worker loads the model and data exactly once.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import ray
import torch

from tdastore.config import Config, load_config
from tdastore.errors import GradientError, StoreError
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.per_example import check_finite
from tdastore.store.manifest import GRADS_DIR
from tdastore.store.writer import Shard, write_shard
from tdastore.tasks.base import model_fingerprint
from tdastore.tasks.tabular import make_task
from tdastore.training import load_model


class ShardComputer:
    """Everything a worker needs, loaded once: task, model and the (projected) gradient computer."""

    def __init__(self, config: Config, split: str):
        self.config = config
        self.split = split
        self.task = make_task(config.task, config.model)
        self.model = load_model(config, self.task)
        loss_fn = self.task.per_example_loss if split == "train" else self.task.test_function
        self.gradients = make_gradient_computer(self.model, loss_fn, config.gradients, config.projection)
        self.data = self.task.examples(split)
        self.dtype = np.dtype(config.store.dtype)

    def compute(self, shard: Shard) -> tuple[np.ndarray, pa.Table]:
        """Rows [shard.rows, k] in the store dtype and their metadata; batches start at shard.start."""
        rows = np.empty((shard.rows, self.gradients.out_dim), dtype=self.dtype)
        losses = np.empty(shard.rows, dtype=np.float32)
        norms = np.empty(shard.rows, dtype=np.float32)
        batch = self.config.gradients.batch_size
        for start in range(shard.start, shard.stop, batch):
            part = self.data.slice(start, min(start + batch, shard.stop))
            projected, loss, sq_norm = self.gradients(part.inputs, part.targets)  # [b, k], [b], [b]
            check_finite(loss, part.ids, f"the {self.split} loss")
            check_finite(sq_norm, part.ids, "the gradient")
            projected = projected.numpy().astype(self.dtype, copy=False)
            if not np.isfinite(projected).all():
                raise GradientError(
                    f"a projected gradient in rows {start}..{start + len(part)} overflows {self.dtype}: "
                    "set store.dtype: float32"
                )
            lo, hi = start - shard.start, start - shard.start + len(part)
            rows[lo:hi] = projected
            losses[lo:hi] = loss.numpy()
            norms[lo:hi] = sq_norm.sqrt().numpy()
        part = self.data.slice(shard.start, shard.stop)
        meta = pa.table(
            {
                "example_id": pa.array(part.ids, pa.int64()),
                "row": pa.array(np.arange(shard.start, shard.stop), pa.int64()),
                "label": pa.array(part.labels),
                "loss": pa.array(losses),
                "grad_norm": pa.array(norms),
                "shard": pa.array(np.full(shard.rows, shard.index, dtype=np.int32)),
            }
        )
        return rows, meta


@ray.remote
class GradientWorker:
    """A Ray actor computing and writing whole shards; returns a small report per shard."""

    def __init__(self, config_dict: dict, root: str, split: str, model_fp: str, threads: int, fault: Optional[dict] = None):
        torch.set_num_threads(max(1, threads))
        self.root = Path(root)
        self.computer = ShardComputer(load_config(config_dict), split)
        if model_fingerprint(self.computer.model) != model_fp:
            raise StoreError("the model weights changed on disk while the build ran: restart the build")
        self.fault = fault

    def run(self, shard: Shard) -> dict:
        began = time.perf_counter()
        rows, meta = self.computer.compute(shard)
        if self.fault and self.fault.get("shard") == shard.index:
            _crash_part_way(self.root, shard, rows, self.fault)
        write_shard(self.root, shard, rows, meta)
        return {
            "shard": shard.index,
            "rows": shard.rows,
            "seconds": time.perf_counter() - began,
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
    zarr.open_array(str(root / GRADS_DIR), mode="r+")[shard.start : shard.start + half] = rows[:half]
    os.kill(os.getpid(), signal.SIGKILL)
