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

import functools

import numpy as np
from tqdm import tqdm

from tdastore.devices import model_device
from tdastore.errors import ConfigError, StoreError
from tdastore.grads.factored import FactoredLinearGradients, KroneckerStatistics
from tdastore.precond.damping import resolve_damping
from tdastore.precond.projected.operators import ProjectedOperator
from tdastore.precond.projected.spectral import Block, SpectralOperator, column_groups
from tdastore.precond.registry import FitInputs, register
from tdastore.store.fitted import store_basis
from tdastore.store.writer import read_shard_statistics


def factored_covariances(
    computer: FactoredLinearGradients, task, examples, batch_size: int, limit=None, progress: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per module (A [k_in, k_in], S [k_out, k_out]) in float64, from the first `limit` examples (a separate
    pass over the data, for stores built without the statistics or a kfac_examples subset)."""
    n = len(examples) if limit is None else min(limit, len(examples))
    statistics = KroneckerStatistics(computer, task.token_mask)
    device = model_device(computer.model)
    for start in tqdm(range(0, n, batch_size), desc="K-FAC factors", unit="batch", disable=not progress):
        part = examples.slice(start, min(start + batch_size, n)).to(device)
        _, captured = computer.capture(part.inputs, part.targets)
        statistics.add(captured, part.inputs)
    return KroneckerStatistics.reduce([statistics.arrays()])


def eigenbasis_moments(block: np.ndarray, groups: list[tuple[int, int]], bases: list[np.ndarray]) -> list:
    """Per module: the sum over the block's rows of (row_module @ Q)^2, float64 [k_module]."""
    return [((block[:, lo:hi].astype(np.float64) @ basis) ** 2).sum(0) for (lo, hi), basis in zip(groups, bases)]


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
            basis=store_basis(store.root),  # the store's fitted sides (projection.basis pca), else random
        )
        if computer.spec() != store.manifest["projection"]:
            raise StoreError("the model's factored projection differs from the store's: the store's config was edited")
        train = inputs.task.examples("train")
        limit = config.attribution.kfac_examples
        gathered = read_shard_statistics(store.root, store.manifest) if limit is None else None
        if gathered is not None:  # summed by the build's workers from the hooks' own pass: no second pass
            covariances = KroneckerStatistics.reduce(gathered)
        else:
            batch = config.gradients.batch_size
            covariances = factored_covariances(computer, inputs.task, train, batch, limit, inputs.progress)
        groups = column_groups(store.manifest)
        bases, eigenvalues = [], []
        for a_cov, s_cov in covariances:
            l_a, q_a = np.linalg.eigh(a_cov)
            l_s, q_s = np.linalg.eigh(s_cov)
            bases.append(np.kron(q_s, q_a))  # [(o, i), (a, b)] = Q_S[o, a] Q_A[i, b]: row-major [k_out, k_in]
            eigenvalues.append(np.outer(np.clip(l_s, 0, None), np.clip(l_a, 0, None)).ravel())
        if self.correct_eigenvalues:  # EK-FAC: second moments of the stored per-example rows in the eigenbasis
            sums = inputs.over_blocks(functools.partial(eigenbasis_moments, groups=groups, bases=bases))
            eigenvalues = [sum(parts) / store.n_rows for parts in zip(*sums)]
        lambda_0 = float(sum(v.sum() for v in eigenvalues) / store.dim)
        largest, lowest = max(v.max() for v in eigenvalues), min(v.min() for v in eigenvalues)
        damping = resolve_damping(config.attribution.damping_factor, lambda_0, largest, lowest)
        blocks = [
            Block(lo, hi, 1.0 / (values + damping), basis)
            for (lo, hi), values, basis in zip(groups, eigenvalues, bases)
        ]
        info = {
            "factors": "build" if gathered is not None else "separate pass",
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
