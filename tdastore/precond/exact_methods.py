"""Scores of every method of the table on the exact path (full parameter space, on the model).

score[t, i] = eps * x_t . r_i, where x_t is the method's operator applied to the test gradient
(solved by CG / LiSSA / DataInf / EK-FAC) and r_i the train-side row (the loss gradient, or for
`if_gen` grad L_i + Hess L_i dTheta(D)). eps = 1/n (times lr for tracin_final).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.func import grad, jvp, vmap

from tdastore.config import Config
from tdastore.methods import Method
from tdastore.precond.ekfac import EkfacOperator
from tdastore.precond.exact import (
    FullSpace,
    check_solution,
    conjugate_gradients,
    datainf_apply,
    largest_eigenvalue,
    layer_groups,
    lissa,
    lowest_eigenvalue,
)
from tdastore.tasks.base import Examples, Task


class ExactScorer:
    """Full-space scores for a task's final model; memory bounded by blocks of training rows."""

    def __init__(self, model: torch.nn.Module, task: Task, config: Config):
        self.task, self.config = task, config
        self.space = FullSpace(
            model,
            task.per_example_loss,
            task.test_function,
            config.gradients.params,
            task.examples("train"),
            config.attribution,
        )
        self.info: dict = {"path": "exact", "params": self.space.p}
        self._lowest = None

    def test_gradients(self, test: Examples) -> torch.Tensor:
        """grad g(z) for each test input: [m, p]."""
        return torch.cat([b for _, b in self.space.example_grads(test, self.task.test_function)])

    def test_vectors(self, method: Method, test: Examples) -> torch.Tensor:
        """eps * K grad g(z), the test side of the score, [m, p]."""
        g = self.test_gradients(test)
        if method.normalise:
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        x = check_solution(self._apply_operator(method, g), method.name)
        scale = 1.0 / self.space.n
        if method.learning_rate:
            scale *= self.config.train.lr
        return x * scale

    def _apply_operator(self, method: Method, g: torch.Tensor) -> torch.Tensor:
        op = method.operator("exact")
        cfg, space = self.config.attribution, self.space
        if op == "identity":
            return g
        if op == "datainf":
            return datainf_apply(
                lambda: (b for _, b in space.example_grads(space.train)), g, layer_groups(space.names, space.sizes)
            )
        if op == "ekfac":
            ekfac = EkfacOperator(
                space.model, space.loss_fn, space.names, space.train, cfg.batch_size, cfg.damping_factor
            )
            self.info.update(damping=ekfac.damping, lambda_0=ekfac.lambda_0)
            return ekfac.apply(g)
        damping, lambda_0 = space.damping()
        if op in ("hessian", "generalised"):
            damping = self._hessian_damping(damping)
        self.info.update(damping=damping, lambda_0=lambda_0)
        if op in ("gauss_newton", "hessian"):
            return conjugate_gradients(space.operator(op), g, damping, cfg.cg_tol, cfg.cg_max_iter)
        if op == "lissa_gauss_newton":
            scale = cfg.lissa_scale or 1.1 * (largest_eigenvalue(space.gnvp, space.p) + damping)
            self.info.update(lissa_scale=scale, lissa_depth=cfg.lissa_depth)
            return lissa(space.gnvp, g, damping, scale, cfg.lissa_depth, sampled=self._minibatch_gnvp())
        if op == "generalised":
            return conjugate_gradients(space.hvp, g, damping, cfg.cg_tol, cfg.cg_max_iter)
        raise ValueError(f"no exact operator '{op}'")

    def _hessian_damping(self, damping: float) -> float:
        """A final model is rarely at a minimum: its Hessian has negative eigenvalues. With
        attribution.hessian_auto_damping, lambda is raised to 1.5 x |lowest eigenvalue| when that is larger."""
        if not self.config.attribution.hessian_auto_damping:
            return damping
        if self._lowest is None:  # one Lanczos run per scorer, shared by if_h and if_gen
            self._lowest = lowest_eigenvalue(self.space.hvp, self.space.p)
        self.info["hessian_lowest_eigenvalue"] = self._lowest
        return max(damping, -1.5 * self._lowest)

    def _minibatch_gnvp(self):
        size = self.config.attribution.lissa_batch_size
        if size is None:
            return None
        generator = torch.Generator().manual_seed(0)
        train = self.space.train

        def sampled(vectors: torch.Tensor, step: int) -> torch.Tensor:
            rows = torch.randint(0, len(train), (size,), generator=generator).numpy()
            part = train.take(rows)
            return self.space.gnvp(vectors, part)

        return sampled

    def train_rows(self, method: Method) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, train-side rows [b, p]) in store order."""
        space = self.space
        if method.exact != "generalised":
            for start, block in space.example_grads(space.train):
                yield start, self._normalised(method, block)
            return
        damping = self._hessian_damping(space.damping()[0])
        cfg = self.config.attribution
        # dTheta(D) = -(H + lambda I)^-1 grad R(D): where further training would move theta_f
        shift = -conjugate_gradients(space.hvp, space.mean_loss_grad()[None], damping, cfg.cg_tol, cfg.cg_max_iter)[0]
        self.info["shift_norm"] = float(shift.norm())

        def one(theta, x, y):
            return space.loss_fn(space.outputs(theta, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)

        def grad_and_hvp(x, y):
            return jvp(lambda t: grad(one)(t, x, y), (space.theta,), (shift,))  # (grad L_i, Hess L_i shift)

        per_example = vmap(grad_and_hvp)
        start = 0
        for part in space.batches(space.train):
            g, h_shift = per_example(part.inputs, part.targets)
            yield start, g + h_shift
            start += len(part)

    @staticmethod
    def _normalised(method: Method, block: torch.Tensor) -> torch.Tensor:
        return block / block.norm(dim=1, keepdim=True).clamp_min(1e-30) if method.normalise else block

    def scores(self, method: Method, test: Examples) -> torch.Tensor:
        """The full score matrix [m, n] (use `score_blocks` to stream it)."""
        return torch.cat([block for _, block in self.score_blocks(method, test)], dim=1)

    def score_blocks(self, method: Method, test: Examples) -> Iterator[tuple[int, torch.Tensor]]:
        x = self.test_vectors(method, test)  # [m, p]
        for start, rows in self.train_rows(method):
            yield start, x @ rows.T  # [m, b]
