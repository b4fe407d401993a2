"""Metagradients vs the gold standard's N + 1 further-training runs (issue 7), ratios in one run.

Diabetes, the quickstart's final model (MLP d-128-128-1, N = 353 training rows), subtract coupling, SGD
lr 0.003, batch 128, one seed, one block of 8 test points, one thread. Wall time of the metagradient for all
N rows divided by the wall time of the N + 1 runs (ReplicaTrainer, all replicas vectorised) that give the
same leave-one-out effects by brute force:
- the quickstart's schedule shape (50 epochs, an evaluation every 2): reverse mode needs one adjoint per
  (evaluation point, test point) = 200 vectors, forward mode one tangent per row = 353;
- one evaluation point at the end: reverse mode needs 8 adjoints (one per test point).
Also printed: the cosine of the metagradient to the brute-force effects (first order vs exact).

    python benchmarks/metagrad_throughput.py
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    import tdastore
    from tdastore.evaluate.metrics import cosine_rows
    from tdastore.groundtruth.engine import ReplicaTrainer
    from tdastore.groundtruth.metagrad import MetaGradient
    from tdastore.quickstart import quickstart_config
    from tdastore.tasks import make_task
    from tdastore.training import load_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        config = quickstart_config("diabetes", Path(tmp))
        tdastore.train(config, progress=False)
        task = make_task(config.task, config.model)
        model = load_model(config, task)
        train, test = task.examples("train"), task.examples("test").slice(0, 8)
        rows = list(range(len(train)))
        for label, schedule in (
            ("25 evaluation points", {"epochs": 50, "eval_every": 2}),
            ("final point only", {"epochs": 50, "eval_every": 50}),
        ):
            spec = dataclasses.replace(config.groundtruth, coupling="subtract", **schedule)
            began = time.perf_counter()
            values = ReplicaTrainer(model, task, spec, train, test).run([0], rows).numpy()[:, :, 0]  # [E, T, 1 + N]
            t_runs = time.perf_counter() - began
            effects = values[:, :, 1:] - values[:, :, :1]  # leave-one-out minus full run
            meta = MetaGradient(model, task, spec, train, test)
            for mode in ("reverse", "forward"):
                began = time.perf_counter()
                scores = -meta.gradients(0, mode).numpy()  # [E, T, N]
                t_meta = time.perf_counter() - began
                cos = cosine_rows(effects, scores).mean(1)
                print(
                    f"metagrad {mode} / N+1 runs, {label}: {t_meta / t_runs:.3f} ({t_meta:.1f} s vs {t_runs:.1f} s for "
                    f"{len(rows) + 1} runs; auto picks {meta.choose_mode()}); cosine to the runs first {cos[0]:.3f}, "
                    f"last {cos[-1]:.3f}"
                )


if __name__ == "__main__":
    main()
