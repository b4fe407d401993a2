"""The projected path: operators K fitted from the store's rows, in the store's (projected) space.

Every operator is spectral, K = block-diag_l( Q_l diag(d_l) Q_l^T ) over column blocks, fitted in
float64 from second moments streamed over the store (memory k_l^2, never N):

    identity       K = I
    fisher         K = (G + lambda I)^-1,  G = (1/N) sum g g^T (empirical Fisher / Gauss-Newton proxy)
    diagonal       K = (diag G + lambda)^-1
    lissa_fisher   K = the Neumann series of `fisher` truncated at depth J (closed form in the eigenbasis)
    trak           K = G^+ (lambda ~ 0: pseudo-inverse), TRAK with one model
    datainf        K_l = (1/lambda_l)(I - (1/N) sum_i g_il g_il^T / (lambda_l + |g_il|^2)) per layer block
    kfac / ekfac   per-module Kronecker factors in the factored space (kronecker.py)
"""

from __future__ import annotations

import numpy as np
import torch

from tdastore.config import AttributionConfig
from tdastore.errors import ConfigError
from tdastore.precond.damping import resolve_damping
from tdastore.precond.layers import DataInf
from tdastore.precond.projected.spectral import Block, SpectralOperator, column_groups
from tdastore.precond.registry import FitInputs, Operator, register


class ProjectedOperator(Operator):
    path = "projected"

    def fit(self, inputs: FitInputs) -> SpectralOperator:
        raise NotImplementedError

    def check_size(self, store, config: AttributionConfig) -> None:
        """Refuse, before any pass over the data, a dense matrix above attribution.max_dense_dim."""
        if not self.dense:
            return
        width = max(hi - lo for lo, hi in self.blocks(store))
        if width > config.max_dense_dim:
            raise ConfigError(
                f"operator '{self.name}' needs a {width:,} x {width:,} matrix, above attribution.max_dense_dim="
                f"{config.max_dense_dim:,}: build a projected store (projection.kind: factored / sparse with a smaller "
                "dim) or use attribution.path: exact"
            )

    def blocks(self, store) -> list[tuple[int, int]]:
        """The column blocks this operator holds a dense matrix for."""
        return [(0, store.dim)]


@register
class Identity(ProjectedOperator):
    name, dense = "identity", False

    def fit(self, inputs: FitInputs) -> SpectralOperator:
        return SpectralOperator(self.name, inputs.store.dim)


@register
class Diagonal(ProjectedOperator):
    name, dense, settings = "diagonal", False, ("damping_factor",)

    def fit(self, inputs: FitInputs) -> SpectralOperator:
        store, k = inputs.store, inputs.store.dim
        sq = np.zeros(k)
        for _, block in store.iter_blocks():
            sq += (block.astype(np.float64) ** 2).sum(0)
        diag = sq / store.n_rows
        lam = resolve_damping(inputs.config.attribution.damping_factor, diag.mean(), diag.max(), diag.min())
        return SpectralOperator(
            self.name, k, [Block(0, k, 1.0 / (diag + lam))], {"damping": lam, "lambda_0": diag.mean()}
        )


class SecondMomentOperator(ProjectedOperator):
    """K is a function of the eigendecomposition of G = (1/N) sum_i g_i g_i^T (one streamed pass, k x k)."""

    def fit(self, inputs: FitInputs) -> SpectralOperator:
        store, k = inputs.store, inputs.store.dim
        second = np.zeros((k, k))
        for _, block in store.iter_blocks():
            b = block.astype(np.float64)
            second += b.T @ b
        fisher = second / store.n_rows
        lambda_0 = float(np.trace(fisher)) / k
        sigma, basis = np.linalg.eigh(fisher)
        sigma = np.clip(sigma, 0.0, None)
        info = {"lambda_0": lambda_0, "largest_eigenvalue": float(sigma[-1])}
        values = self.eigenvalues(sigma, lambda_0, inputs.config.attribution, store.n_rows, info)
        return SpectralOperator(self.name, k, [Block(0, k, values, basis)], info)

    def eigenvalues(self, sigma: np.ndarray, lambda_0: float, config: AttributionConfig, n: int, info: dict):
        """K's eigenvalues d [k] from G's (sigma [k], ascending); facts worth reporting go into `info`."""
        raise NotImplementedError


@register
class Fisher(SecondMomentOperator):
    name, settings = "fisher", ("damping_factor",)

    def eigenvalues(self, sigma, lambda_0, config, n, info):
        info["damping"] = lam = resolve_damping(config.damping_factor, lambda_0, sigma[-1], sigma[0])
        return 1.0 / (sigma + lam)


@register
class LissaFisher(SecondMomentOperator):
    """The Neumann series of `fisher` truncated at depth J, in closed form in G's eigenbasis."""

    name, settings = "lissa_fisher", ("damping_factor", "lissa_depth", "lissa_scale")

    @classmethod
    def params(cls, config: AttributionConfig) -> dict:  # the names fitted operators were saved under
        return {"damping_factor": config.damping_factor, "depth": config.lissa_depth, "scale": config.lissa_scale}

    def eigenvalues(self, sigma, lambda_0, config, n, info):
        lam = resolve_damping(config.damping_factor, lambda_0, sigma[-1], sigma[0])
        scale = config.lissa_scale or 1.1 * (sigma[-1] + lam)
        ratio = 1.0 - (sigma + lam) / scale
        if np.abs(ratio).max() >= 1.0:
            raise ConfigError(
                f"LiSSA diverges: attribution.lissa_scale={scale:.4g} is below half the largest damped eigenvalue "
                f"{sigma[-1] + lam:.4g}; raise it (or leave it unset for 1.1 x that eigenvalue)"
            )
        info.update(damping=lam, scale=scale, depth=config.lissa_depth)
        return (1.0 - ratio**config.lissa_depth) / (sigma + lam)


@register
class Trak(SecondMomentOperator):
    """TRAK with one model: the pseudo-inverse of G (lambda ~ 0)."""

    name = "trak"

    def eigenvalues(self, sigma, lambda_0, config, n, info):
        if n <= len(sigma):
            info["warning"] = (
                f"{n} rows <= {len(sigma)} columns: G is singular, the pseudo-inverse drops its null space"
            )
        keep = sigma > 1e-8 * sigma[-1]
        info["damping"] = 0.0
        return np.where(keep, 1.0 / np.where(keep, sigma, 1.0), 0.0)


@register
class DataInfOperator(ProjectedOperator):
    """DataInf per layer block of the store's columns (tdastore/precond/layers.py), eigendecomposed."""

    name = "datainf"

    def blocks(self, store) -> list[tuple[int, int]]:
        return column_groups(store.manifest)

    def fit(self, inputs: FitInputs) -> SpectralOperator:
        store = inputs.store
        groups = self.blocks(store)
        datainf = DataInf(lambda: (torch.from_numpy(block) for _, block in store.iter_blocks()), groups)
        blocks = []
        for (lo, hi), matrix in zip(groups, datainf.layer_matrices()):
            values, basis = np.linalg.eigh(matrix.numpy())
            blocks.append(Block(lo, hi, np.clip(values, 0.0, None), basis))
        return SpectralOperator(self.name, store.dim, blocks, {"layer_dampings": datainf.lambdas})
