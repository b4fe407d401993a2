"""Exact-path operators as registered classes: each applies its K to test gradients [m, p] in full space.

identity             K = I                                   (grad_dot, grad_cos, tracin_final)
gauss_newton         (G + lambda I)^-1 by CG                  (if_gn)
hessian              (H + lambda I)^-1 by CG                  (if_h; lambda raised past H's lowest eigenvalue)
lissa_gauss_newton   truncated Neumann series of gauss_newton (lissa)
generalised          (H + lambda I)^-1, train side grad L_i + Hess L_i dTheta(D)  (if_gen, Proposition 1)
datainf              per-layer Sherman-Morrison (tdastore/precond/layers.py)
ekfac                Kronecker factors with eigenvalue correction per Linear layer (ekfac.py)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.func import grad, jvp, vmap

from tdastore.precond.exact.ekfac import EkfacFactors
from tdastore.precond.exact.space import conjugate_gradients, largest_eigenvalue, lissa
from tdastore.precond.layers import DataInf, layer_groups
from tdastore.precond.registry import Operator, register


class ExactOperator(Operator):
    path = "exact"
    dense = False

    def apply(self, scorer, vectors: torch.Tensor) -> torch.Tensor:
        """K vectors, [m, p] -> [m, p]; `scorer` (an ExactScorer) holds the model's full space and settings."""
        raise NotImplementedError

    def train_rows(self, scorer) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, train-side rows [b, p]): the per-example loss gradients."""
        space = scorer.space
        yield from space.example_grads(space.train)


@register
class Identity(ExactOperator):
    name = "identity"

    def apply(self, scorer, vectors):
        return vectors


class DampedSolve(ExactOperator):
    """(curvature + lambda I)^-1 by batched conjugate gradients, lambda = damping_factor x lambda_0."""

    settings = ("damping_factor", "cg_tol", "cg_max_iter")
    curvature = "gauss_newton"

    def damping(self, scorer) -> float:
        damping, lambda_0 = scorer.space.damping(self.curvature)
        scorer.info.update(damping=damping, lambda_0=lambda_0)
        return damping

    def apply(self, scorer, vectors):
        cfg = scorer.config.attribution
        matvec = scorer.space.operator(self.curvature)
        return conjugate_gradients(matvec, vectors, self.damping(scorer), cfg.cg_tol, cfg.cg_max_iter)


@register
class GaussNewton(DampedSolve):
    name = "gauss_newton"


class HessianSolve(DampedSolve):
    """The true Hessian: lambda is raised past its lowest eigenvalue (attribution.hessian_auto_damping)."""

    settings = DampedSolve.settings + ("hessian_auto_damping",)
    curvature = "hessian"

    def damping(self, scorer) -> float:
        damping = scorer.hessian_damping(super().damping(scorer))
        scorer.info["damping"] = damping
        return damping


@register
class Hessian(HessianSolve):
    name = "hessian"


@register
class Generalised(HessianSolve):
    """Proposition 1: the train side is grad L_i + Hess L_i dTheta(D), dTheta(D) = -(H + lambda I)^-1 grad R(D)."""

    name = "generalised"

    def train_rows(self, scorer):
        space, cfg = scorer.space, scorer.config.attribution
        damping = scorer.hessian_damping(space.damping("hessian")[0])
        rhs = space.mean_loss_grad()[None]
        shift = -conjugate_gradients(space.hvp, rhs, damping, cfg.cg_tol, cfg.cg_max_iter)[0]  # [p]
        scorer.info["shift_norm"] = float(shift.norm())

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


@register
class LissaGaussNewton(ExactOperator):
    """Truncated Neumann series of the damped Gauss-Newton system (stochastic with attribution.lissa_batch_size)."""

    name = "lissa_gauss_newton"
    settings = ("damping_factor", "lissa_depth", "lissa_scale", "lissa_batch_size")

    def apply(self, scorer, vectors):
        space, cfg = scorer.space, scorer.config.attribution
        damping, lambda_0 = space.damping()
        scale = cfg.lissa_scale or 1.1 * (largest_eigenvalue(space.gnvp, space.p, device=space.device) + damping)
        scorer.info.update(damping=damping, lambda_0=lambda_0, lissa_scale=scale, lissa_depth=cfg.lissa_depth)
        return lissa(space.gnvp, vectors, damping, scale, cfg.lissa_depth, sampled=self._minibatch_gnvp(scorer))

    @staticmethod
    def _minibatch_gnvp(scorer):
        size = scorer.config.attribution.lissa_batch_size
        if size is None:
            return None
        generator = torch.Generator().manual_seed(0)
        space = scorer.space

        def sampled(vectors: torch.Tensor, step: int) -> torch.Tensor:
            rows = torch.randint(0, len(space.train), (size,), generator=generator).numpy()
            return space.gnvp(vectors, space.train.take(rows))

        return sampled


@register
class DataInfExact(ExactOperator):
    name = "datainf"

    def apply(self, scorer, vectors):
        space = scorer.space
        blocks = lambda: (b for _, b in space.example_grads(space.train))
        return DataInf(blocks, layer_groups(space.names, space.sizes)).apply_flat(vectors).float()


@register
class EkfacExact(ExactOperator):
    name, settings = "ekfac", ("damping_factor",)

    def apply(self, scorer, vectors):
        space, cfg = scorer.space, scorer.config.attribution
        factors = EkfacFactors(space.model, space.loss_fn, space.names, space.train, cfg.batch_size, cfg.damping_factor)
        scorer.info.update(damping=factors.damping, lambda_0=factors.lambda_0)
        return factors.apply(vectors)
