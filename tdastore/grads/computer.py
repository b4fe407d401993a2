"""One interface for the two ways of getting projected per-example gradients.

- vmap: exact per-example gradients of any nn.Module (torch.func), then a seeded projector
  (none / gaussian / rademacher / sparse). Memory per batch: B x p.
- exact hooks: for kind none on models whose selected parameters are all nn.Linear, the same rows
  written directly from layer inputs and output gradients (no vmap, no intermediate copy).
- factored: hooks on nn.Linear layers, Kronecker-factored projection applied before the per-example
  outer product (LoGra-style). Memory per batch: B x k; cost about one training step.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from tdastore.config import GradientConfig, ProjectionConfig
from tdastore.errors import GradientError
from tdastore.grads.factored import (
    ExactLinearGradients,
    FactoredLinearGradients,
    only_linear_parameters,
    select_parameters,
    with_normaliser,
)
from tdastore.grads.normaliser import Normaliser
from tdastore.grads.per_example import LossFn, PerExampleGradients, squared_norms
from tdastore.grads.projection import make_projector


class GradientComputer(Protocol):
    out_dim: int

    def spec(self) -> dict:
        """The projection's identity (what a query must match)."""

    def param_spec(self) -> dict:
        """The selected parameters and their shapes."""

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (rows [B, out_dim], written into `out` if given; losses [B]; squared full-gradient norms [B])."""


class VmapProjectedGradients:
    """Exact per-example gradients (torch.func) followed by a block-wise seeded projection."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        patterns: list[str],
        projection: ProjectionConfig,
        normaliser: Normaliser | None = None,
    ):
        self.gradients = PerExampleGradients(model, loss_fn, patterns)
        self.projector = make_projector(projection, self.gradients.shapes)
        self.out_dim = self.projector.out_dim
        self.numel = self.gradients.numel
        self.normaliser = normaliser
        device = next(model.parameters()).device
        self.scales = {n: normaliser.scale(n).to(device) for n in self.gradients.names} if normaliser else None

    def spec(self) -> dict:
        return with_normaliser(self.projector.spec(), self.normaliser)

    def param_spec(self) -> dict:
        return self.gradients.spec()

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads, losses = self.gradients(inputs, targets)  # {name: [B, ...]}, [B]
        if self.scales is not None:  # S = D^(1/2) before the projection
            grads = {n: g * self.scales[n] for n, g in grads.items()}
        return self.projector.project(grads, out), losses, squared_norms(grads)


def make_gradient_computer(
    model: nn.Module,
    loss_fn: LossFn,
    gradients: GradientConfig,
    projection: ProjectionConfig,
    normaliser: Normaliser | None = None,
    basis=None,
) -> GradientComputer:
    """normaliser: rows scaled by Adam's second moment before projection (gradients.normalizer; the store's).
    basis: a factored projection's fitted sides (projection.basis pca; the store's, tdastore/grads/basis.py)."""
    if normaliser is not None and normaliser.kind == "adam" and projection.kind == "factored":
        raise GradientError(
            "gradients.normalizer: adam needs the full diagonal, which a factored projection cannot apply: use "
            "adafactor (its rank-one form keeps the projection factored), or a gaussian / sparse projection"
        )
    if projection.kind == "factored":
        return FactoredLinearGradients(
            model, loss_fn, gradients.params, projection, gradients.modules, gradients.full_norms, normaliser, basis
        )
    if gradients.modules:  # module patterns name the parameters for the other computers too
        gradients = GradientConfig(
            params=select_parameters(model, gradients.params, gradients.modules),
            batch_size=gradients.batch_size,
            full_norms=gradients.full_norms,
        )
    if projection.kind == "none" and only_linear_parameters(model, gradients.params):
        return ExactLinearGradients(model, loss_fn, gradients.params, projection, normaliser)  # same rows, ~3x faster
    return VmapProjectedGradients(model, loss_fn, gradients.params, projection, normaliser)
