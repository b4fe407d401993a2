"""Scores of every method of the table on the exact path (full parameter space, on the model).

score[t, i] = eps * x_t . r_i, where x_t is the method's operator applied to the test gradient
(solved by CG / LiSSA / DataInf / EK-FAC) and r_i the train-side row (the loss gradient, or for
`if_gen` grad L_i + Hess L_i dTheta(D)). eps = 1/n (times lr for tracin_final).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tdastore.config import Config
from tdastore.methods import Method
from tdastore.precond.exact.space import FullSpace, check_solution, lowest_eigenvalue
from tdastore.precond.registry import operator_class
from tdastore.tasks.base import Examples, Task
from tdastore.tasks.measurements import measurement_function


class ExactScorer:
    """Full-space scores for a task's final model; memory bounded by blocks of training rows."""

    def __init__(self, model: torch.nn.Module, task: Task, config: Config):
        self.task, self.config = task, config
        self.measure = measurement_function(task, config.attribution.measurement)  # the test side's g
        self.space = FullSpace(
            model,
            task.per_example_loss,
            self.measure,
            config.gradients.params,
            task.examples("train"),
            config.attribution,
        )
        self.info: dict = {"path": "exact", "params": self.space.p}
        self.cache: dict = {}  # what an operator computed once for this model (a diagonal, ...)
        self._lowest = None

    def test_gradients(self, test: Examples) -> torch.Tensor:
        """grad g(z) for each test input: [m, p]."""
        return torch.cat([b for _, b in self.space.example_grads(test, self.measure)])

    def test_vectors(self, method: Method, test: Examples) -> torch.Tensor:
        """eps * K grad g(z), the test side of the score, [m, p]."""
        g = self.test_gradients(test)
        if method.unit("test"):
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        x = check_solution(self._apply_operator(method, g), method.name)
        if method.normalise_metric:  # x = K g / sqrt(g^T K g)
            x = x / (g * x).sum(1, keepdim=True).clamp_min(1e-30).sqrt()
        scale = 1.0 / self.space.n if self.config.attribution.scale == "paper" else 1.0
        if method.learning_rate:
            scale *= self.config.train.lr
        return x * scale

    def _apply_operator(self, method: Method, g: torch.Tensor) -> torch.Tensor:
        return self.operator(method).apply(self, g)

    @staticmethod
    def operator(method: Method):
        return operator_class("exact", method.operator("exact"))()

    def hessian_damping(self, damping: float) -> float:
        """A final model is rarely at a minimum: its Hessian has negative eigenvalues. With
        attribution.hessian_auto_damping, lambda is raised to 1.5 x |lowest eigenvalue| when that is larger."""
        if not self.config.attribution.hessian_auto_damping:
            return damping
        if self._lowest is None:  # one Lanczos run per scorer, shared by if_h and if_gen
            self._lowest = lowest_eigenvalue(self.space.hvp, self.space.p, device=self.space.device)
        self.info["hessian_lowest_eigenvalue"] = self._lowest
        return max(damping, -1.5 * self._lowest)

    def train_rows(self, method: Method) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, train-side rows [b, p]) in store order."""
        operator = self.operator(method)
        for start, block in operator.train_rows(self):
            yield start, self.train_side(method, block, operator)

    def train_side(self, method: Method, block: torch.Tensor, operator=None) -> torch.Tensor:
        """Train-side rows [b, p] of raw rows: unit-normalised (cosine, attribution.normalize) and, for adam_cos,
        normalised in the operator's metric, g_i / sqrt(g_i^T K g_i)."""
        block = self._normalised(method, block)
        if method.normalise_metric:
            operator = operator or self.operator(method)
            block = block / (block * operator.apply(self, block)).sum(1, keepdim=True).clamp_min(1e-30).sqrt()
        return block

    @staticmethod
    def _normalised(method: Method, block: torch.Tensor) -> torch.Tensor:
        return block / block.norm(dim=1, keepdim=True).clamp_min(1e-30) if method.unit("train") else block

    def scores(self, method: Method, test: Examples) -> torch.Tensor:
        """The full score matrix [m, n] (use `score_blocks` to stream it)."""
        return torch.cat([block for _, block in self.score_blocks(method, test)], dim=1)

    def score_blocks(self, method: Method, test: Examples) -> Iterator[tuple[int, torch.Tensor]]:
        x = self.test_vectors(method, test)  # [m, p]
        for start, rows in self.train_rows(method):
            yield start, x @ rows.T  # [m, b]
