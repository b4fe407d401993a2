"""Metagradients: differentiate the test function after further training with respect to per-row weights.

Every scored training row i gets a weight w_i in the further-training loss, so that w = 1 is the full run
and w_i = 0 leaves row i out:
- subtract: loss_t(theta, w) = mean_{j in batch_t} L_j(theta) + sum_i (w_i - 1) L_i(theta) / N, exactly the
            `subtract` coupling's leave-one-out run at w_i = 0;
- delete:   loss_t = sum_{j in batch_t} w_j L_j / sum_{j in batch_t} w_j on the full run's batches; w_i = 0
            drops i from its batches but, unlike the `delete` gold standard, does not shift later batches
            (an approximation, measured by `tdastore evaluate`).
The leave-one-out effect is, to first order, a_i ~ -d g(z, theta_T) / d w_i at w = 1. Two ways to get it:
- reverse: one backward pass through the optimizer steps per (evaluation point, test point) adjoint, giving
           every row at once; the trajectory is checkpointed every c steps and recomputed per segment, so
           memory holds T / c + c states instead of T;
- forward: tangents d theta / d w_i pushed through the steps (forward-over-reverse), one per scored row,
           giving every evaluation point and test point at once with no trajectory stored.
`mode="auto"` takes whichever needs fewer vectors: rows vs evaluation points x test points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tdastore.config import GroundTruthConfig
from tdastore.groundtruth.engine import Schedule
from tdastore.groundtruth.optim import UpdateRule
from tdastore.tasks.base import Examples, Task


def checkpoint_interval(total_steps: int, state_bytes: int, budget_bytes: float) -> int:
    """The smallest c whose checkpoints and one recomputed segment fit the budget (c = sqrt(T) if none does)."""
    for c in range(1, total_steps + 1):
        if (math.ceil(total_steps / c) + c + 1) * state_bytes <= budget_bytes:
            return c
    return max(1, math.isqrt(total_steps))


class MetaGradient:
    """Weighted further training (SGD / Adam / AdamW, subtract or delete coupling) as a pure function of
    flat parameters and row weights, and its derivative with respect to the weights."""

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
        self.model, self.task, self.cfg, self.train, self.test = model, task, cfg, train, test
        self.rule = UpdateRule(cfg)
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])  # [p]
        self.n = len(train)
        self.rows = torch.arange(self.n) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)  # [R]
        if len(self.rows) == 0 or int(self.rows.min()) < 0 or int(self.rows.max()) >= self.n:
            raise ValueError(f"metagradient rows must lie in 0..{self.n - 1}")
        self.slot = torch.full((self.n,), -1, dtype=torch.long)  # training row -> its weight's index, -1: none
        self.slot[self.rows] = torch.arange(len(self.rows))
        self.schedule = Schedule.from_config(cfg, self.n)
        state_bytes = 3 * self.theta0.numel() * self.theta0.element_size()
        self.checkpoint_every = checkpoint_every or checkpoint_interval(
            self.schedule.total_steps, state_bytes, memory_budget_mb * 2**20
        )
        self.stored_states_peak = 0  # the most parameter states held at once (memory, measured in states)

    # -- the model and one optimizer step as pure functions of flat tensors --------------------------
    def _outputs(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}
        return functional_call(self.model, {**params, **self.buffers}, (inputs,))

    def _losses(self, theta, rows):
        return self.task.per_example_loss(
            self._outputs(theta, self.train.inputs[rows]), self.train.targets[rows]
        )  # [b]

    def _loss(self, theta, w, batch):
        """The weighted further-training loss (used for the forward values; the derivatives below are its own)."""
        if self.cfg.coupling == "subtract":
            return self._losses(theta, batch).mean() + ((w - 1.0) * self._losses(theta, self.rows)).sum() / self.n
        slot = self.slot[batch]  # delete: the scored rows' weights inside this batch, 1 for the rest
        weight = torch.where(slot >= 0, w[slot.clamp(min=0)], torch.ones((), dtype=w.dtype))  # [b]
        return (weight * self._losses(theta, batch)).sum() / weight.sum()

    def _batch_gradient(self, theta, batch):
        return grad(lambda th: self._losses(th, batch).mean())(theta)  # [p]

    def _weight_jacobian(self, theta, batch, g_batch) -> torch.Tensor:
        """d g / d w_i at w = 1 for every scored row, [R, p]. At w = 1 the weights' term vanishes from g and
        from its theta-derivative, so the Hessian part of each step is the plain batch Hessian and w enters
        only through this matrix (computed once per step, shared by every tangent or adjoint).
        subtract: grad L_i / N for every scored row; delete: (grad L_i - g_batch) / |batch| for scored rows
        in the batch (the derivative of the weighted batch mean), 0 for the rest."""
        per_example = vmap(
            grad(
                lambda th, x, y: self.task.per_example_loss(self._outputs(th, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(
                    0
                )
            ),
            in_dims=(None, 0, 0),
        )
        if self.cfg.coupling == "subtract":
            return per_example(theta, self.train.inputs[self.rows], self.train.targets[self.rows]) / self.n
        jac = torch.zeros(len(self.rows), theta.numel(), dtype=theta.dtype)  # [R, p]
        slot = self.slot[batch]
        inside = batch[slot >= 0]
        if len(inside):
            grads = per_example(theta, self.train.inputs[inside], self.train.targets[inside])  # [r, p]
            jac[slot[slot >= 0]] = (grads - g_batch) / len(batch)
        return jac

    def _update(self, theta, m, v, g, t: int):
        """One optimizer update from the raw gradient g (tdastore/groundtruth/optim.py, as the engine's)."""
        rule = self.rule
        coef = rule.clip_coefficient(g.norm())
        if coef is not None:
            g = g * coef
        g = rule.coupled_gradient(theta, g)
        if not rule.adaptive:
            return theta - rule.sgd_step(g), m, v
        decay = rule.decoupled_decay(theta)
        if decay is not None:
            theta = theta - decay
        m, v = rule.moments(m, v, g)
        return theta - rule.adam_step(m, v, *rule.bias_corrections(t)), m, v

    def _step(self, theta, m, v, w, batch, t: int):
        """One step of the weighted run (any w; used for forward values and finite differences)."""
        return self._update(theta, m, v, grad(self._loss)(theta, w, batch), t)

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

    def _start(self):
        return self.theta0.clone(), torch.zeros_like(self.theta0), torch.zeros_like(self.theta0)

    def test_values(self, w: torch.Tensor, seed: int) -> torch.Tensor:
        """Forward only: g(z) at every evaluation point for one weighting of the scored rows, [evals, n_test]."""
        theta, m, v = self._start()
        values = []
        for step, batch in enumerate(self.batches(seed)):
            theta, m, v = self._step(theta, m, v, w, batch, step + 1)
            if step + 1 in self.schedule.eval_steps:
                values.append(self.task.test_function(self._outputs(theta, self.test.inputs), self.test.targets))
        return torch.stack(values).detach()

    def choose_mode(self, mode: str = "auto") -> str:
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"metagradient mode must be auto, forward or reverse, not {mode!r}")
        if mode != "auto":
            return mode
        adjoints = len(self.schedule.eval_steps) * len(self.test)
        return "forward" if len(self.rows) <= adjoints else "reverse"

    def gradients(self, seed: int, mode: str = "auto") -> torch.Tensor:
        """d g(z_t, theta_{T_e}) / d w_i for every evaluation point e, test point t, scored row i: [E, T, R]."""
        return self._forward(seed) if self.choose_mode(mode) == "forward" else self._reverse(seed)

    def _hvp(self, theta, batch, vectors: torch.Tensor) -> torch.Tensor:
        """The batch loss's Hessian times each row of `vectors` (forward-over-reverse): [V, p] -> [V, p]."""
        batch_gradient = lambda th: self._batch_gradient(th, batch)  # noqa: E731
        return vmap(lambda u: jvp(batch_gradient, (theta,), (u,))[1])(vectors)

    # -- forward mode: one tangent per scored row ----------------------------------------------------
    def _forward(self, seed: int) -> torch.Tensor:
        sched, batches = self.schedule, self.batches(seed)
        theta, m, v = self._start()
        r, p = len(self.rows), theta.numel()
        tangents = tuple(torch.zeros(r, p, dtype=theta.dtype) for _ in range(3))  # d(theta, m, v) / d w_i, [R, p]
        out = torch.empty(len(sched.eval_steps), len(self.test), r, dtype=theta.dtype)
        eval_at = {s: e for e, s in enumerate(sched.eval_steps)}
        self.stored_states_peak = max(self.stored_states_peak, 2)
        for step, batch in enumerate(batches):
            g = self._batch_gradient(theta, batch)  # [p]
            d_g = self._hvp(theta, batch, tangents[0]) + self._weight_jacobian(theta, batch, g)  # [R, p]

            def push(d_theta, d_m, d_v, d_grad, primals=(theta, m, v, g), t=step + 1):
                return jvp(lambda th, mm, vv, gg: self._update(th, mm, vv, gg, t), primals, (d_theta, d_m, d_v, d_grad))

            primal, tangents = vmap(push, out_dims=(None, 0))(*tangents, d_g)
            theta, m, v = (x.detach() for x in primal)
            tangents = tuple(x.detach() for x in tangents)
            if step + 1 in eval_at:
                out[eval_at[step + 1]] = self._test_gradients(theta) @ tangents[0].T  # [T, p] x [p, R]
        return out

    # -- reverse mode: one adjoint per (evaluation point, test point), checkpointed trajectory ---------
    def _reverse(self, seed: int) -> torch.Tensor:
        sched, batches = self.schedule, self.batches(seed)
        c = self.checkpoint_every
        checkpoints = {0: self._start()}
        state = checkpoints[0]
        for step, batch in enumerate(batches):
            state = self._plain_step(state, batch, step + 1)
            if (step + 1) % c == 0:
                checkpoints[step + 1] = state
        n_eval, n_test, p = len(sched.eval_steps), len(self.test), self.theta0.numel()
        # adjoints for every (evaluation point, test point), injected when the reverse pass reaches T_e
        lam = torch.zeros(n_eval * n_test, 3, p, dtype=self.theta0.dtype)  # d/d(theta, m, v)
        dw = torch.zeros(n_eval * n_test, len(self.rows), dtype=self.theta0.dtype)
        eval_at = {s: e for e, s in enumerate(sched.eval_steps)}
        for seg_start in sorted(checkpoints, reverse=True):
            seg_stop = min(seg_start + c, sched.total_steps)
            if seg_start >= sched.total_steps:
                continue
            states = [checkpoints[seg_start]]
            for step in range(seg_start, seg_stop):  # the segment's states, and the state after its last step
                states.append(self._plain_step(states[-1], batches[step], step + 1))
            self.stored_states_peak = max(self.stored_states_peak, len(checkpoints) + len(states))
            for step in range(seg_stop - 1, seg_start - 1, -1):
                if step + 1 in eval_at:  # theta_{step+1} is this step's output: inject grad g there
                    e = eval_at[step + 1]
                    lam[e * n_test : (e + 1) * n_test, 0] += self._test_gradients(states[step + 1 - seg_start][0])
                lam, dw_step = self._pull_back(states[step - seg_start], batches[step], step + 1, lam)
                dw += dw_step
        return dw.reshape(n_eval, n_test, len(self.rows))

    def _plain_step(self, state, batch, t: int):
        theta, m, v = state
        return tuple(x.detach() for x in self._update(theta, m, v, self._batch_gradient(theta, batch), t))

    def _pull_back(self, state, batch, t: int, lam: torch.Tensor):
        """Adjoints of (theta, m, v) after step t -> before it, [V, 3, p], and their weight gradients [V, R]."""
        theta, m, v = state
        g = self._batch_gradient(theta, batch)
        active = lam.abs().amax(dim=(1, 2)) > 0  # adjoints of later evaluation points only
        if not bool(active.any()):
            return lam, torch.zeros(lam.shape[0], len(self.rows), dtype=lam.dtype)
        _, pullback = vjp(lambda th, mm, vv, gg: self._update(th, mm, vv, gg, t), theta, m, v, g)
        d_theta, d_m, d_v, mu = vmap(lambda cot: pullback((cot[0], cot[1], cot[2])))(lam[active])  # mu = d/d g
        d_theta = d_theta + self._hvp(theta, batch, mu)
        new = torch.zeros_like(lam)
        new[active] = torch.stack([d_theta, d_m, d_v], dim=1)
        dw = torch.zeros(lam.shape[0], len(self.rows), dtype=lam.dtype)
        dw[active] = mu @ self._weight_jacobian(theta, batch, g).T  # [V, p] x [p, R]
        return new, dw

    def _test_gradients(self, theta: torch.Tensor) -> torch.Tensor:
        """grad_theta g(z_t, theta) for every test point: [n_test, p]."""

        def one(x, y):
            g = lambda th: self.task.test_function(self._outputs(th, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)  # noqa: E731
            return grad(g)(theta)

        return vmap(one)(self.test.inputs, self.test.targets)
