"""What the benchmarks here measure against in the same run: the fastest of a few runs of the code, and a raw
torch.mm's FLOP rate on this thread (the reference for every FLOP ratio they print)."""

from __future__ import annotations

import time

import torch


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` runs after one warm-up: what the code costs, less what other processes took."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def mm_flops(seconds_budget: float = 1.0) -> float:
    """A 1024 x 1024 torch.mm's FLOP rate, averaged over `seconds_budget` of back-to-back products."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds_budget:
        torch.mm(a, b)
        count += 1
    return count * 2 * 1024**3 / (time.perf_counter() - began)
