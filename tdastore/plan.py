"""`tdastore plan`: what a build will need, before anything heavy runs.

From the config alone (model, data, gradient and projection spec) and a short calibration on this machine: the
row size and the store's size, each worker's memory (weights in their dtype, the projection matrices, the
output buffer of a shard, and the activations of the largest batch, measured), and the build time for the
whole split on W workers (measured examples/s of one worker after a warm-up, times W), plus the fixed costs a
small job is mostly made of: Ray started and a worker process up, the model loaded (measured).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from tdastore.config import Config
from tdastore.grads.computer import make_gradient_computer
from tdastore.tasks import make_task
from tdastore.training import load_model

MB = 2**20


@dataclass
class Plan:
    rows: int
    row_columns: int
    row_bytes: int
    store_bytes: int
    process_bytes: int  # measured: this process after loading libraries, data and model (as a worker does)
    weights_bytes: int
    projection_bytes: int
    shard_buffer_bytes: int
    batch_bytes: int  # measured: peak memory added by one batch of the largest size
    examples_per_s: float  # one worker, measured
    workers: int
    model_seconds: float = 0.0  # measured: task, data and model loaded, gradient computer made (each worker does)
    ray_seconds: float = 0.0  # measured: Ray started (or joined) and one worker process up with tdastore imported

    @property
    def worker_bytes(self) -> int:
        return self.process_bytes + self.projection_bytes + self.shard_buffer_bytes + self.batch_bytes

    @property
    def build_seconds(self) -> float:
        return self.rows / max(self.examples_per_s * self.workers, 1e-9)

    @property
    def total_seconds(self) -> float:
        """The whole command: Ray and a worker started, the model loaded in it, then the gradient work."""
        return self.ray_seconds + self.model_seconds + self.build_seconds

    def lines(self) -> list[str]:
        return [
            f"rows           {self.rows:,} x {self.row_columns:,} columns = {self.row_bytes:,} bytes per row",
            f"store          {self.store_bytes / MB:,.1f} MB of gradients (before compression)",
            "per worker     "
            f"{self.worker_bytes / MB:,.0f} MB = process with libraries, data and model {self.process_bytes / MB:,.0f} "
            f"(weights {self.weights_bytes / MB:,.1f}) + projections {self.projection_bytes / MB:,.1f} + shard buffer "
            f"{self.shard_buffer_bytes / MB:,.1f} + largest batch {self.batch_bytes / MB:,.1f} (measured)",
            f"build time     {self.build_seconds:,.0f} s of gradient work on {self.workers} worker(s) "
            f"({self.examples_per_s:,.1f} examples/s per worker, measured here; writes not counted)",
            f"fixed costs    {self.ray_seconds + self.model_seconds:,.1f} s = Ray and a worker started "
            f"{self.ray_seconds:,.1f} + task, data and model loaded {self.model_seconds:,.1f} (measured here)",
            f"whole command  about {self.total_seconds:,.0f} s",
        ]


def measure_ray_start(address: str | None = None) -> float:
    """Seconds to start (or join) Ray and get one worker process up with tdastore's gradient code imported: the
    fixed cost every build pays before its first row (0 for the start when a session runs already)."""
    import ray

    from tdastore.distributed.ray_session import ray_session

    @ray.remote(num_cpus=0)
    def worker_start() -> bool:
        import tdastore.grads.computer  # noqa: F401 - what a build worker imports first

        return True

    began = time.perf_counter()
    with ray_session(address):
        ray.get(worker_start.remote())
        return time.perf_counter() - began


def plan_build(
    config: Config, workers: int | None = None, calibration_batches: int = 2, measure_ray: bool = True
) -> Plan:
    """Estimate the build of config's training split (see the module docstring)."""
    ray_seconds = measure_ray_start(config.build.address) if measure_ray else 0.0
    began = time.perf_counter()
    task = make_task(config.task, config.model)
    model = load_model(config, task)
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    data = task.examples("train")
    model_seconds = time.perf_counter() - began
    columns = computer.spec()["out_dim"]
    dtype_bytes = np.dtype(config.store.dtype).itemsize
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    matrices = [getattr(computer, side, []) for side in ("p_out", "p_in")]
    projection = sum(m.numel() * m.element_size() for side in matrices for m in side if m is not None)
    if config.projection.kind in ("gaussian", "rademacher", "sparse"):
        projection = min(config.projection.cache_mb * MB, computer.spec()["in_dim"] * columns * 4)
    process = _peak_rss()
    size = min(len(data), config.gradients.batch_size)
    batch = data.take(np.linspace(0, len(data) - 1, size).round().astype(np.int64))  # spread: typical lengths
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.build.cpus_per_worker)))  # as a worker runs
    try:
        before = _peak_rss()
        computer(batch.inputs, batch.targets)  # the first batch: what a worker's memory grows by
        batch_bytes = _peak_rss() - before
        began = time.perf_counter()
        for _ in range(calibration_batches):
            computer(batch.inputs, batch.targets)
        seconds = (time.perf_counter() - began) / calibration_batches
    finally:
        torch.set_num_threads(threads)
    return Plan(
        rows=len(data),
        row_columns=columns,
        row_bytes=columns * dtype_bytes,
        store_bytes=len(data) * columns * dtype_bytes,
        process_bytes=process,
        weights_bytes=weights,
        projection_bytes=projection,
        shard_buffer_bytes=config.store.shard_rows * columns * dtype_bytes,
        batch_bytes=max(batch_bytes, _tensor_bytes(batch.inputs) + len(batch) * columns * 4),
        examples_per_s=len(batch) / max(seconds, 1e-9),
        workers=workers or config.build.workers,
        model_seconds=model_seconds,
        ray_seconds=ray_seconds,
    )


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
