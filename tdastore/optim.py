"""torch.optim's SGD / Adam / AdamW update formulas with gradient-norm clipping, written once.

The replica engine applies them in place to stacked [R, ...] parameters (per-replica step counts and masks);
the metagradient composes them functionally on one flat vector and differentiates through them; adam_replay
(precond/exact/replay.py) steps them on frozen gradients. All call the pieces below, so the gold standard, its
metagradient and the replay follow the same optimizer by construction (a layer below all three).
"""

from __future__ import annotations

import torch

from tdastore.config import GroundTruthConfig

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class UpdateRule:
    """The pieces of one optimizer update under a ground truth's settings."""

    def __init__(self, cfg: GroundTruthConfig):
        self.cfg = cfg
        self.adaptive = cfg.optimizer != "sgd"

    def clip_coefficient(self, norm: torch.Tensor) -> torch.Tensor | None:
        """Gradients are scaled by this (<= 1) so their norm is at most clip_norm; None: no clipping."""
        if self.cfg.clip_norm is None:
            return None
        return (self.cfg.clip_norm / (norm + CLIP_EPS)).clamp(max=1.0)

    def coupled_gradient(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """SGD and Adam add weight decay to the gradient (AdamW decays the weights instead)."""
        if self.cfg.weight_decay and self.cfg.optimizer != "adamw":
            return grad + self.cfg.weight_decay * param
        return grad

    def decoupled_decay(self, param: torch.Tensor) -> torch.Tensor | None:
        """AdamW's decay, the amount subtracted from the weights before the Adam step; None otherwise."""
        if self.cfg.optimizer == "adamw" and self.cfg.weight_decay:
            return self.cfg.lr * self.cfg.weight_decay * param
        return None

    def sgd_step(self, grad: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """lr * grad; in_place: written over grad (the replica engine's [R, ...] gradients, spent after)."""
        return grad.mul_(self.cfg.lr) if in_place else self.cfg.lr * grad

    @staticmethod
    def moments(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return BETA1 * m + (1 - BETA1) * grad, BETA2 * v + (1 - BETA2) * grad * grad

    @staticmethod
    def bias_corrections(steps):
        """(1 - beta1^t, 1 - beta2^t) for step counts t (a number, or a float64 tensor per replica)."""
        return 1 - BETA1**steps, 1 - BETA2**steps

    def adam_step(self, m: torch.Tensor, v: torch.Tensor, bias1, bias2) -> torch.Tensor:
        """The amount Adam subtracts: lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps).

        sqrt has an infinite slope at 0 (entries with zero gradient so far): the double `where` keeps the
        forward value and gives those entries a zero (not NaN) derivative."""
        positive = v > 0
        root = torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))
        return (self.cfg.lr / bias1) * m / (root / bias2**0.5 + ADAM_EPS)

    def adam_step_(self, delta: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, t: int) -> None:
        """moments + adam_step in place, for runs nothing differentiates through (adam_replay): delta, m, v [r, w]
        updated where they lie, two passes over the state instead of about ten temporaries."""
        m.mul_(BETA1).add_(grad, alpha=1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        bias1, bias2 = self.bias_corrections(t)
        delta.addcdiv_(m, v.sqrt().div_(bias2**0.5).add_(ADAM_EPS), value=-self.cfg.lr / bias1)
