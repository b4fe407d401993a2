"""GPU check, ready for a machine with CUDA: python benchmarks/gpu_check.py

On CUDA: makes the offline demo LM, computes its store rows (factored 16 x 16, modules: auto) on the GPU with
the model in bfloat16 and on the CPU in float32 through the build worker's own compute path, asserts per-row
cosine >= 0.99, and prints the GPU build's tokens/s divided by a plain GPU training step's tokens/s (forward +
backward of the summed loss, same batches). Then the gold standard's replica engines on the GPU (issue 14):
the tabular MLP (written-out products) and the demo LM in the paper's text setting (subtract, AdamW, clipping),
each vectorised (eager and compiled) against torch.optim one replica at a time on the same GPU: asserts equal
test losses (1e-4, TF32 off) and prints replica-steps/s ratios (the text goal is >= 3x). Without CUDA it says
so and exits 0 (`replica_engines("cpu")` runs the same checks on the CPU).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    from tdastore.config import load_config
    from tdastore.demo_text import make_tiny_lm
    from tdastore.distributed.gradient_worker import ShardComputer
    from tdastore.store.writer import Shard

    work = Path(tempfile.mkdtemp())
    make_tiny_lm(work, progress=False)

    def config(device: str, dtype: str):
        return load_config(
            {
                "device": device,
                "task": {
                    "dataset": str(work / "corpus.jsonl"),
                    "kind": "causal_lm",
                    "max_length": 128,
                    "id_column": "id",
                },
                "model": {"name_or_path": str(work / "model"), "dtype": dtype, "attention": "sdpa"},
                "gradients": {"modules": "auto", "batch_size": 32, "full_norms": False},
                "projection": {"kind": "factored", "factors": [16, 16]},
                "store": {"chunk_rows": 128, "shard_rows": 512},
            }
        )

    shard = Shard(0, 0, 512)
    cpu = ShardComputer(config("cpu", "float32"), "train")
    reference = cpu.compute(shard)[0].copy()
    gpu = ShardComputer(config("cuda", "bfloat16"), "train")
    gpu.compute(shard)  # warm-up
    torch.cuda.synchronize()
    began = time.perf_counter()
    rows = gpu.compute(shard)[0]
    torch.cuda.synchronize()
    build_seconds = time.perf_counter() - began
    cosine = (rows * reference).sum(1) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(reference, axis=1))
    tokens = gpu.tokens[0]
    model, task = gpu.model, gpu.task
    batches = [gpu.data.slice(i, min(i + 32, shard.stop)) for i in range(0, shard.stop, 32)]
    model.train()

    def training_steps() -> None:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            task.per_example_loss(model(batch.inputs.cuda()), batch.targets.cuda()).sum().backward()

    training_steps()  # warm-up, as the build had: the first backward sets up cuBLAS and the autograd buffers
    torch.cuda.synchronize()
    began = time.perf_counter()
    training_steps()
    torch.cuda.synchronize()
    step_seconds = time.perf_counter() - began
    print(f"gpu_check: per-row cosine bf16 GPU vs fp32 CPU: min {cosine.min():.4f}, median {np.median(cosine):.4f}")
    build_rate, step_rate = tokens / build_seconds, tokens / step_seconds
    print(
        f"gpu_check: build tokens/s / training step tokens/s = {build_rate / step_rate:.3f} "
        f"(build {build_rate:,.0f} tokens/s, step {step_rate:,.0f} tokens/s)"
    )
    engines_ok = replica_engines("cuda", work)
    return 0 if cosine.min() >= 0.99 and engines_ok else 1


def replica_engines(device: str, work: Path | None = None) -> bool:
    """Vectorised replica engines vs torch.optim one replica at a time on `device`: equal values, speed ratios."""
    import dataclasses

    from tdastore.config import GroundTruthConfig, ModelConfig, TaskConfig, load_config
    from tdastore.demo_text import make_tiny_lm
    from tdastore.groundtruth.engine import ReplicaTrainer
    from tdastore.groundtruth.sequential import SequentialTrainer
    from tdastore.tasks import TabularTask, make_task
    from tdastore.training import load_model

    torch.backends.cuda.matmul.allow_tf32 = False  # the comparison is of float32 arithmetic
    torch.backends.cudnn.allow_tf32 = False

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(trainer, seeds, left) -> tuple[torch.Tensor, float]:
        trainer.run(seeds, left)  # warm-up: the same shapes (compiles them, when compiling)
        sync()
        began = time.perf_counter()
        values = trainer.run(seeds, left)
        sync()
        return values, time.perf_counter() - began

    tabular = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[128, 128]))
    text_work = work or Path(tempfile.mkdtemp())
    if not (text_work / "model").exists():
        make_tiny_lm(text_work, progress=False)
    text_config = load_config(
        {
            "device": device,
            "task": {"dataset": str(text_work / "corpus.jsonl"), "kind": "causal_lm", "max_length": 64},
            "model": {"name_or_path": str(text_work / "model")},
        }
    )
    text = make_task(text_config.task, text_config.model)
    cases = [
        ("tabular MLP d-128-128-1, SGD, delete", tabular, tabular.make_model(),
         GroundTruthConfig(epochs=3, lr=0.003, batch_size=128), 63),
        ("demo LM, subtract, AdamW, clip 1.0", text, load_model(text_config, text),
         GroundTruthConfig(coupling="subtract", optimizer="adamw", lr=1e-4, clip_norm=1.0, batch_size=16,
                           epochs=None, steps=8, eval_every=4), 15),
    ]  # fmt: skip
    ok = True
    for name, task, model, cfg, replicas in cases:
        model = model.to(device)
        train, test = task.examples("train"), task.examples("test").slice(0, 16)
        left = list(range(replicas))
        reference, one_at_a_time = timed(SequentialTrainer(model, task, cfg, train, test), [0], left)
        for label, engine_cfg in (("eager", cfg), ("compiled", dataclasses.replace(cfg, compile=True))):
            values, seconds = timed(ReplicaTrainer(model, task, engine_cfg, train, test), [0], left)
            error = float(((values - reference).abs() / reference.abs().clamp(min=1e-3)).max())
            ok &= error <= 1e-4
            print(
                f"gpu_check: {name} on {device}: vectorised {label} / one at a time = "
                f"{one_at_a_time / seconds:.2f}x replica-steps/s, largest relative difference {error:.1e}"
            )
    return ok


if __name__ == "__main__":
    sys.exit(main())
