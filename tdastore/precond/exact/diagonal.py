"""Diagonal operators in full parameter space: the optimizer-aware rows (adam_dot, adam_cos) and the damped
diagonal empirical Fisher (if_diag).

adam            K = diag(1 / (sqrt(v) + eps)): the first-order effect of dropping a row when the further training
                is Adam's, which rescales each coordinate by its second moment v. v is read from the user's saved
                optimizer state (attribution.optimizer_state: a torch optimizer state_dict, e.g. the optimizer.pt
                of a Hugging Face Trainer; exp_avg_sq, bias-corrected, matched by parameter name), else estimated
                at the final model as the mean of the further training's squared minibatch gradients over one
                epoch (its batch size, batch order of seed 0, weight decay coupling and clipping). The mean, not
                Adam's EMA: at a fixed model an EMA with beta2 = 0.999 over a few hundred steps is, after bias
                correction, close to a plain mean of the same squares, and the mean does not depend on where the
                epoch is cut.
diagonal        K = diag(1 / (F + lambda)), F the mean squared per-example gradient (the empirical Fisher's
                diagonal), lambda = damping_factor x lambda_0 (lambda_0 = mean F): the projected path's if_diag in
                full space, for SGD further training.
"""

from __future__ import annotations

import torch

from tdastore.grads.normaliser import second_moment, state_second_moment
from tdastore.precond.exact.operators import ExactOperator
from tdastore.precond.registry import register


class DiagonalOperator(ExactOperator):
    """K = diag(d): applied coordinate-wise; d [p] is computed once per scorer and kept."""

    def diagonal(self, scorer) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, scorer, vectors):
        key = (self.name, *(repr(v) for v in self.params(scorer.config.attribution).values()))
        if key not in scorer.cache:
            scorer.cache[key] = self.diagonal(scorer)
        return vectors * scorer.cache[key]  # [m, p] * [p]


@register
class AdamSecondMoment(DiagonalOperator):
    name = "adam"
    settings = ("adam_eps", "optimizer_state")

    def diagonal(self, scorer):
        cfg = scorer.config.attribution
        space = scorer.space
        if cfg.optimizer_state:
            v, source = state_second_moment(cfg.optimizer_state, space.names, space.shapes), cfg.optimizer_state
        else:
            v, source = schedule_second_moment(space, scorer.config.groundtruth), "further-training schedule"
        v = v.to(space.theta)
        scorer.info.update(adam_eps=cfg.adam_eps, second_moment=source, sqrt_v_mean=float(v.sqrt().mean()))
        return 1.0 / (v.sqrt() + cfg.adam_eps)


@register
class DiagonalFisher(DiagonalOperator):
    name = "diagonal"
    settings = ("damping_factor",)

    def diagonal(self, scorer):
        space = scorer.space
        fisher = torch.zeros(space.p, dtype=torch.float64, device=space.device)
        for _, block in space.example_grads(space.train):
            fisher += block.double().pow(2).sum(0)
        fisher = (fisher / space.n).to(space.theta.dtype)  # [p]
        damping, lambda_0 = space.damping("gauss_newton")
        scorer.info.update(damping=damping, lambda_0=lambda_0)
        return 1.0 / (fisher + damping)


def schedule_second_moment(space, gt) -> torch.Tensor:
    """v [p] in the full space's parameter order (tdastore/grads/normaliser.py: second_moment)."""
    moments = second_moment(space.model, space.loss_fn, space.train, space.names, gt)
    return torch.cat([moments[n].reshape(-1) for n in space.names])
