"""adam_replay's runs, as ratios measured in one run on this machine.

The text demo's shape: p = 136,960 parameters, S = 8 replay seeds x H = 40 steps of AdamW (lr 3e-4, clipping
1.0 that bites), b rows replayed (--rows), frozen batch gradients drawn at random (the cost does not depend on
their values). Timed, each the same replay:
- tdastore: clipping's norms first, then each column chunk through every step of every seed in cache
  (precond/exact/replay.py, CHUNK_ENTRIES);
- the whole [b, p] state stepped at once (the chunk as wide as the rows), the layout before;
- the loop a user would write: torch.optim.AdamW over a [b, p] parameter (the b runs without a row, as one
  tensor) and a [1, p] one (the full run), clip_grad_norm_ per run, S x H steps.
Also printed: the largest difference of tdastore's rows from the torch.optim loop's.

    python benchmarks/replay_throughput.py [--rows 64]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--params", type=int, default=136_960)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    import tdastore.precond.exact.replay as replay_module
    from tdastore.config import load_config

    gt = load_config({"groundtruth": {"optimizer": "adamw", "lr": 3e-4, "clip_norm": 1.0, "batch_size": 8}})
    gt = gt.groundtruth
    n, p, b, seeds, steps = 340, args.params, args.rows, args.seeds, args.steps
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(p, generator=generator)
    batches = torch.randn(seeds, steps, p, generator=generator) * 3e-3  # [S, H, p]: norms ~1, clipping bites
    rows = torch.randn(b, p, generator=generator) * 1e-2  # [b, p]
    space = SimpleNamespace(n=n, theta=theta, device=torch.device("cpu"), p=p)
    scorer = SimpleNamespace(
        space=space,
        config=SimpleNamespace(attribution=SimpleNamespace(replay_seeds=seeds)),
        cache={("replay_batches", steps, seeds, gt.batch_size): batches},
    )

    def timed(fn):
        began = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - began

    chunked, t_chunked = timed(lambda: replay_module.replay(scorer, rows, [steps], gt)[0])
    default = replay_module.CHUNK_ENTRIES
    replay_module.CHUNK_ENTRIES = b * p
    whole, t_whole = timed(lambda: replay_module.replay(scorer, rows, [steps], gt)[0])
    replay_module.CHUNK_ENTRIES = default
    loop, t_loop = timed(lambda: torch_optim_replay(theta, batches, rows, n, gt))
    scale = loop.abs().max()
    print(f"{b} rows x {p} parameters, {seeds} seeds x {steps} AdamW steps, {torch.get_num_threads()} threads")
    print(f"tdastore (column chunks of {default} entries): {t_chunked:.2f} s")
    print(f"whole [b, p] state at once: {t_whole:.2f} s, {t_whole / t_chunked:.1f}x tdastore's time")
    print(f"torch.optim.AdamW loop: {t_loop:.2f} s, {t_loop / t_chunked:.1f}x tdastore's time")
    off, whole_off = (chunked - loop).abs().max() / scale, (whole - loop).abs().max() / scale
    print(f"largest difference from the loop / its largest entry: {off:.1e} (whole-state layout {whole_off:.1e})")


def torch_optim_replay(theta, batches, rows, n, gt) -> torch.Tensor:
    """n (theta_i(H) - theta(H)) [b, p] by torch.optim.AdamW and clip_grad_norm_, seed by seed (as the
    replay: the same frozen batch gradients, minus g_i / n in the runs without row i). Without weight decay the
    update does not depend on theta, so the runs start at 0 and hold theta(t) - theta(0) itself (from theta,
    float32 would lose the difference of two nearly equal weights)."""
    assert not gt.weight_decay
    found = torch.zeros_like(rows)
    for s in range(batches.shape[0]):
        full = torch.nn.Parameter(torch.zeros_like(theta)[None])  # [1, p]: theta(t) - theta(0), as no decay
        left = torch.nn.Parameter(torch.zeros_like(rows))  # [b, p]
        opt_full = torch.optim.AdamW([full], lr=gt.lr, weight_decay=gt.weight_decay)
        opt_left = torch.optim.AdamW([left], lr=gt.lr, weight_decay=gt.weight_decay)
        for t in range(batches.shape[1]):
            g = batches[s, t][None]  # [1, p]
            full.grad = g.clone()
            torch.nn.utils.clip_grad_norm_([full], gt.clip_norm)
            left.grad = g - rows / n
            norms = left.grad.norm(dim=1, keepdim=True)  # clip_grad_norm_ per run: each row is its own run
            left.grad.mul_((gt.clip_norm / (norms + 1e-6)).clamp(max=1.0))
            opt_full.step()
            opt_left.step()
        found += n * (left.detach() - full.detach())
    return found / batches.shape[0]


if __name__ == "__main__":
    main()
