"""The text gold standard's replica engines (issue 14), as a ratio measured in one run on this machine.

The demo LM's shape (`tdastore demo-lm` defaults: GPT-2 2 x 64, vocabulary 512; untrained weights, which do
not change the cost), its standard-library documents truncated to 64 tokens, the paper's text setting
(subtract coupling, AdamW, clipping 1.0) in batches of 16: replica-steps per second of the vectorised engine
(replicas stacked, one vmap per step) divided by one-at-a-time torch.optim.AdamW further training
(SequentialTrainer, the loop a user would write), both on one thread; and the vectorised engine with
groundtruth.compile (torch.compile of the whole replica step), timed after its compiling run; and the loop's
own FLOP rate (torch's FlopCounterMode) against a raw torch.mm's, the ceiling of any engine's speed-up over it.

    python benchmarks/text_groundtruth.py [--replicas R] [--steps T]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from reference import mm_flops
from torch.utils.flop_counter import FlopCounterMode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=32, help="left-out rows per seed (plus the full run)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from tdastore.config import load_config
    from tdastore.demo_text import make_tiny_lm
    from tdastore.groundtruth.engine import ReplicaTrainer
    from tdastore.groundtruth.sequential import SequentialTrainer
    from tdastore.tasks import make_task
    from tdastore.tasks.text import quiet_hugging_face
    from tdastore.training import load_model

    quiet_hugging_face()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_tiny_lm(Path(tmp), train_steps=0)
        config = load_config(
            {
                "device": "cpu",
                "task": {"dataset": str(demo / "corpus.jsonl"), "kind": "causal_lm", "max_length": 64},
                "model": {"name_or_path": str(demo / "model")},
                "groundtruth": {
                    "coupling": "subtract",
                    "optimizer": "adamw",
                    "lr": 1e-4,
                    "clip_norm": 1.0,
                    "batch_size": 16,
                    "epochs": None,
                    "steps": args.steps,
                    "eval_every": args.steps,
                    "left_out_count": args.replicas,
                    "test_points": 16,
                },
            }
        )
        task = make_task(config.task, config.model)
        model = load_model(config, task)
        train, test = task.examples("train"), task.examples("test").slice(0, 16)
        left = list(range(args.replicas))
        rates, compiling = {}, 0.0
        compiled = dataclasses.replace(config.groundtruth, compile=True)
        for name, kind, cfg in (
            ("vectorised", ReplicaTrainer, config.groundtruth),
            ("vectorised, compiled", ReplicaTrainer, compiled),
            ("one at a time (torch.optim.AdamW)", SequentialTrainer, config.groundtruth),
        ):
            trainer = kind(model, task, cfg, train, test)
            if cfg.compile:  # the first run compiles each step shape; timed apart
                began = time.perf_counter()
                trainer.run([0], left)
                compiling = time.perf_counter() - began
            began = time.perf_counter()
            trainer.run([0], left)
            rates[name] = (args.replicas + 1) * args.steps / (time.perf_counter() - began)
        vectorised, fused, sequential = rates.values()
        with FlopCounterMode(display=False) as counter:  # what one replica-step of the loop computes
            SequentialTrainer(model, task, config.groundtruth, train, test).run([0], left[:1])
        step_flops = counter.get_total_flops() / (2 * args.steps)
        mm = mm_flops()
        shape = f"GPT-2 2 x 64, batch 16 x 64 tokens, {args.replicas + 1} replicas x {args.steps} steps, one thread"
        print(
            f"text replicas ({shape}): vectorised / one-at-a-time replica-steps/s = {vectorised / sequential:.2f} "
            f"({vectorised:.1f} vs {sequential:.1f})"
        )
        print(
            f"with groundtruth.compile: {fused / sequential:.2f} ({fused:.1f} replica-steps/s, "
            f"{fused / vectorised:.2f}x the eager engine; its first run, compiling, took {compiling:.0f} s)"
        )
        print(
            f"one-at-a-time loop FLOP rate / raw torch.mm FLOP rate: {sequential * step_flops / mm:.2f} "
            f"({sequential * step_flops / 1e9:.1f} vs {mm / 1e9:.1f} GFLOP/s, {step_flops / 1e9:.2f} GFLOP per "
            f"replica-step counted by torch's FlopCounterMode), so no engine can run more than "
            f"{mm / (sequential * step_flops):.1f}x the loop on this thread"
        )


if __name__ == "__main__":
    main()
