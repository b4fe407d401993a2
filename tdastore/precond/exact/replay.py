"""adam_replay: the further training's optimizer updates replayed with and without each training row, with the
gradients frozen at the final model (exact path).

adam_dot is this replay's small-perturbation limit with v averaged over an epoch: Adam's response to removing
a row is g_i / sqrt(v) only while the row's share of a coordinate's gradient is small. In the first steps of a
further training v holds a few batches, and on coordinates a row's gradient dominates (rare tokens' embedding
rows, say) Adam's normalised update saturates at one step of lr, far from the linear prediction; the exact
metagradient, a derivative at weight one, misses that finite effect even more. The replay keeps the optimizer's
own rule and only freezes the gradients:

    G_t      the mean gradient of step t's batch at the final model (seed s's batch order, S seeds)
    run      Adam (or SGD) on the clipped G_t, and on the clipped G_t - g_i / n (the subtract coupling: row i
             left out of every step, as the paper's text gold standard), the same step counts and decay
    row_i    n (theta_i(H) - theta(H)), the difference after H steps, averaged over the seeds

so a score g_test . row_i / n is the predicted change of the test function after H steps of further training
without row i. Cost: S x H batch gradients once, then S x H element-wise optimizer steps over [b, p] per block
of b rows; memory: the S x H batch gradients [S, H, p] and a few [b, p] blocks.
"""

from __future__ import annotations

import math

import torch

from tdastore.errors import ConfigError
from tdastore.precond.exact.operators import ExactOperator
from tdastore.precond.registry import register

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim's defaults, as the gold standard's optimizer
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
SEED_OFFSET = 10_000  # replay batch orders are not a gold standard's own (its seeds count from 0)


@register
class AdamReplay(ExactOperator):
    name = "adam_replay"
    settings = ("replay_steps", "replay_seeds")

    def apply(self, scorer, vectors):
        return vectors  # the test side is the measurement's gradient; the optimizer acts on the train side

    def train_rows(self, scorer):
        horizon = replay_horizon(scorer)
        scorer.info.update(replay_steps=horizon, replay_seeds=scorer.config.attribution.replay_seeds)
        for start, block in scorer.space.example_grads(scorer.space.train):
            yield start, replay(scorer, block, [horizon], scorer.config.groundtruth)[0]


def replay_horizon(scorer) -> int:
    """attribution.replay_steps, or the whole further training of the ground-truth config."""
    cfg, gt = scorer.config.attribution, scorer.config.groundtruth
    if cfg.replay_steps is not None:
        return cfg.replay_steps
    per_epoch = math.ceil(scorer.space.n / gt.batch_size)
    return gt.steps if gt.steps is not None else per_epoch * (gt.epochs or 1)


def batch_gradients(scorer, horizon: int, gt) -> torch.Tensor:
    """[S, H, p]: each replay seed's first H batch-mean gradients at the final model (cached per scorer)."""
    space, seeds = scorer.space, scorer.config.attribution.replay_seeds
    key = ("replay_batches", horizon, seeds, gt.batch_size)
    if key in scorer.cache:
        return scorer.cache[key]
    per_epoch = math.ceil(space.n / gt.batch_size)
    out = torch.empty(seeds, horizon, space.p, dtype=space.theta.dtype, device=space.device)
    for s in range(seeds):
        generator = torch.Generator().manual_seed(SEED_OFFSET + s)
        for t in range(horizon):
            if t % per_epoch == 0:
                order = torch.randperm(space.n, generator=generator)
            rows = order[(t % per_epoch) * gt.batch_size : (t % per_epoch + 1) * gt.batch_size]
            part = space.train.take(rows)
            out[s, t] = torch.cat([g for _, g in space.example_grads(part)]).mean(0)
    scorer.cache[key] = out
    return out


def replay(scorer, rows: torch.Tensor, horizons: list[int], gt) -> list[torch.Tensor]:
    """rows [b, p] (per-example loss gradients) -> n (theta_i(H) - theta(H)) [b, p] for each H in `horizons`,
    averaged over the replay seeds; gt: the further training replayed (a GroundTruthConfig)."""
    if gt.optimizer not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"adam_replay replays adam, adamw or sgd, not groundtruth.optimizer {gt.optimizer}")
    space = scorer.space
    n, last = space.n, max(horizons)
    batches = batch_gradients(scorer, last, gt)  # [S, H, p]
    theta = space.theta.to(rows.dtype)  # [p]
    found = [torch.zeros_like(rows) for _ in horizons]
    for s in range(batches.shape[0]):
        full = _Run(gt, theta, 1)
        left = _Run(gt, theta, rows.shape[0])
        for t in range(1, last + 1):
            g = batches[s, t - 1].to(rows.dtype)[None]  # [1, p]
            full.step(g, t)
            left.step(g - rows / n, t)
            if t in horizons:
                found[horizons.index(t)] += n * (left.delta - full.delta)
    return [f / batches.shape[0] for f in found]


class _Run:
    """One further training on frozen gradients: delta [r, p] = theta(t) - theta(0), by the update rule of
    torch.optim's SGD / Adam / AdamW with torch.nn.utils.clip_grad_norm_ (tdastore/groundtruth/optim.py)."""

    def __init__(self, gt, theta: torch.Tensor, replicas: int):
        self.gt, self.theta = gt, theta
        self.delta = torch.zeros(replicas, theta.numel(), dtype=theta.dtype, device=theta.device)
        self.m = torch.zeros_like(self.delta)
        self.v = torch.zeros_like(self.delta)

    def step(self, grad: torch.Tensor, t: int) -> None:
        gt = self.gt
        if gt.clip_norm is not None:
            grad = grad * (gt.clip_norm / (grad.norm(dim=1, keepdim=True) + CLIP_EPS)).clamp(max=1.0)
        if gt.weight_decay and gt.optimizer != "adamw":  # coupled decay, on the current weights
            grad = grad + gt.weight_decay * (self.theta + self.delta)
        if gt.optimizer == "sgd":
            self.delta -= gt.lr * grad
            return
        if gt.optimizer == "adamw" and gt.weight_decay:
            self.delta -= gt.lr * gt.weight_decay * (self.theta + self.delta)
        self.m = BETA1 * self.m + (1 - BETA1) * grad
        self.v = BETA2 * self.v + (1 - BETA2) * grad * grad
        bias1, bias2 = 1 - BETA1**t, 1 - BETA2**t
        self.delta -= gt.lr / bias1 * self.m / (self.v.sqrt() / math.sqrt(bias2) + ADAM_EPS)
