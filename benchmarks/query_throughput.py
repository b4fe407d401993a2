"""Query speed as ratios measured in one run.

    python benchmarks/query_throughput.py [--rows 1000000] [--queries 1000] [--dim 512]

Figures (one per line):
  - full score matrix of Q test rows against N stored rows (float16 on disk, zstd), streamed with a running
    top-k, divided by a raw torch.mm of the same matrices already in memory (float32);
  - FAISS flat vs each approximate kind on 100k gradients of a trained model: speed-up and recall@10.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import pyarrow as pa
import torch

import tdastore
from tdastore.attribution.attributor import projected_score_blocks
from tdastore.attribution.results import stream_top_k
from tdastore.methods import get_method
from tdastore.precond.projected.spectral import SpectralOperator
from tdastore.store.gradient_store import GradientStore
from tdastore.store.writer import finalize_store, plan_shards, prepare_store, write_shard


def synthetic_store(root: Path, rows: int, dim: int, shard_rows: int = 65536) -> GradientStore:
    """A store of low-rank-plus-noise float16 rows written through the store's own shard writer."""
    identity = {
        "split": "train",
        "task": {"name": "synthetic", "kind": "regression", "fingerprint": "synthetic", "description": {}},
        "model": {"fingerprint": "synthetic"},
        "gradients": {"params": {"w": [dim]}, "numel": dim, "function": "loss"},
        "projection": {"kind": "gaussian", "in_dim": dim, "out_dim": dim, "seed": 0},
        "layout": {"dtype": "float16", "chunk_rows": 8192, "shard_rows": shard_rows, "compressor": "zstd"},
    }
    manifest = prepare_store(root, identity, rows, dim, "float16", {"config": {}})
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(32, dim)).astype(np.float32)
    for shard in plan_shards(rows, shard_rows):
        block = rng.normal(size=(shard.rows, 32)).astype(np.float32) @ basis + 0.3 * rng.normal(
            size=(shard.rows, dim)
        ).astype(np.float32)
        meta = pa.table(
            {
                "example_id": np.arange(shard.start, shard.stop),
                "row": np.arange(shard.start, shard.stop),
                "label": np.zeros(shard.rows),
                "loss": np.zeros(shard.rows, np.float32),
                "grad_norm": np.zeros(shard.rows, np.float32),
                "shard": np.full(shard.rows, shard.index, np.int32),
            }
        )
        write_shard(root, shard, block.astype(np.float16), meta)
    finalize_store(root, manifest, {})
    return GradientStore(root)


def score_matrix_ratio(store: GradientStore, queries: np.ndarray) -> tuple[float, float, float]:
    torch.set_num_threads(os.cpu_count() or 2)
    method, identity = get_method("grad_dot"), SpectralOperator("identity", store.dim)
    began = time.perf_counter()
    stream_top_k(projected_score_blocks(store, identity, method, queries), len(queries), 10, store.n_rows)
    streamed = time.perf_counter() - began
    in_memory = torch.from_numpy(store.read_rows())  # [N, k] float32
    q = torch.from_numpy(queries)
    out = torch.empty(len(queries), 8192)
    began = time.perf_counter()
    for start in range(0, store.n_rows, 8192):
        chunk = in_memory[start : start + 8192]
        torch.mm(q, chunk.T, out=out[:, : chunk.shape[0]])
    raw = time.perf_counter() - began
    return raw / streamed, streamed, raw


def faiss_side_by_side(work: Path) -> list[str]:
    """Flat vs approximate kinds on 100k factored gradients of a trained MLP (as in tests/test_index_recall.py)."""
    import ray

    from tdastore.distributed.build import build_store
    from tdastore.tasks.synthetic import write_synthetic_regression

    write_synthetic_regression(work / "data.parquet", 101_000, 20)
    config = tdastore.load_config(
        {
            "task": {"dataset": str(work / "data.parquet"), "kind": "regression", "target": "y", "test_fraction": 0.01},
            "model": {"hidden": [64, 64]},
            "train": {"epochs": 2, "lr": 0.01, "batch_size": 256, "output_dir": str(work / "model")},
            "gradients": {"batch_size": 1024},
            "projection": {"kind": "factored", "factors": [8, 8]},
            "store": {"chunk_rows": 4096, "shard_rows": 16384},
        }
    )
    tdastore.train(config, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    store = build_store(config, work / "store", progress=False)
    ray.shutdown()
    lines = []
    for method in ("grad_dot", "if_gn"):
        tdastore.query(store, method, split="test", top_k=10, kind="flat")  # build (and fit) once, outside the timing
        began = time.perf_counter()
        flat = tdastore.query(store, method, split="test", top_k=10, kind="flat")
        flat_seconds = time.perf_counter() - began
        reference = flat.column("train_row").to_numpy().reshape(-1, 10)
        for kind in ("ivf", "hnsw", "sq8", "pq"):
            tdastore.query(store, method, split="test", top_k=10, kind=kind)
            began = time.perf_counter()
            result = tdastore.query(store, method, split="test", top_k=10, kind=kind)
            seconds = time.perf_counter() - began
            found = result.column("train_row").to_numpy().reshape(-1, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reference, found)])
            lines.append(
                f"faiss {method} {kind} vs flat ({store.n_rows:,} x {store.dim}, {len(reference)} queries): "
                f"speed-up {flat_seconds / seconds:.2f}, recall@10 {recall:.3f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip-faiss", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        store = synthetic_store(work / "scores", args.rows, args.dim)
        queries = np.random.default_rng(1).normal(size=(args.queries, args.dim)).astype(np.float32)
        ratio, streamed, raw = score_matrix_ratio(store, queries)
        print(
            f"full score matrix {args.queries:,} x {args.rows:,} (k={args.dim}, float16 zstd on disk) / raw torch.mm "
            f"in memory: {ratio:.2f} (streamed {streamed:.1f} s, raw mm {raw:.1f} s)"
        )
        if not args.skip_faiss:
            for line in faiss_side_by_side(work):
                print(line)


if __name__ == "__main__":
    sys.exit(main())
