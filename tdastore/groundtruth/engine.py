"""Further training of many replicas at once: stacked parameters, per-replica batches, one vmap.

A replica is (seed s, left-out row i) with i = -1 for the full run. Coupling (PAPER.md):
- delete:   each epoch draws a permutation from a generator seeded with s; replica (s, i) visits it with
            i deleted, in batches of B (so its last batch may be one row short);
- subtract: every replica of seed s sees the full run's batches, and its loss is mean_batch_loss - L(z_i)/N.
Each replica's test function g(z) is recorded at every evaluation point of the schedule, so one run
gives the whole curve. Optimizers (SGD, Adam, AdamW, clipping) follow torch.optim's update formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tdastore.config import GroundTruthConfig
from tdastore.groundtruth.optim import UpdateRule
from tdastore.tasks.base import Examples, Task


@dataclass
class Schedule:
    """How long further training runs and when g is recorded, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    eval_steps: list[int]  # after these many steps (1-based), record g
    eval_labels: list[int]  # the schedule's own unit (epochs or steps) at each evaluation

    @classmethod
    def from_config(cls, cfg: GroundTruthConfig, n_train: int) -> Schedule:
        per_epoch = math.ceil(n_train / cfg.batch_size)
        if cfg.epochs is not None:
            labels = list(range(cfg.eval_every, cfg.epochs + 1, cfg.eval_every))
            return cls(per_epoch, cfg.epochs * per_epoch, [e * per_epoch for e in labels], labels)
        labels = list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
        return cls(per_epoch, cfg.steps, labels, labels)


class ReplicaTrainer:
    """Trains replicas [(seed, left_out)] from the final model's parameters and returns g at each evaluation."""

    def __init__(self, model: nn.Module, task: Task, cfg: GroundTruthConfig, train: Examples, test: Examples):
        self.model, self.task, self.cfg, self.train, self.test = model, task, cfg, train, test
        self.names = [n for n, _ in model.named_parameters()]
        self.theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.n = len(train)
        self.schedule = Schedule.from_config(cfg, self.n)

    def run(self, seeds: list[int], left_out: list[int]) -> torch.Tensor:
        """g for every replica of seeds x ([-1] + left_out): [evals, n_test, len(seeds), 1 + len(left_out)]."""
        replicas = [(s, i) for s in seeds for i in [-1, *left_out]]
        dtype = next(iter(self.theta.values())).dtype
        out = torch.empty(len(self.schedule.eval_steps), len(self.test), len(replicas), dtype=dtype)
        group = self.cfg.max_replicas
        for start in range(0, len(replicas), group):
            out[:, :, start : start + group] = self._run_group(replicas[start : start + group])
        return out.reshape(out.shape[0], out.shape[1], len(seeds), 1 + len(left_out))

    # -- one vmapped group -------------------------------------------------------------------------
    def _run_group(self, replicas: list[tuple[int, int]]) -> torch.Tensor:
        cfg, sched = self.cfg, self.schedule
        r = len(replicas)
        seeds = sorted({s for s, _ in replicas})
        seed_row = torch.tensor([seeds.index(s) for s, _ in replicas])  # [R]
        left_out = torch.tensor([i for _, i in replicas])  # [R], -1: full run
        params = {n: t.unsqueeze(0).repeat(r, *([1] * t.dim())) for n, t in self.theta.items()}  # [R, ...]
        state = _OptimizerState(params, cfg)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        step_grad = vmap(grad(self._replica_loss))
        evals = torch.empty(len(sched.eval_steps), len(self.test), r, dtype=params[self.names[0]].dtype)
        next_eval = 0
        order = None
        for step in range(sched.total_steps):
            within = step % sched.steps_per_epoch
            if within == 0:
                perms = torch.stack([torch.randperm(self.n, generator=g) for g in generators])  # [S, N]
                order = self._visit_order(perms[seed_row], left_out)  # [R, N], -1 padded
            cols = order[:, within * cfg.batch_size : (within + 1) * cfg.batch_size]  # [R, b]
            weights = (cols >= 0).to(evals.dtype)  # the parameters' precision (float64 runs stay float64)
            rows = cols.clamp(min=0)
            active = weights.sum(1) > 0
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1.0)  # batch mean
            if cfg.coupling == "subtract":
                # z_i joins the batch with weight -1/N: one forward pass, no second use of the parameters
                rows = torch.cat([rows, left_out.clamp(min=0)[:, None]], dim=1)  # [R, b + 1]
                weights = torch.cat([weights, -((left_out >= 0).to(evals.dtype) / self.n)[:, None]], dim=1)
            x, y = self.train.inputs[rows], self.train.targets[rows]  # [R, b(+1), ...]
            grads = step_grad(params, x, y, weights)
            state.step(params, grads, active=active)
            while next_eval < len(sched.eval_steps) and sched.eval_steps[next_eval] == step + 1:
                evals[next_eval] = self._test_values(params).T
                next_eval += 1
        return evals

    def _visit_order(self, perms: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
        """Each replica's epoch order: its seed's permutation with its left-out row deleted (delete mode)."""
        if self.cfg.coupling == "subtract":
            return perms
        n = perms.shape[1]
        position = torch.where(
            left_out >= 0, (perms == left_out[:, None]).int().argmax(1), torch.full_like(left_out, n)
        )
        cols = torch.arange(n)[None, :]
        shifted = torch.where(cols >= position[:, None], cols + 1, cols).clamp(max=n - 1)
        order = perms.gather(1, shifted)
        order[(cols == n - 1) & (left_out[:, None] >= 0)] = -1
        return order

    def _replica_loss(self, params, x, y, weights) -> torch.Tensor:
        """sum_j weights_j L(x_j): the batch mean, minus L(z_i)/N in subtract mode."""
        losses = self.task.per_example_loss(functional_call(self.model, {**params, **self.buffers}, (x,)), y)  # [b]
        return (losses * weights).sum()

    def _test_values(self, params) -> torch.Tensor:
        """g(z) of every test point under every replica: [R, n_test]."""

        def one(p):
            return self.task.test_function(
                functional_call(self.model, {**p, **self.buffers}, (self.test.inputs,)), self.test.targets
            )

        with torch.no_grad():
            return vmap(one)(params)


class _OptimizerState:
    """The update rule (optim.py) applied in place to stacked [R, ...] parameters: per-replica clipping,
    step counts and masks (a replica that is not active this step keeps its parameters and moments)."""

    def __init__(self, params: dict, cfg: GroundTruthConfig):
        self.rule = UpdateRule(cfg)
        self.steps = torch.zeros(next(iter(params.values())).shape[0], dtype=torch.float64)  # 1 - 0.999^t needs float64
        if self.rule.adaptive:
            self.m = {n: torch.zeros_like(p) for n, p in params.items()}
            self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    def step(self, params: dict, grads: dict, active: torch.Tensor) -> None:
        rule, r = self.rule, active.shape[0]
        coef = rule.clip_coefficient(torch.sqrt(sum(g.reshape(r, -1).pow(2).sum(1) for g in grads.values())))  # [R]
        if coef is not None:
            grads = {n: g * _expand(coef, g) for n, g in grads.items()}
        self.steps += active.double()
        mask = {n: _expand(active.to(p.dtype), p) for n, p in params.items()}
        if not rule.adaptive:
            every = bool(active.all())
            for n, p in params.items():
                step = rule.sgd_step(rule.coupled_gradient(p, grads[n]))
                p.sub_(step if every else step * mask[n])
            return
        dtype = next(iter(params.values())).dtype
        bias1, bias2 = (b.to(dtype) for b in rule.bias_corrections(self.steps.clamp(min=1)))  # [R]
        for n, p in params.items():
            g = rule.coupled_gradient(p, grads[n])
            decay = rule.decoupled_decay(p)
            if decay is not None:
                p.sub_(decay * mask[n])
            m_new, v_new = rule.moments(self.m[n], self.v[n], g)
            self.m[n] = torch.where(mask[n] > 0, m_new, self.m[n])
            self.v[n] = torch.where(mask[n] > 0, v_new, self.v[n])
            p.sub_(mask[n] * rule.adam_step(self.m[n], self.v[n], _expand(bias1, p), _expand(bias2, p)))


def _expand(per_replica: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_replica.reshape(-1, *([1] * (like.dim() - 1)))
