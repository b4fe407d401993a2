"""Ground-truth engine speed, as ratios measured in one run.

    python benchmarks/groundtruth_throughput.py [--replicas 200] [--epochs 5]

Figures (one per line):
  - replica-steps/s of the vectorised engine / a sequential loop in the style of the paper's code
    (a DataLoader with a seeded leave-one-out sampler, torch.optim.SGD, per-epoch test losses), same model
    (diabetes, MLP d-128-128-1), data, optimizer and schedule, batch 128;
  - the engine's FLOP rate (6 x params x batch per replica-step) / a raw torch.mm's FLOP rate, eager and with
    groundtruth.compile (for this MLP: the update rule compiled, the written-out products eager; best of 3 runs);
  - the sequential loop's FLOP rate / torch.mm's: the arithmetic ceiling of any vectorised speed-up over it;
  - the LDS job's cost per subset (half the training rows left out) / one gold-standard replica (one row left
    out), same engine, seeds and schedule, in delete and subtract coupling;
  - Ray pool: 2 workers x 1 thread vs 1 worker x 1 thread, and 1 worker x 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from reference import best_seconds, mm_flops
from torch.utils.data import DataLoader, Sampler, TensorDataset

import tdastore
from tdastore.config import GroundTruthConfig, ModelConfig, TaskConfig
from tdastore.groundtruth.engine import ReplicaTrainer
from tdastore.tasks import TabularTask


class LeaveOneOutSampler(Sampler):
    """The paper's pattern: a seeded permutation per epoch with one index removed."""

    def __init__(self, n: int, left_out: int, seed: int):
        self.n, self.left_out, self.generator = n, left_out, torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator)
        return iter(perm[perm != self.left_out].tolist())

    def __len__(self):
        return self.n - (self.left_out >= 0)


def sequential(task, model, train, test, cfg: GroundTruthConfig, replicas) -> float:
    dataset = TensorDataset(train.inputs, train.targets)
    began = time.perf_counter()
    for seed, left in replicas:
        replica = copy.deepcopy(model)
        optimizer = torch.optim.SGD(replica.parameters(), lr=cfg.lr)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=LeaveOneOutSampler(len(train), left, seed))
        for _ in range(cfg.epochs):
            for x, y in loader:
                loss = task.per_example_loss(replica(x), y).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                task.test_function(replica(test.inputs), test.targets)
    return time.perf_counter() - began


def pool_seconds(work: Path, workers: int, threads: int, name: str) -> float:
    from tdastore.groundtruth.pool import run_groundtruth

    config = tdastore.load_config(
        {
            "task": {"dataset": "diabetes"},
            "model": {"hidden": [128, 128]},
            "train": {"epochs": 50, "output_dir": str(work / "model")},
            "groundtruth": {
                "epochs": 20,
                "lr": 0.003,
                "seeds": 8,
                "seed_block": 2,
                "left_out_count": 50,
                "left_out_block": 50,
                "workers": workers,
                "threads_per_worker": threads,
                "output": str(work / name),
            },
        }
    )
    if not (work / "model").exists():
        tdastore.train(config, progress=False)
    began = time.perf_counter()
    run_groundtruth(config, progress=False)
    return time.perf_counter() - began


def lds_cost(task, model, train, test, epochs: int, count: int) -> None:
    """Seconds per LDS subset replica / seconds per leave-one-out replica, both couplings."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = list(range(count))
    subsets = [tuple(rng.choice(len(train), len(train) // 2, replace=False).tolist()) for _ in range(count)]
    for coupling in ("delete", "subtract"):
        cfg = GroundTruthConfig(epochs=epochs, lr=0.003, coupling=coupling)
        trainer = ReplicaTrainer(model, task, cfg, train, test)
        trainer.run([0], rows[:4])  # warm-up
        began = time.perf_counter()
        trainer.run([0], rows)
        single = time.perf_counter() - began
        began = time.perf_counter()
        trainer.run([0], subsets)
        halves = time.perf_counter() - began
        print(
            f"LDS subset (half the rows left out) / gold-standard replica, {coupling}, {count} replicas each: "
            f"{halves / single:.2f} ({halves:.1f} s vs {single:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[128, 128]))
    model = task.make_model()
    train, test = task.examples("train"), task.examples("test")
    cfg = GroundTruthConfig(epochs=args.epochs, lr=0.003, batch_size=128)
    left = list(range(args.replicas - 1))
    replicas = [(0, i) for i in [-1, *left]]
    trainer = ReplicaTrainer(model, task, cfg, train, test)
    trainer.run([0], left[:4])  # warm-up
    vectorised = best_seconds(lambda: trainer.run([0], left))
    steps = trainer.schedule.total_steps * len(replicas)
    sequential_seconds = sequential(task, model, train, test, cfg, replicas)
    params = sum(p.numel() for p in model.parameters())
    counted = 6 * params * cfg.batch_size * steps  # FLOPs of every replica-step
    mm = mm_flops()
    print(
        f"vectorised / sequential replica-steps per s ({len(replicas)} replicas, {cfg.epochs} epochs, 1 thread): "
        f"{sequential_seconds / vectorised:.1f} ({steps / vectorised:,.0f} vs {steps / sequential_seconds:,.0f})"
    )
    print(
        f"engine FLOP rate / raw torch.mm FLOP rate (1 thread): {counted / vectorised / mm:.2f} "
        f"({counted / vectorised / 1e9:.1f} vs {mm / 1e9:.1f} GFLOP/s, counted as 6 x {params:,} params x "
        f"{cfg.batch_size} per replica-step)"
    )
    print(
        f"sequential loop FLOP rate / raw torch.mm FLOP rate: {counted / sequential_seconds / mm:.2f}, so no "
        f"engine can run more than {sequential_seconds * mm / counted:.1f}x the loop on this thread"
    )
    compiled = ReplicaTrainer(model, task, dataclasses.replace(cfg, compile=True), train, test)
    began = time.perf_counter()
    compiled.run([0], left)  # compiles each step shape once
    first = time.perf_counter() - began
    compiled_seconds = best_seconds(lambda: compiled.run([0], left))
    print(
        f"engine with groundtruth.compile / raw torch.mm FLOP rate: {counted / compiled_seconds / mm:.2f} "
        f"({vectorised / compiled_seconds:.2f}x the eager engine once compiled; the first run, compiling, took "
        f"{first:.0f} s)"
    )
    lds_cost(task, model, train, test, args.epochs, len(left))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pool_seconds(work, 2, 1, "warm")  # start worker processes once
        one = pool_seconds(work, 1, 1, "one")
        two = pool_seconds(work, 2, 1, "two")
        threads = pool_seconds(work, 1, 2, "threads")
    ray.shutdown()
    print(f"ray pool 2 workers x 1 thread vs 1 worker x 1 thread: {one / two:.2f}x ({one:.1f} s -> {two:.1f} s)")
    print(f"ray pool 1 worker x 2 threads vs 1 worker x 1 thread: {one / threads:.2f}x ({threads:.1f} s)")


if __name__ == "__main__":
    main()
