"""EK-FAC: per-Linear-layer Kronecker factors with eigenvalue correction (George et al. 2018; Kronfluence).

For a Linear layer with augmented inputs a = [x; 1] and output gradients d, the Fisher block is
approximated in the eigenbasis of A = E[a a^T] (Q_A) and S = E[d d^T] (Q_S), with the Kronecker
eigenvalues replaced by the exact second moments of the projected per-example gradients:
    Lambda[o, i] = E[ ((Q_S^T G Q_A)[o, i])^2 ],   G = sum_t d_t a_t^T.
Applying (F + lambda I)^-1 to a gradient G: Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tdastore.devices import model_device
from tdastore.errors import GradientError
from tdastore.grads.factored import LinearHookGradients
from tdastore.precond.damping import resolve_damping
from tdastore.tasks.base import Examples


class EkfacFactors(LinearHookGradients):
    """Fitted on the training data; `apply` maps flat gradients [m, p] (weight then bias per layer)."""

    def __init__(
        self, model: nn.Module, loss_fn, patterns: list[str], train: Examples, batch_size: int, damping_factor: float
    ):
        super().__init__(model, loss_fn, patterns, "ekfac")
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
            acts = acts.reshape(batch, -1, module.in_features).double()
            grads = grads.reshape(batch, -1, module.out_features).double()
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
            n_out, n_in = module.out_features, module.in_features
            weight = vectors[:, col : col + n_out * n_in].double().reshape(m, n_out, n_in)
            blocks = [weight]
            if with_bias:
                blocks.append(vectors[:, col + n_out * n_in : col + n_out * (n_in + 1)].double().unsqueeze(2))
            g = torch.cat(blocks, dim=2)  # [m, out, in(+1)]
            rotated = q_s.T @ g @ q_a / (values + self.damping)
            result = q_s @ rotated @ q_a.T  # [m, out, in(+1)]
            out[:, col : col + n_out * n_in] = result[:, :, :n_in].reshape(m, -1)
            col += n_out * n_in
            if with_bias:
                out[:, col : col + n_out] = result[:, :, n_in]
                col += n_out
        return out.float()
