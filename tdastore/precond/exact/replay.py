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

from tdastore.optim import UpdateRule
from tdastore.precond.exact.operators import ExactOperator
from tdastore.precond.registry import register

SEED_OFFSET = 10_000  # replay batch orders are not a gold standard's own (its seeds count from 0)
CHUNK_ENTRIES = 1 << 19  # rows x coordinates stepped at once: 2 MB float32 states, in cache (best of 2^14-2^21 here)


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
    averaged over the replay seeds; gt: the further training replayed (a GroundTruthConfig).

    With the gradients frozen, clipping is the only step that looks at every coordinate at once, and its norms
    do not depend on the weights: they are found first, and the runs then go through the coordinates a column
    chunk at a time, every step of every seed on a chunk that stays in cache (the whole [b, p] state stepped at
    once ran about 8x slower, memory-bound)."""
    space = scorer.space
    n, last = space.n, max(horizons)
    batches = batch_gradients(scorer, last, gt)  # [S, H, p]
    theta, rule = space.theta.to(rows.dtype), UpdateRule(gt)  # [p]
    full_clip, left_clip = clip_coefficients(rule, batches, rows, n)  # [S, H, 1], [S, H, b] (or None)
    found = [torch.zeros_like(rows) for _ in horizons]
    width = max(1, CHUNK_ENTRIES // rows.shape[0])
    for c in range(0, rows.shape[1], width):
        cols = slice(c, c + width)
        removed = rows[:, cols] / n  # [b, w]
        for s in range(batches.shape[0]):
            full = _Run(rule, theta[cols], 1)
            left = _Run(rule, theta[cols], rows.shape[0])
            for t in range(1, last + 1):
                g = batches[s, t - 1, cols].to(rows.dtype)[None]  # [1, w]
                full.step(g, t, None if full_clip is None else full_clip[s, t - 1, :, None])
                left.step(g - removed, t, None if left_clip is None else left_clip[s, t - 1, :, None])
                if t in horizons:
                    found[horizons.index(t)][:, cols] += n * (left.delta - full.delta)
    return [f / batches.shape[0] for f in found]


def clip_coefficients(rule: UpdateRule, batches: torch.Tensor, rows: torch.Tensor, n: int):
    """Each step's clipping coefficient, [S, H, 1] for the full run and [S, H, b] for the runs without each row
    (None without clipping): |G - g_i/n|^2 = |G|^2 - 2 G.g_i / n + |g_i|^2 / n^2 in float64, S x H batch
    gradients a few at a time."""
    if rule.cfg.clip_norm is None:
        return None, None
    seeds, horizon, _ = batches.shape
    flat = batches.reshape(seeds * horizon, -1)  # [S H, p]
    r = rows.double()  # [b, p]
    row_sq = (r * r).sum(1) / n**2  # [b]
    full_sq, left_sq = [], []
    for k in range(0, flat.shape[0], 16):
        g = flat[k : k + 16].to(rows.device).double()  # [16, p]
        sq = (g * g).sum(1, keepdim=True)  # [16, 1]
        full_sq.append(sq)
        left_sq.append(sq - 2 / n * (g @ r.T) + row_sq)  # [16, b]
    full = rule.clip_coefficient(torch.cat(full_sq).sqrt())
    left = rule.clip_coefficient(torch.cat(left_sq).clamp(min=0).sqrt())
    return (full.to(rows.dtype).view(seeds, horizon, 1), left.to(rows.dtype).view(seeds, horizon, -1))


class _Run:
    """One further training on frozen gradients, over a chunk of w coordinates: delta [r, w] = theta(t) -
    theta(0), stepped by the update rule of the gold standard and its metagradient (tdastore/optim.py: torch.optim's
    SGD / Adam / AdamW with torch.nn.utils.clip_grad_norm_)."""

    def __init__(self, rule: UpdateRule, theta: torch.Tensor, replicas: int):
        self.rule, self.theta = rule, theta  # [w]
        self.delta = torch.zeros(replicas, theta.numel(), dtype=theta.dtype, device=theta.device)
        self.m = torch.zeros_like(self.delta)
        self.v = torch.zeros_like(self.delta)

    def step(self, grad: torch.Tensor, t: int, clip: torch.Tensor | None) -> None:
        """grad [r, w]; clip [r, 1]: the coefficient clipping gives each replica's whole gradient at this step."""
        rule = self.rule
        if clip is not None:
            grad = grad * clip
        weights = self.theta + self.delta
        grad = rule.coupled_gradient(weights, grad)
        if not rule.adaptive:
            self.delta -= rule.sgd_step(grad)
            return
        decay = rule.decoupled_decay(weights)
        if decay is not None:
            self.delta -= decay
        rule.adam_step_(self.delta, self.m, self.v, grad, t)
