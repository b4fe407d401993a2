"""GPU check, ready for a machine with CUDA: python benchmarks/gpu_check.py

On CUDA: makes the offline demo LM, computes its store rows (factored 16 x 16, modules: auto) on the GPU with
the model in bfloat16 and on the CPU in float32 through the build worker's own compute path, asserts per-row
cosine >= 0.99, and prints the GPU build's tokens/s divided by a plain GPU training step's tokens/s (forward +
backward of the summed loss, same batches). Without CUDA it says so and exits 0.
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
    torch.cuda.synchronize()
    began = time.perf_counter()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        task.per_example_loss(model(batch.inputs.cuda()), batch.targets.cuda()).sum().backward()
    torch.cuda.synchronize()
    step_seconds = time.perf_counter() - began
    print(f"gpu_check: per-row cosine bf16 GPU vs fp32 CPU: min {cosine.min():.4f}, median {np.median(cosine):.4f}")
    build_rate, step_rate = tokens / build_seconds, tokens / step_seconds
    print(
        f"gpu_check: build tokens/s / training step tokens/s = {build_rate / step_rate:.3f} "
        f"(build {build_rate:,.0f} tokens/s, step {step_rate:,.0f} tokens/s)"
    )
    return 0 if cosine.min() >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
