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


# -- queries: index sizes, per-replica memory, a streamed exact pass ------------------------------------------
INDEX_KINDS = ("flat", "ivf", "pq", "hnsw", "sq8")


@dataclass
class QueryPlan:
    rows: int
    columns: int
    index_shards: int
    index_bytes: dict  # kind -> bytes of all its shard files (FAISS's own layout, computed)
    process_bytes: int  # measured: this process with the libraries and the model, as a replica holds them
    pass_bytes: int  # the store's rows as stored
    stream_bytes_per_s: float  # measured here: reading and decoding rows in the store's layout (page cache)

    def replica_bytes(self, kind: str) -> int:
        """A replica's memory: the process, plus its share of the index (scatter-gather over index_shards)."""
        return self.process_bytes + self.index_bytes[kind] // self.index_shards

    @property
    def pass_seconds(self) -> float:
        return self.pass_bytes / max(self.stream_bytes_per_s, 1.0)

    def lines(self) -> list[str]:
        lines = [
            f"queries        {self.rows:,} rows x {self.columns:,} columns; index shards per replica set: "
            f"{self.index_shards} (--index-shards)"
        ]
        for kind in INDEX_KINDS:
            lines.append(
                f"  {kind:<5}        index {self.index_bytes[kind] / MB:,.0f} MB, per replica "
                f"{self.replica_bytes(kind) / MB:,.0f} MB"
            )
        lines.append(
            f"exact pass     {self.pass_seconds:,.1f} s to stream {self.pass_bytes / MB:,.0f} MB of rows at "
            f"{self.stream_bytes_per_s / MB:,.0f} MB/s (read + decode, measured here; a slower disk bounds it)"
        )
        return lines


def index_bytes(kind: str, rows: int, columns: int, config) -> int:
    """Bytes of a FAISS index of `kind` over rows x columns (flat inner product, or the L2-reduced kinds' width
    columns + 1 rounded to 4), from FAISS's layouts: vectors, 8-byte ids of inverted lists, centroids, codes."""
    from tdastore.index.faiss_index import _nlist, _pq_m, reduced_width

    shards = -(-rows // config.index.shard_rows)
    per_shard = -(-rows // shards)
    width = reduced_width(columns)
    nlist = _nlist(config.index, per_shard)
    if kind == "flat":
        return rows * columns * 4
    if kind == "ivf":
        return rows * (width * 4 + 8) + shards * nlist * width * 4
    if kind == "pq":  # IVF-PQ codes and ids, the refine stage's full vectors, centroids and codebooks
        m = _pq_m(config.index, width)
        return rows * (m + 8 + width * 4) + shards * (nlist * width * 4 + 256 * width * 4)
    if kind == "hnsw":  # vectors, level-0 links (2M), upper levels (~M per node on 1/M of them)
        return rows * (columns * 4 + 2 * config.index.hnsw_m * 4 + 4 * 4 + 8)
    if kind == "sq8":
        return rows * columns + shards * columns * 8
    raise ValueError(kind)


def measure_stream(columns: int, dtype: str, compressor: str, rows: int = 32768) -> float:
    """Bytes per second of reading and decoding rows stored in this layout (a temporary array in the page
    cache: the decode rate; a disk slower than it bounds the pass instead)."""
    import tempfile
    from pathlib import Path

    import zarr

    from tdastore.store.location import zarr_store
    from tdastore.store.writer import create_rows_array

    data = np.random.default_rng(0).standard_normal((rows, columns)).astype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        create_rows_array(Path(tmp), "rows", rows, columns, dtype, {"chunk_rows": 1024, "compressor": compressor})
        array = zarr.open_array(store=zarr_store(Path(tmp) / "rows"), mode="r+")
        array[:] = data
        began = time.perf_counter()
        torch.from_numpy(np.asarray(array[:])).float()
        return data.nbytes / (time.perf_counter() - began)


def plan_queries(config: Config, rows: int, columns: int, index_shards: int = 1) -> QueryPlan:
    """Index sizes of every kind and per-replica memory for `rows` x `columns`, and a streamed exact pass's time."""
    dtype = np.dtype(config.store.dtype)
    return QueryPlan(
        rows=rows,
        columns=columns,
        index_shards=max(1, index_shards),
        index_bytes={kind: index_bytes(kind, rows, columns, config) for kind in INDEX_KINDS},
        process_bytes=_peak_rss(),
        pass_bytes=rows * columns * dtype.itemsize,
        stream_bytes_per_s=measure_stream(columns, config.store.dtype, config.store.compressor),
    )
