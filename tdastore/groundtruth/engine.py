"""Further training of many replicas at once: stacked parameters, per-replica batches, one vmap.

A replica is (seed s, left-out set S): one row i for the gold standard, a random subset for the linear
datamodeling score, none for the full run. Coupling (PAPER.md):
- delete:   each epoch draws a permutation from a generator seeded with s; replica (s, S) visits it with the
            rows of S deleted, in batches of B (so its last batches may be short);
- subtract: every replica of seed s sees the full run's batches, and its loss is
            mean_batch_loss - sum_{i in S} L(z_i)/N.
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
from tdastore.devices import keep_cpu_allocations, model_device
from tdastore.groundtruth.stacked import StackedMLP
from tdastore.optim import UpdateRule
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


def trainable_parameters(model: nn.Module) -> tuple[dict, dict]:
    """({name: parameter} that further training changes, {name: detached parameter} it holds fixed): a PEFT
    model's adapter trains and its base does not, as the fine-tuning that made it."""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    return trained, frozen


class ReplicaTrainer:
    """Trains replicas [(seed, left_out)] from the final model's parameters and returns g at each evaluation."""

    def __init__(self, model: nn.Module, task: Task, cfg: GroundTruthConfig, train: Examples, test: Examples):
        self.device = model_device(model)  # replicas train where the model lives (config `device`)
        if self.device.type == "cpu":
            keep_cpu_allocations()  # each step's large tensors reuse the last step's memory (devices.py)
        self.model, self.task, self.cfg = model, task, cfg
        self.train, self.test = train.to(self.device), test.to(self.device)
        trained, frozen = trainable_parameters(model)  # a LoRA adapter's own; the base model stays fixed
        self.names = list(trained)
        self.theta = {n: p.detach().clone() for n, p in trained.items()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()} | frozen
        self.n = len(train)
        self.schedule = Schedule.from_config(cfg, self.n)
        # Every replica's gradient of its weighted batch loss: written out for MLPs (stacked.py says why), else
        # vmap. groundtruth.compile: the whole step through torch.compile, or for the written-out MLP only the
        # update rule (its products already run in their fastest layouts; compiled whole they ran 10-20% slower).
        self._compile_update = False
        if StackedMLP.supports(model):
            self._step_grad = StackedMLP(model, task.per_example_loss)
            self._train_step, self._compile_update = train_step, cfg.compile
        else:
            self._step_grad = vmap(grad(self._replica_loss))
            self._train_step = torch.compile(train_step) if cfg.compile else train_step

    def run(self, seeds: list[int], left_out: list) -> torch.Tensor:
        """g for every replica of seeds x (full run + left_out): [evals, n_test, len(seeds), 1 + len(left_out)].
        left_out: training rows (one replica leaves one row out) or row sets (one replica leaves the set out)."""
        sets = [(i,) if isinstance(i, int) else tuple(int(j) for j in i) for i in left_out]
        replicas = [(s, rows) for s in seeds for rows in [(), *sets]]
        dtype = next(iter(self.theta.values())).dtype
        out = torch.empty(len(self.schedule.eval_steps), len(self.test), len(replicas), dtype=dtype)
        group = self.cfg.max_replicas
        for start in range(0, len(replicas), group):
            out[:, :, start : start + group] = self._run_group(replicas[start : start + group]).cpu()
        return out.reshape(out.shape[0], out.shape[1], len(seeds), 1 + len(left_out))

    # -- one vmapped group -------------------------------------------------------------------------
    def _run_group(self, replicas: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
        cfg, sched = self.cfg, self.schedule
        r = len(replicas)
        seeds = sorted({s for s, _ in replicas})
        device = self.device
        seed_row = torch.tensor([seeds.index(s) for s, _ in replicas], device=device)  # [R]
        width = max(1, max(len(rows) for _, rows in replicas))
        left_out = torch.full((r, width), -1, dtype=torch.long)  # [R, K] each replica's left-out rows, -1 padded
        for index, (_, rows) in enumerate(replicas):
            left_out[index, : len(rows)] = torch.tensor(rows, dtype=torch.long)
        members = torch.zeros(r, self.n, dtype=torch.bool)  # [R, N]
        replica, slot = (left_out >= 0).nonzero(as_tuple=True)
        members[replica, left_out[replica, slot]] = True
        left_out, members = left_out.to(device), members.to(device)
        params = {n: t.unsqueeze(0).repeat(r, *([1] * t.dim())) for n, t in self.theta.items()}  # [R, ...]
        state = _OptimizerState(params, cfg, compiled=self._compile_update)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        evals = torch.empty(len(sched.eval_steps), len(self.test), r, dtype=params[self.names[0]].dtype)
        next_eval = 0
        order = None
        for step in range(sched.total_steps):
            within = step % sched.steps_per_epoch
            if within == 0:
                # drawn on the host from each seed's generator: the same permutations on every device
                perms = torch.stack([torch.randperm(self.n, generator=g) for g in generators]).to(device)  # [S, N]
                order = self._visit_order(perms[seed_row], members)  # [R, N], -1 padded
            cols = order[:, within * cfg.batch_size : (within + 1) * cfg.batch_size]  # [R, b]
            weights = (cols >= 0).to(evals.dtype)  # the parameters' precision (float64 runs stay float64)
            rows = cols.clamp(min=0)
            active = weights.sum(1) > 0
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1.0)  # batch mean
            if cfg.coupling == "subtract":
                # the left-out rows join the batch with weight -1/N: one forward pass, no second use of parameters
                rows = torch.cat([rows, left_out.clamp(min=0)], dim=1)  # [R, b + K]
                weights = torch.cat([weights, -(left_out >= 0).to(evals.dtype) / self.n], dim=1)
            x, y = self._trim_padding(self.train.inputs[rows], self.train.targets[rows])  # [R, b(+1), ...]
            self._train_step(self._step_grad, state, params, x, y, weights, active)
            while next_eval < len(sched.eval_steps) and sched.eval_steps[next_eval] == step + 1:
                evals[next_eval] = self._test_values(params).T
                next_eval += 1
        return evals

    def _trim_padding(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences cut to the longest real one among this step's rows of every replica (the split is padded
        to its longest document): what the one-at-a-time loop's batches hold, and the same losses."""
        mask = self.task.token_mask(x.reshape(-1, *x.shape[2:]))  # [R b, L] or None (not token sequences)
        if mask is None:
            return x, y
        used = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        if used == x.shape[-1]:
            return x, y
        per_token = y.dim() == x.dim() - 1 and y.shape[-1] == x.shape[-1]  # causal LM targets [R, b, L]
        return x[..., :used], (y[..., :used] if per_token else y)

    def _visit_order(self, perms: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
        """Each replica's epoch order (delete mode): its seed's permutation [R, N] with its left-out rows deleted
        and the order kept, -1 padded at the end. left_out: [R, N] membership, or [R] one row each (-1: none)."""
        if self.cfg.coupling == "subtract":
            return perms
        n = perms.shape[1]
        if left_out.dim() == 1:
            members = torch.zeros(perms.shape, dtype=torch.bool, device=perms.device)
            members.scatter_(1, left_out.clamp(min=0)[:, None], (left_out >= 0)[:, None])
            left_out = members
        removed = left_out.gather(1, perms)  # [R, N]: the row at each position is left out
        order = perms.gather(1, torch.argsort(removed.int(), dim=1, stable=True))  # kept rows first, in order
        order[torch.arange(n, device=perms.device)[None, :] >= n - removed.sum(1, keepdim=True)] = -1
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
            if isinstance(self._step_grad, StackedMLP):  # vmap's linear on shared inputs runs ~8x slower
                inputs = self.test.inputs.expand(len(params[self.names[0]]), *self.test.inputs.shape)  # [R, T, d]
                outputs = self._step_grad.forward(params, inputs)  # [R, T, C]
                return vmap(self.task.test_function, in_dims=(0, None))(outputs, self.test.targets)
            return vmap(one)(params)


def train_step(step_grad, state, params: dict, x, y, weights, active) -> None:
    """One step of every replica: gradients of the weighted batch losses, then the update rule in place."""
    state.step(params, step_grad(params, x, y, weights), active=active)


class _OptimizerState:
    """The update rule (optim.py) applied in place to stacked [R, ...] parameters: per-replica clipping,
    step counts and masks (a replica that is not active this step keeps its parameters and moments)."""

    def __init__(self, params: dict, cfg: GroundTruthConfig, compiled: bool = False):
        self.rule = UpdateRule(cfg)
        self.step = torch.compile(self._step) if compiled else self._step  # compiled: one fused pass per tensor
        first = next(iter(params.values()))  # 1 - 0.999^t needs float64
        self.steps = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
        if self.rule.adaptive:
            self.m = {n: torch.zeros_like(p) for n, p in params.items()}
            self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    def _step(self, params: dict, grads: dict, active: torch.Tensor) -> None:
        rule, r = self.rule, active.shape[0]
        if rule.cfg.clip_norm is not None:
            norms = torch.sqrt(sum(g.reshape(r, -1).pow(2).sum(1) for g in grads.values()))  # [R]
            coef = rule.clip_coefficient(norms)
            grads = {n: g * _expand(coef, g) for n, g in grads.items()}
        self.steps += active.double()
        mask = {n: _expand(active.to(p.dtype), p) for n, p in params.items()}
        if not rule.adaptive:
            every = not torch.compiler.is_compiling() and bool(active.all())  # compiled: one graph, always masked
            for n, p in params.items():
                step = rule.sgd_step(rule.coupled_gradient(p, grads[n]), in_place=True)  # the gradients are spent
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
