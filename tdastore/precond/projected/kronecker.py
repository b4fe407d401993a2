"""K-FAC and EK-FAC in the factored (LoGra) space, for stores of projection.kind factored.

A factored store row holds, per module, G~ = P_out^T G P_in = sum_t d~_t a~_t^T with a~ = P_in^T [a; 1] and
d~ = P_out^T d ([k_out, k_in], row-major). K-FAC approximates the module's Fisher block in that space as
S (x) A with (K-FAC "expand" for sequences)
    A = sum over real tokens a~ a~^T / #tokens,     S = sum over examples and tokens d~ d~^T / #examples,
both [k, k] and eigendecomposed in float64: A = Q_A diag(l_A) Q_A^T, S = Q_S diag(l_S) Q_S^T.
    kfac:   K = (Q_S (x) Q_A) diag(1 / (l_S (x) l_A + lambda)) (Q_S (x) Q_A)^T
    ekfac:  the Kronecker eigenvalues replaced by E[((Q_S^T G~ Q_A)[o, i])^2] over the store's own rows
lambda = damping_factor x lambda_0, lambda_0 the mean eigenvalue over all modules (as the exact EK-FAC).
The statistics need activations and output gradients per token, so fitting runs the model over
attribution.kfac_examples training examples (hooks, one forward and backward each); the result is a
SpectralOperator with one block per module, saved in the store like every projected operator.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from tdastore.errors import ConfigError, StoreError
from tdastore.grads.factored import FactoredLinearGradients
from tdastore.precond.projected.operators import ProjectedOperator
from tdastore.precond.projected.spectral import Block, SpectralOperator, column_groups
from tdastore.precond.registry import FitInputs, register


def factored_covariances(
    computer: FactoredLinearGradients, task, examples, batch_size: int, limit=None, progress: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per module (A [k_in, k_in], S [k_out, k_out]) in float64, from the first `limit` examples."""
    n = len(examples) if limit is None else min(limit, len(examples))
    sums = [[np.zeros((k_in, k_in)), np.zeros((k_out, k_out))] for k_out, k_in in computer.dims]
    tokens = 0.0
    for start in tqdm(range(0, n, batch_size), desc="K-FAC factors", unit="batch", disable=not progress):
        part = examples.slice(start, min(start + batch_size, n))
        _, captured = computer.capture(part.inputs, part.targets)
        mask = task.token_mask(part.inputs)  # [B, T], or None: every position counts
        for index, (acts, grads) in enumerate(captured):
            with_bias = computer.modules[index][2]
            p_out, p_in = computer.p_out[index], computer.p_in[index]
            acts = acts.reshape(len(part), -1, acts.shape[-1]).double()  # [B, T, in]
            grads = grads.reshape(len(part), -1, grads.shape[-1]).double()  # [B, T, out]
            if with_bias:
                acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1)], dim=2)
            a = acts if p_in is None else acts @ p_in.double()  # [B, T, k_in]
            d = grads if p_out is None else grads @ p_out.double()  # [B, T, k_out]
            if mask is None:
                weight = torch.ones(*a.shape[:2], 1, dtype=a.dtype)
            else:
                weight = mask.double()[:, : a.shape[1], None]
            sums[index][0] += torch.einsum("bti,btj->ij", a * weight, a).numpy()
            sums[index][1] += torch.einsum("bto,btp->op", d, d).numpy()
            if index == 0:
                tokens += float(weight.sum())
    return [(a / tokens, s / n) for a, s in sums]


class KroneckerOperator(ProjectedOperator):
    """K-FAC (`kfac`) or EK-FAC (`ekfac`) in a factored store's space, fitted with the model's hooks."""

    settings = ("damping_factor", "kfac_examples")
    correct_eigenvalues = False

    def blocks(self, store) -> list[tuple[int, int]]:
        return column_groups(store.manifest)

    def fit(self, inputs: FitInputs) -> SpectralOperator:
        store, config = inputs.store, inputs.config
        if store.manifest["projection"]["kind"] != "factored":
            raise ConfigError(
                f"operator '{self.name}' on the projected path needs Kronecker factors, i.e. a store built with "
                f"projection.kind: factored (this one is {store.manifest['projection']['kind']}); use "
                "attribution.path: exact for ekfac on small models"
            )
        if inputs.model is None or inputs.task is None:
            raise ConfigError(f"operator '{self.name}' is fitted with the model: pass the model and task")
        computer = FactoredLinearGradients(
            inputs.model,
            inputs.task.per_example_loss,
            config.gradients.params,
            config.projection,
            config.gradients.modules,
        )
        if computer.spec() != store.manifest["projection"]:
            raise StoreError("the model's factored projection differs from the store's: the store's config was edited")
        train = inputs.task.examples("train")
        covariances = factored_covariances(
            computer,
            inputs.task,
            train,
            config.gradients.batch_size,
            config.attribution.kfac_examples,
            inputs.progress,
        )
        groups = column_groups(store.manifest)
        bases, eigenvalues = [], []
        for a_cov, s_cov in covariances:
            l_a, q_a = np.linalg.eigh(a_cov)
            l_s, q_s = np.linalg.eigh(s_cov)
            bases.append(np.kron(q_s, q_a))  # [(o, i), (a, b)] = Q_S[o, a] Q_A[i, b]: row-major [k_out, k_in]
            eigenvalues.append(np.outer(np.clip(l_s, 0, None), np.clip(l_a, 0, None)).ravel())
        if self.correct_eigenvalues:  # EK-FAC: second moments of the stored per-example rows in the eigenbasis
            corrected = [np.zeros(hi - lo) for lo, hi in groups]
            for _, block in store.iter_blocks():
                for (lo, hi), basis, acc in zip(groups, bases, corrected):
                    acc += ((block[:, lo:hi].astype(np.float64) @ basis) ** 2).sum(0)
            eigenvalues = [acc / store.n_rows for acc in corrected]
        lambda_0 = float(sum(v.sum() for v in eigenvalues) / store.dim)
        damping = config.attribution.damping_factor * lambda_0
        blocks = [
            Block(lo, hi, 1.0 / (values + damping), basis)
            for (lo, hi), values, basis in zip(groups, eigenvalues, bases)
        ]
        info = {
            "lambda_0": lambda_0,
            "damping": damping,
            "modules": len(blocks),
            "examples": min(len(train), config.attribution.kfac_examples or len(train)),
        }
        return SpectralOperator(self.name, store.dim, blocks, info)


@register
class Kfac(KroneckerOperator):
    name = "kfac"


@register
class Ekfac(KroneckerOperator):
    name, correct_eigenvalues = "ekfac", True
