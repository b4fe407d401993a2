"""Projected per-example gradients of Linear layers without ever forming them (LoGra-style).

For a Linear layer with input a_t and output gradient d_t at position t, the per-example gradient of
[W | b] is G = sum_t d_t [a_t; 1]^T  ([out, in+1]). Projecting it with a Kronecker-factored matrix
P_out (x) P_in gives P_out^T G P_in = sum_t (P_out^T d_t)(P_in^T [a_t; 1])^T, so each side is projected
first (cheap) and only the small [k_out, k_in] product is formed per example. The cost is one forward
and one backward pass that computes activation gradients only (no weight gradients).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from tdastore.config import ProjectionConfig
from tdastore.errors import GradientError
from tdastore.grads.projection import derive_seed


def _side_matrix(seed: int, name: str, dim: int, k: int) -> torch.Tensor | None:
    """[dim, k] Gaussian N(0, 1/k), or None (identity) when the side is already no wider than k."""
    if dim <= k:
        return None
    generator = torch.Generator().manual_seed(derive_seed(seed, name, 0))
    return torch.randn(dim, k, generator=generator).mul_(1.0 / math.sqrt(k))


class FactoredLinearGradients:
    """(projected rows [B, K], losses [B], squared full-gradient norms [B]) for the selected Linear layers."""

    def __init__(self, model: nn.Module, loss_fn, patterns: list[str], config: ProjectionConfig):
        self.model, self.loss_fn, self.config = model, loss_fn, config
        selected = {n for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
        if not selected:
            names = [n for n, _ in model.named_parameters()]
            raise GradientError(f"gradients.params {patterns} match no parameter of the model; its parameters are: {names}")
        self.modules: list[tuple[str, nn.Linear, bool]] = []  # (module name, module, bias included)
        covered = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and f"{name}.weight" in selected:
                with_bias = module.bias is not None and f"{name}.bias" in selected
                self.modules.append((name, module, with_bias))
                covered |= {f"{name}.weight"} | ({f"{name}.bias"} if with_bias else set())
        if selected - covered:
            raise GradientError(
                f"projection.kind 'factored' handles the weights (and biases) of nn.Linear layers only; "
                f"these selected parameters are not: {sorted(selected - covered)}. Narrow gradients.params or use "
                "projection.kind sparse/gaussian"
            )
        k_out, k_in = config.factors
        self.p_out, self.p_in, self.dims = [], [], []
        for name, module, with_bias in self.modules:
            d_in = module.in_features + int(with_bias)
            self.p_out.append(_side_matrix(config.seed, f"{name}.out", module.out_features, k_out))
            self.p_in.append(_side_matrix(config.seed, f"{name}.in", d_in, k_in))
            self.dims.append((min(module.out_features, k_out), min(d_in, k_in)))
        self.out_dim = sum(o * i for o, i in self.dims)
        self.numel = sum(m.weight.numel() + (m.out_features if b else 0) for _, m, b in self.modules)

    def spec(self) -> dict:
        return {
            "kind": "factored",
            "in_dim": self.numel,
            "out_dim": self.out_dim,
            "seed": self.config.seed,
            "factors": list(self.config.factors),
            "modules": {name: list(dims) for (name, _, _), dims in zip(self.modules, self.dims)},
        }

    def param_spec(self) -> dict:
        shapes = {}
        for name, module, with_bias in self.modules:
            shapes[f"{name}.weight"] = list(module.weight.shape)
            if with_bias:
                shapes[f"{name}.bias"] = list(module.bias.shape)
        return {"params": shapes, "numel": self.numel}

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captured_inputs: list[torch.Tensor] = []
        captured_outputs: list[torch.Tensor] = []

        def hook(module, args, output):
            captured_inputs.append(args[0].detach())
            captured_outputs.append(output)

        handles = [module.register_forward_hook(hook) for _, module, _ in self.modules]
        try:
            with torch.enable_grad():
                losses = self.loss_fn(self.model(inputs), targets)  # [B]
                # examples are independent, so d(sum of losses)/d(output_b) = d(loss_b)/d(output_b)
                out_grads = torch.autograd.grad(losses.sum(), captured_outputs)
        finally:
            for handle in handles:
                handle.remove()
        batch = inputs.shape[0]
        rows = torch.empty(batch, self.out_dim)  # [B, K]
        sq_norms = torch.zeros(batch)  # [B]
        col = 0
        for (_, _, with_bias), p_out, p_in, dims, acts, grads in zip(
            self.modules, self.p_out, self.p_in, self.dims, captured_inputs, out_grads
        ):
            acts = acts.reshape(batch, -1, acts.shape[-1]).float()  # [B, T, in]
            grads = grads.reshape(batch, -1, grads.shape[-1]).float()  # [B, T, out]
            if with_bias:
                acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1)], dim=2)  # [B, T, in+1]
            sq_norms += _squared_norm_of_sum_of_outer_products(grads, acts)
            left = grads if p_out is None else grads @ p_out  # [B, T, k_out]
            right = acts if p_in is None else acts @ p_in  # [B, T, k_in]
            block = torch.bmm(left.transpose(1, 2), right)  # [B, k_out, k_in]
            rows[:, col : col + dims[0] * dims[1]] = block.reshape(batch, -1)
            col += dims[0] * dims[1]
        return rows, losses.detach(), sq_norms


def _squared_norm_of_sum_of_outer_products(grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """|| sum_t d_t a_t^T ||_F^2 per example = sum_{t,s} (d_t . d_s)(a_t . a_s); [B, T, *] -> [B]."""
    if grads.shape[1] == 1:
        return grads.pow(2).sum((1, 2)) * acts.pow(2).sum((1, 2))
    return (torch.bmm(grads, grads.transpose(1, 2)) * torch.bmm(acts, acts.transpose(1, 2))).sum((1, 2))
