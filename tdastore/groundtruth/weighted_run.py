"""The weighted further-training run that metagradients differentiate: every scored training row i gets a
weight w_i in the loss (w = 1: the full run, w_i = 0: row i left out), as a pure function of flat parameters.

- subtract: loss_t(theta, w) = mean_{j in batch_t} L_j(theta) + sum_i (w_i - 1) L_i(theta) / N, exactly the
            `subtract` coupling's leave-one-out run at w_i = 0;
- delete:   loss_t = sum_{j in batch_t} w_j L_j / sum_{j in batch_t} w_j on the full run's batches.
The optimizer update is tdastore/optim.py's, the same as the replica engine's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from tdastore.config import GroundTruthConfig
from tdastore.devices import keep_cpu_allocations, model_device
from tdastore.groundtruth.engine import Schedule, trainable_parameters
from tdastore.optim import UpdateRule
from tdastore.tasks.base import Examples, Task


class WeightedRun:
    """Weighted further training (SGD / Adam / AdamW, subtract or delete coupling) as pure functions of flat
    parameters theta [p], optimizer moments and row weights w [R]."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        cfg: GroundTruthConfig,
        train: Examples,
        test: Examples,
        rows: Sequence[int] | None = None,
    ):
        device = model_device(model)  # the run follows the model's device (config `device`)
        if device.type == "cpu":
            keep_cpu_allocations()  # each step's large tensors reuse the last step's memory (devices.py)
        self.model, self.task, self.cfg = model, task, cfg
        self.train, self.test = train.to(device), test.to(device)
        self.rule = UpdateRule(cfg)
        trained, frozen = trainable_parameters(model)  # a LoRA adapter's own; the base model stays fixed
        self.names = list(trained)
        self.shapes = [p.shape for p in trained.values()]
        self.sizes = [p.numel() for p in trained.values()]
        self.buffers = {n: b.detach() for n, b in model.named_buffers()} | frozen
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in trained.values()])  # [p]
        self.n = len(train)
        self.rows = torch.arange(self.n) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)  # [R]
        self.rows = self.rows.to(device)
        if len(self.rows) == 0 or int(self.rows.min()) < 0 or int(self.rows.max()) >= self.n:
            raise ValueError(f"metagradient rows must lie in 0..{self.n - 1}")
        self.slot = torch.full((self.n,), -1, dtype=torch.long, device=device)  # row -> its weight's index, -1: none
        self.slot[self.rows] = torch.arange(len(self.rows))
        self.schedule = Schedule.from_config(cfg, self.n)

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

    def batch_gradient(self, theta, batch):
        return grad(lambda th: self._losses(th, batch).mean())(theta)  # [p]

    def weight_jacobian(self, theta, batch, g_batch) -> torch.Tensor:
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
        jac = torch.zeros(len(self.rows), theta.numel(), dtype=theta.dtype, device=theta.device)  # [R, p]
        slot = self.slot[batch]
        inside = batch[slot >= 0]
        if len(inside):
            grads = per_example(theta, self.train.inputs[inside], self.train.targets[inside])  # [r, p]
            jac[slot[slot >= 0]] = (grads - g_batch) / len(batch)
        return jac

    def update(self, theta, m, v, g, t: int):
        """One optimizer update from the raw gradient g (tdastore/optim.py, as the engine's)."""
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
        return self.update(theta, m, v, grad(self._loss)(theta, w, batch), t)

    def batches(self, seed: int) -> list[torch.Tensor]:
        """The full run's batch order for `seed`: one permutation per epoch, shared by every weighting."""
        generator = torch.Generator().manual_seed(seed)
        sched, out, perm = self.schedule, [], None
        for step in range(sched.total_steps):
            within = step % sched.steps_per_epoch
            if within == 0:
                # drawn on the host: the same order on every device
                perm = torch.randperm(self.n, generator=generator).to(self.theta0.device)
            out.append(perm[within * self.cfg.batch_size : (within + 1) * self.cfg.batch_size])
        return out

    def start(self):
        return self.theta0.clone(), torch.zeros_like(self.theta0), torch.zeros_like(self.theta0)

    def test_values(self, w: torch.Tensor, seed: int) -> torch.Tensor:
        """Forward only: g(z) at every evaluation point for one weighting of the scored rows, [evals, n_test]."""
        theta, m, v = self.start()
        values = []
        for step, batch in enumerate(self.batches(seed)):
            theta, m, v = self._step(theta, m, v, w, batch, step + 1)
            if step + 1 in self.schedule.eval_steps:
                values.append(self.task.test_function(self._outputs(theta, self.test.inputs), self.test.targets))
        return torch.stack(values).detach()

    def hvp(self, theta, batch, vectors: torch.Tensor) -> torch.Tensor:
        """The batch loss's Hessian times each row of `vectors` (forward-over-reverse): [V, p] -> [V, p]."""
        batch_gradient = lambda th: self.batch_gradient(th, batch)  # noqa: E731
        return vmap(lambda u: jvp(batch_gradient, (theta,), (u,))[1])(vectors)

    def plain_step(self, state, batch, t: int):
        theta, m, v = state
        return tuple(x.detach() for x in self.update(theta, m, v, self.batch_gradient(theta, batch), t))

    def test_gradients(self, theta: torch.Tensor) -> torch.Tensor:
        """grad_theta g(z_t, theta) for every test point: [n_test, p]."""

        def one(x, y):
            g = lambda th: self.task.test_function(self._outputs(th, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)  # noqa: E731
            return grad(g)(theta)

        return vmap(one)(self.test.inputs, self.test.targets)
