"""Build throughput, projection cost and memory, as ratios against references measured in the same run.

    python benchmarks/build_throughput.py [--rows 20000] [--quick]

Figures (one per line):
  - build examples/s per worker thread / plain training step examples/s on one thread (same model,
    same batch): for the d-128-128 MLP (18k params) and a 500-160-160-1 MLP (106k params), unprojected,
    sparse JL to k = 1024, and factored (Kronecker per Linear layer, ~1k columns);
  - dense Gaussian projection / raw torch.mm of the same shapes;
  - peak memory of a build of 10k vs 100k synthetic rows (worker and driver).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from reference import best_seconds

from tdastore.tasks.synthetic import write_synthetic_regression

BATCH = 256
MODELS = {"mlp-10-128-128-1": (10, [128, 128]), "mlp-500-160-160-1": (500, [160, 160])}
PROJECTIONS = {
    "none": {"kind": "none"},
    "sparse k=1024": {"kind": "sparse", "dim": 1024, "nonzeros": 1},
    "factored 32x32": {"kind": "factored", "factors": [32, 32]},
}


def make_config(work: Path, rows: int, features: int, hidden: list[int], projection: dict, dtype: str = "float32"):
    """A config on synthetic data with a randomly initialised model saved as the 'final' weights."""
    from tdastore.config import load_config
    from tdastore.tasks import make_task
    from tdastore.training import save_model

    data = work / f"data_{rows}_{features}.parquet"
    if not data.exists():
        write_synthetic_regression(data, rows, features)
    config = load_config(
        {
            "task": {"dataset": str(data), "kind": "regression", "target": "y", "test_fraction": 0.01},
            "model": {"hidden": hidden},
            "train": {"output_dir": str(work / f"model_{features}_{'_'.join(map(str, hidden))}")},
            "gradients": {"batch_size": BATCH},
            "projection": projection,
            "store": {"dtype": dtype, "chunk_rows": 512, "shard_rows": 2048},
            "build": {"workers": 2, "cpus_per_worker": 1},
        }
    )
    task = make_task(config.task, config.model)
    save_model(task.make_model(), config, Path(config.train.output_dir))
    return config


def training_step_rate(features: int, hidden: list[int], threads: int) -> float:
    """Examples/s of a plain training step: forward + backward of the summed loss, one batch."""
    from tdastore.tasks.tabular import MLP

    torch.set_num_threads(threads)
    model = MLP(features, hidden, 1)
    x, y = torch.randn(BATCH, features), torch.randn(BATCH)

    def step():
        model.zero_grad(set_to_none=True)
        ((model(x).squeeze(-1) - y) ** 2).sum().backward()

    return BATCH / best_seconds(step, 20)


def build_rates(config, work: Path, name: str) -> tuple[float, float, float]:
    """Examples/s: per worker thread (gradients + store writes), per worker thread for the gradients
    alone, and end to end including Ray actor start-up."""
    from tdastore.distributed.build import build_store

    began = time.perf_counter()
    store = build_store(config, work / f"store_{name}", progress=False)
    wall = time.perf_counter() - began
    summary = store.manifest["summary"]
    return summary["worker_examples_per_s"], summary["worker_compute_examples_per_s"], store.n_rows / wall


def dense_projection_vs_mm() -> float:
    from tdastore.config import ProjectionConfig
    from tdastore.grads.projection import make_projector
    from tdastore.tasks.tabular import MLP

    torch.set_num_threads(1)
    shapes = {n: tuple(p.shape) for n, p in MLP(10, [128, 128], 1).named_parameters()}
    proj = make_projector(ProjectionConfig(kind="gaussian", dim=1024, cache_mb=1024), shapes)
    grads = {n: torch.randn(BATCH, *s) for n, s in shapes.items()}
    flat = torch.cat([g.reshape(BATCH, -1) for g in grads.values()], 1)  # [B, p]
    matrix = torch.randn(flat.shape[1], 1024)  # [p, k]
    t_proj = best_seconds(lambda: proj.project(grads), 5)
    t_mm = best_seconds(lambda: torch.mm(flat, matrix), 5)
    return t_mm / t_proj


MEMORY_SCRIPT = """
import json, resource, sys
sys.path.insert(0, {bench_dir!r})
import ray
from build_throughput import make_config
from tdastore.distributed.build import build_store
from pathlib import Path
work = Path({work!r})
config = make_config(work, {rows}, 20, [128, 128], {{"kind": "factored", "factors": [32, 32]}}, "float16")
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
store = build_store(config, work / "store_mem_{rows}", progress=False)
print(json.dumps({{"driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": store.manifest["summary"]["peak_worker_rss_mb"]}}))
"""


def peak_memory(work: Path, rows: int) -> dict:
    code = MEMORY_SCRIPT.format(bench_dir=str(Path(__file__).parent), work=str(work), rows=rows)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="rows per throughput build")
    parser.add_argument("--quick", action="store_true", help="smaller builds, no memory scaling run")
    args = parser.parse_args()
    rows = 4096 if args.quick else args.rows
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(
            f"dense gaussian projection (B={BATCH}, p=18,049 -> k=1024) / raw torch.mm of the same shapes: "
            f"{dense_projection_vs_mm():.2f}"
        )
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        for model_name, (features, hidden) in MODELS.items():
            step_rate = training_step_rate(features, hidden, threads=1)
            for proj_name, projection in PROJECTIONS.items():
                n = rows if proj_name != "none" or features < 100 else min(rows, 4096)  # unprojected 106k: 1.7 GB
                config = make_config(work, n, features, hidden, projection, "float16")
                per_worker, gradients_only, end_to_end = build_rates(config, work, f"{model_name}_{proj_name}")
                print(
                    f"build/train-step {model_name} {proj_name}: {per_worker / step_rate:.3f} "
                    f"(build {per_worker:,.0f} ex/s per worker thread, train step {step_rate:,.0f} ex/s on one thread; "
                    f"end to end with 2 workers incl. start-up {end_to_end:,.0f} ex/s over {n:,} rows)"
                )
                print(
                    f"gradients-only/train-step {model_name} {proj_name}: {gradients_only / step_rate:.3f} "
                    f"(the build without its store writes: {gradients_only:,.0f} ex/s per worker thread)"
                )
        ray.shutdown()
        if not args.quick:
            small, large = peak_memory(work, 10_000), peak_memory(work, 100_000)
            print(
                f"peak memory 100k/10k rows, worker: {large['worker_mb'] / small['worker_mb']:.3f} "
                f"({small['worker_mb']:.0f} -> {large['worker_mb']:.0f} MB)"
            )
            print(
                f"peak memory 100k/10k rows, driver: {large['driver_mb'] / small['driver_mb']:.3f} "
                f"({small['driver_mb']:.0f} -> {large['driver_mb']:.0f} MB)"
            )


if __name__ == "__main__":
    main()
