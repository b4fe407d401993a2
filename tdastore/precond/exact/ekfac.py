"""EK-FAC: per-layer Kronecker factors with eigenvalue correction (George et al. 2018; Kronfluence).

For a Linear layer with augmented inputs a = [x; 1] and output gradients d, the Fisher block is
approximated in the eigenbasis of A = E[a a^T] (Q_A) and S = E[d d^T] (Q_S), with the Kronecker
eigenvalues replaced by the exact second moments of the projected per-example gradients:
    Lambda[o, i] = E[ ((Q_S^T G Q_A)[o, i])^2 ],   G = sum_t d_t a_t^T.
Applying (F + lambda I)^-1 to a gradient G: Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T.

A Conv2d layer is a Linear layer applied at every output position to the input patch there (kronfluence's
unfolding): a_t = [patch_t; 1] (F.unfold, channel-major as weight.reshape(out, -1)), d_t = the output gradient
at position t, and G = sum_t d_t a_t^T is the per-example gradient of weight.reshape(out, -1) and the bias.
GPT-2's Conv1D holds its weight as [in, out]: its blocks are transposed on the way in and out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from tdastore.devices import model_device
from tdastore.errors import GradientError
from tdastore.grads.factored import LinearHookGradients, is_conv1d, module_dims
from tdastore.precond.damping import resolve_damping
from tdastore.tasks.base import Examples


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the layer's weight as a matrix: Conv2d's is [out, in * kh * kw]."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module_dims(module)


def layer_tokens(module: nn.Module, acts: torch.Tensor, grads: torch.Tensor, batch: int):
    """Inputs [B, T, in] and output gradients [B, T, out] at every token (Conv2d: every output position, each
    input its unfolded patch)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise GradientError(
                "ekfac unfolds Conv2d layers with groups=1, zero padding given as numbers: this layer has "
                f"groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}"
            )
        patches = F.unfold(acts, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, in, T]
        return patches.transpose(1, 2), grads.flatten(2).transpose(1, 2)
    d_in, d_out = module_dims(module)
    return acts.reshape(batch, -1, d_in), grads.reshape(batch, -1, d_out)


class EkfacFactors(LinearHookGradients):
    """Fitted on the training data; `apply` maps flat gradients [m, p] (weight then bias per layer)."""

    def __init__(
        self, model: nn.Module, loss_fn, patterns: list[str], train: Examples, batch_size: int, damping_factor: float
    ):
        super().__init__(model, loss_fn, patterns, "ekfac", convolutions=True)
        self.out_dim = self.numel
        n = len(train)
        device = model_device(model)
        batches = [train.slice(s, min(s + batch_size, n)).to(device) for s in range(0, n, batch_size)]
        covs = [[None, None] for _ in self.modules]
        for part in batches:
            for index, (acts, grads) in enumerate(self._layer_tensors(part)):
                a_cov = torch.einsum("bti,btj->ij", acts, acts)
                s_cov = torch.einsum("bto,btp->op", grads, grads)
                covs[index][0] = a_cov if covs[index][0] is None else covs[index][0] + a_cov
                covs[index][1] = s_cov if covs[index][1] is None else covs[index][1] + s_cov
        self.q_a, self.q_s = [], []
        for a_cov, s_cov in covs:
            self.q_a.append(torch.linalg.eigh(a_cov / n)[1])
            self.q_s.append(torch.linalg.eigh(s_cov / n)[1])
        self.eigenvalues = [
            torch.zeros(q_s.shape[0], q_a.shape[0], dtype=torch.float64, device=device)
            for q_a, q_s in zip(self.q_a, self.q_s)
        ]
        for part in batches:
            for index, (acts, grads) in enumerate(self._layer_tensors(part)):
                rotated = torch.bmm((grads @ self.q_s[index]).transpose(1, 2), acts @ self.q_a[index])  # [B, out, in+1]
                self.eigenvalues[index] += rotated.pow(2).sum(0)
        for values in self.eigenvalues:
            values /= n
        self.lambda_0 = float(sum(v.sum() for v in self.eigenvalues)) / self.numel
        largest = max(float(v.max()) for v in self.eigenvalues)
        lowest = min(float(v.min()) for v in self.eigenvalues)
        self.damping = resolve_damping(damping_factor, self.lambda_0, largest, lowest)

    def _layer_tensors(self, part: Examples) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: augmented inputs [B, T, in(+1)] and output gradients [B, T, out], float64."""
        _, captured = self.capture(part.inputs, part.targets)
        batch = len(part)
        for (_, module, with_bias), (acts, grads) in zip(self.modules, captured):
            acts, grads = layer_tokens(module, acts, grads, batch)
            acts, grads = acts.double(), grads.double()
            if with_bias:
                acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1)], dim=2)
            yield acts, grads

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """(F_EKFAC + lambda I)^-1 vectors, [m, p] -> [m, p] in the layout weight [out, in] then bias [out]."""
        if vectors.shape[1] != self.numel:
            raise GradientError(f"ekfac: vectors have {vectors.shape[1]} columns, the selected layers {self.numel}")
        out = torch.empty(vectors.shape, dtype=torch.float64, device=vectors.device)
        col, m = 0, vectors.shape[0]
        for (_, module, with_bias), q_a, q_s, values in zip(self.modules, self.q_a, self.q_s, self.eigenvalues):
            n_in, n_out = layer_dims(module)
            flat = vectors[:, col : col + n_out * n_in].double()
            weight = flat.reshape(m, n_in, n_out).transpose(1, 2) if is_conv1d(module) else flat.reshape(m, n_out, n_in)
            blocks = [weight]
            if with_bias:
                blocks.append(vectors[:, col + n_out * n_in : col + n_out * (n_in + 1)].double().unsqueeze(2))
            g = torch.cat(blocks, dim=2)  # [m, out, in(+1)]
            rotated = q_s.T @ g @ q_a / (values + self.damping)
            result = q_s @ rotated @ q_a.T  # [m, out, in(+1)]
            result_weight = result[:, :, :n_in].transpose(1, 2) if is_conv1d(module) else result[:, :, :n_in]
            out[:, col : col + n_out * n_in] = result_weight.reshape(m, -1)
            col += n_out * n_in
            if with_bias:
                out[:, col : col + n_out] = result[:, :, n_in]
                col += n_out
        return out.float()
