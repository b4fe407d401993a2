"""Metagradients: differentiate the test function after further training with respect to per-row weights.

Every scored training row i gets a weight w_i in the further-training loss, so that w = 1 is the full run
and w_i = 0 leaves row i out:
- subtract: loss_t(theta, w) = mean_{j in batch_t} L_j(theta) + sum_i (w_i - 1) L_i(theta) / N, exactly the
            `subtract` coupling's leave-one-out run at w_i = 0;
- delete:   loss_t = sum_{j in batch_t} w_j L_j / sum_{j in batch_t} w_j on the full run's batches; w_i = 0
            drops i from its batches but, unlike the `delete` gold standard, does not shift later batches
            (an approximation, measured by `tdastore evaluate`).
The leave-one-out effect is, to first order, a_i ~ -d g(z, theta_T) / d w_i at w = 1. Two ways to get it:
reverse or forward mode (metagrad_modes.py) through the weighted run (weighted_run.py).
`mode="auto"` takes whichever needs fewer vectors: rows vs evaluation points x test points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tdastore.config import GroundTruthConfig
from tdastore.groundtruth.metagrad_modes import forward_mode, reverse_mode
from tdastore.groundtruth.weighted_run import WeightedRun
from tdastore.tasks.base import Examples, Task


def checkpoint_interval(total_steps: int, state_bytes: int, budget_bytes: float) -> int:
    """The smallest c whose checkpoints and one recomputed segment fit the budget (c = sqrt(T) if none does)."""
    for c in range(1, total_steps + 1):
        if (math.ceil(total_steps / c) + c + 1) * state_bytes <= budget_bytes:
            return c
    return max(1, math.isqrt(total_steps))


class MetaGradient(WeightedRun):
    """A weighted run and its derivative with respect to the row weights, in the cheaper mode."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        cfg: GroundTruthConfig,
        train: Examples,
        test: Examples,
        rows: Sequence[int] | None = None,
        checkpoint_every: int | None = None,
        memory_budget_mb: float = 512.0,
    ):
        super().__init__(model, task, cfg, train, test, rows)
        state_bytes = 3 * self.theta0.numel() * self.theta0.element_size()
        self.checkpoint_every = checkpoint_every or checkpoint_interval(
            self.schedule.total_steps, state_bytes, memory_budget_mb * 2**20
        )
        self.stored_states_peak = 0  # the most parameter states held at once (memory, measured in states)

    def choose_mode(self, mode: str = "auto") -> str:
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"metagradient mode must be auto, forward or reverse, not {mode!r}")
        if mode != "auto":
            return mode
        adjoints = len(self.schedule.eval_steps) * len(self.test)
        return "forward" if len(self.rows) <= adjoints else "reverse"

    def gradients(self, seed: int, mode: str = "auto") -> torch.Tensor:
        """d g(z_t, theta_{T_e}) / d w_i for every evaluation point e, test point t, scored row i: [E, T, R]."""
        if self.choose_mode(mode) == "forward":
            out, peak = forward_mode(self, seed)
        else:
            out, peak = reverse_mode(self, seed, self.checkpoint_every)
        self.stored_states_peak = max(self.stored_states_peak, peak)
        return out
