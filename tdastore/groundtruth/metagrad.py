"""Metagradients: differentiate the test function after further training with respect to per-row weights.

Every training row i gets a weight w_i in the further-training loss, as in the `subtract` coupling:
    loss_t(theta, w) = mean_{j in batch_t} L_j(theta) + sum_i (w_i - 1) L_i(theta) / N,
so w = 1 is the full run and w_i = 0 the leave-one-out run of row i. Reverse-mode differentiation through
the optimizer steps gives d g(z, theta_T) / d w_i for every row at once; the leave-one-out effect is, to
first order, a_i ~ -d g / d w_i (w_i goes from 1 to 0). The trajectory is checkpointed every
`checkpoint_every` steps and recomputed segment by segment on the way back, so memory holds
T / c + c parameter states instead of T.

This is the first part of issue 7 (the engine and its finite-difference checks); the method row, the Ray
pool units and the evaluation plots are still to come.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from tdastore.config import GroundTruthConfig
from tdastore.groundtruth.engine import Schedule
from tdastore.tasks.base import Examples, Task


class MetaGradient:
    """Weighted further training (SGD or Adam, subtract coupling) as a pure function, and its reverse pass."""

    def __init__(self, model: nn.Module, task: Task, cfg: GroundTruthConfig, train: Examples, test: Examples,
                 checkpoint_every: Optional[int] = None):
        if cfg.optimizer not in ("sgd", "adam"):
            raise ValueError(f"metagradients support sgd and adam, not {cfg.optimizer}")
        self.model, self.task, self.cfg, self.train, self.test = model, task, cfg, train, test
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])  # [p]
        self.n = len(train)
        self.schedule = Schedule.from_config(cfg, self.n)
        self.checkpoint_every = checkpoint_every or max(1, int(math.sqrt(self.schedule.total_steps)))
        self.stored_states_peak = 0  # the most parameter states held at once (memory, measured in states)

    # -- the model and one optimizer step as pure functions of flat tensors --------------------------
    def _outputs(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}
        return functional_call(self.model, params, (inputs,))

    def _loss(self, theta, w, rows):
        batch = self.task.per_example_loss(self._outputs(theta, self.train.inputs[rows]), self.train.targets[rows]).mean()
        every = self.task.per_example_loss(self._outputs(theta, self.train.inputs), self.train.targets)  # [N]
        return batch + ((w - 1.0) * every).sum() / self.n

    def _step(self, theta, m, v, w, rows, t: int):
        g = grad(self._loss)(theta, w, rows)
        lr = self.cfg.lr
        if self.cfg.optimizer == "sgd":
            return theta - lr * g, m, v
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        # sqrt has an infinite slope at 0 (entries with zero gradient so far): the double where keeps the
        # forward value and gives those entries a zero (not NaN) derivative
        positive = v > 0
        root = torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))
        denom = root / math.sqrt(1 - beta2**t) + eps
        return theta - (lr / (1 - beta1**t)) * m / denom, m, v

    def batches(self, seed: int) -> list[torch.Tensor]:
        """The full run's batch order for `seed`: one permutation per epoch, shared by every weighting."""
        generator = torch.Generator().manual_seed(seed)
        sched, out, perm = self.schedule, [], None
        for step in range(sched.total_steps):
            within = step % sched.steps_per_epoch
            if within == 0:
                perm = torch.randperm(self.n, generator=generator)
            out.append(perm[within * self.cfg.batch_size : (within + 1) * self.cfg.batch_size])
        return out

    def test_values(self, w: torch.Tensor, seed: int) -> torch.Tensor:
        """Forward only: g(z) at every evaluation point for one weighting, [evals, n_test]."""
        theta, m, v = self.theta0.clone(), torch.zeros_like(self.theta0), torch.zeros_like(self.theta0)
        values = []
        for step, rows in enumerate(self.batches(seed)):
            theta, m, v = self._step(theta, m, v, w, rows, step + 1)
            if step + 1 in self.schedule.eval_steps:
                values.append(self.task.test_function(self._outputs(theta, self.test.inputs), self.test.targets))
        return torch.stack(values).detach()

    # -- the reverse pass ----------------------------------------------------------------------------
    def gradients(self, seed: int) -> torch.Tensor:
        """d g(z_t, theta_{T_e}) / d w_i for every evaluation point e, test point t, row i: [evals, n_test, N]."""
        sched, batches = self.schedule, self.batches(seed)
        w = torch.ones(self.n, dtype=self.theta0.dtype)
        c = self.checkpoint_every
        checkpoints = {0: (self.theta0.clone(), torch.zeros_like(self.theta0), torch.zeros_like(self.theta0))}
        theta, m, v = checkpoints[0]
        for step, rows in enumerate(batches):
            theta, m, v = (x.detach() for x in self._step(theta, m, v, w, rows, step + 1))
            if (step + 1) % c == 0:
                checkpoints[step + 1] = (theta, m, v)
        n_eval, n_test = len(sched.eval_steps), len(self.test)
        # adjoints for every (evaluation point, test point), injected when the reverse pass reaches T_e
        lam = torch.zeros(n_eval, n_test, 3, self.theta0.numel(), dtype=self.theta0.dtype)  # d/d(theta, m, v)
        dw = torch.zeros(n_eval, n_test, self.n, dtype=self.theta0.dtype)
        eval_at = {s: e for e, s in enumerate(sched.eval_steps)}
        for seg_start in sorted(checkpoints, reverse=True):
            seg_stop = min(seg_start + c, sched.total_steps)
            if seg_start >= sched.total_steps:
                continue
            states = [checkpoints[seg_start]]
            for step in range(seg_start, seg_stop):  # the segment's states, and the state after its last step
                states.append(tuple(x.detach() for x in self._step(*states[-1], w, batches[step], step + 1)))
            self.stored_states_peak = max(self.stored_states_peak, len(checkpoints) + len(states))
            for step in range(seg_stop - 1, seg_start - 1, -1):
                if step + 1 in eval_at:  # theta_{step+1} is this step's output: inject grad g there
                    lam[eval_at[step + 1], :, 0] += self._test_gradients(states[step + 1 - seg_start][0])
                theta_s, m_s, v_s = states[step - seg_start]
                _, pullback = vjp(lambda th, mm, vv, ww: self._step(th, mm, vv, ww, batches[step], step + 1), theta_s, m_s, v_s, w)
                flat = lam.reshape(-1, 3, lam.shape[-1])
                d_theta, d_m, d_v, d_w = vmap(lambda cot: pullback((cot[0], cot[1], cot[2])))(flat)
                lam = torch.stack([d_theta, d_m, d_v], dim=1).reshape(lam.shape)
                dw += d_w.reshape(dw.shape)
        return dw

    def _test_gradients(self, theta: torch.Tensor) -> torch.Tensor:
        """grad_theta g(z_t, theta) for every test point: [n_test, p]."""
        def one(x, y):
            g = lambda th: self.task.test_function(self._outputs(th, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)  # noqa: E731
            return grad(g)(theta)

        return vmap(one)(self.test.inputs, self.test.targets)

    def scores(self, seeds: list[int]) -> torch.Tensor:
        """Leave-one-out estimates a_i ~ -dg/dw_i, averaged over seeds: [evals, n_test, N]."""
        return -torch.stack([self.gradients(s) for s in seeds]).mean(0)
