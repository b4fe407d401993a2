"""The projected path: operators K fitted from the store's rows, in the store's (projected) space.

Every operator is spectral, K = block-diag_l( Q_l diag(d_l) Q_l^T ) over column blocks, fitted in
float64 from second moments streamed over the store (memory k_l^2, never N):

    identity       K = I
    fisher         K = (G + lambda I)^-1,  G = (1/N) sum g g^T (empirical Fisher / Gauss-Newton proxy)
    diagonal       K = (diag G + lambda)^-1
    lissa_fisher   K = the Neumann series of `fisher` truncated at depth J (closed form in the eigenbasis)
    trak           K = G^+ (lambda ~ 0: pseudo-inverse), TRAK with one model
    datainf        K_l = (1/lambda_l)(I - (1/N) sum_i g_il g_il^T / (lambda_l + |g_il|^2)) per layer block
    kfac / ekfac   per-module Kronecker factors in the factored space (factored stores; tdastore/precond/kfac.py)

`solve` applies K; `transform` applies diag(sqrt d) Q^T, so transform(a) . transform(b) = a^T K b and an
inverse-Hessian query becomes a plain inner-product search over transformed rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdastore.config import AttributionConfig
from tdastore.errors import ConfigError, StoreError

PRECOND_DIR = "precond"


@dataclass
class Block:
    start: int
    stop: int
    values: np.ndarray  # d [k_b] float64
    basis: np.ndarray | None = None  # Q [k_b, k_b] float64; None: the standard basis (diagonal)


@dataclass
class SpectralOperator:
    name: str
    dim: int
    blocks: list[Block] = field(default_factory=list)  # no blocks: the identity
    info: dict = field(default_factory=dict)

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """[m, k] -> [m, k] float32 with transform(a) . transform(b) = a^T K b."""
        if not self.blocks:
            return np.asarray(rows, dtype=np.float32)
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)
        for b in self.blocks:
            part = rows[:, b.start : b.stop].astype(np.float64)
            rotated = part if b.basis is None else part @ b.basis
            out[:, b.start : b.stop] = rotated * np.sqrt(b.values)
        return out

    def solve(self, rows: np.ndarray) -> np.ndarray:
        """K rows, [m, k] -> [m, k]."""
        if not self.blocks:
            return np.asarray(rows, dtype=np.float32)
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)
        for b in self.blocks:
            part = rows[:, b.start : b.stop].astype(np.float64)
            if b.basis is None:
                out[:, b.start : b.stop] = part * b.values
            else:
                out[:, b.start : b.stop] = ((part @ b.basis) * b.values) @ b.basis.T
        return out

    def save(self, path: Path) -> None:
        arrays = {"dim": np.array(self.dim)}
        for i, b in enumerate(self.blocks):
            arrays[f"range_{i}"] = np.array([b.start, b.stop])
            arrays[f"values_{i}"] = b.values
            if b.basis is not None:
                arrays[f"basis_{i}"] = b.basis
        tmp = path.with_name(path.name + ".part.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, name: str, info: dict) -> SpectralOperator:
        with np.load(path) as data:
            blocks, i = [], 0
            while f"range_{i}" in data:
                start, stop = data[f"range_{i}"]
                basis = data[f"basis_{i}"] if f"basis_{i}" in data else None
                blocks.append(Block(int(start), int(stop), data[f"values_{i}"], basis))
                i += 1
            return cls(name, int(data["dim"]), blocks, info)


def column_groups(manifest: dict) -> list[tuple[int, int]]:
    """Layer blocks of the store's columns: per module when the layout is known, else one block."""
    proj = manifest["projection"]
    if proj["kind"] == "none":
        groups, col, previous = [], 0, None
        for name, shape in manifest["gradients"]["params"].items():
            size = int(np.prod(shape))
            module = name.rsplit(".", 1)[0]
            if module == previous:
                groups[-1] = (groups[-1][0], col + size)
            else:
                groups.append((col, col + size))
            previous, col = module, col + size
        return groups
    if proj["kind"] == "factored":
        groups, col = [], 0
        for k_out, k_in in proj["modules"].values():
            groups.append((col, col + k_out * k_in))
            col += k_out * k_in
        return groups
    return [(0, manifest["dim"])]


KRONECKER = ("kfac", "ekfac")  # fitted from the model's activations and output gradients (tdastore/precond/kfac.py)


def operator_params(op: str, config: AttributionConfig) -> dict:
    """The settings an operator depends on (its cache key in the store)."""
    if op in KRONECKER:
        return {"damping_factor": config.damping_factor, "kfac_examples": config.kfac_examples}
    if op in ("fisher", "diagonal"):
        return {"damping_factor": config.damping_factor}
    if op == "lissa_fisher":
        return {"damping_factor": config.damping_factor, "depth": config.lissa_depth, "scale": config.lissa_scale}
    return {}


def operator_key(op: str, config: AttributionConfig) -> str:
    params = json.dumps(operator_params(op, config), sort_keys=True)
    return f"{op}-{hashlib.sha256(params.encode()).hexdigest()[:8]}"


def fit_operator(store, op: str, config: AttributionConfig) -> SpectralOperator:
    """Fit operator `op` from the store's rows (streamed; memory bounded by k^2 per block)."""
    k = store.dim
    if op == "identity":
        return SpectralOperator(op, k)
    if op == "datainf":
        return _fit_datainf(store, column_groups(store.manifest))
    if op != "diagonal" and k > config.max_dense_dim:
        raise ConfigError(
            f"operator '{op}' needs a {k:,} x {k:,} matrix, above attribution.max_dense_dim={config.max_dense_dim:,}: "
            "build a projected store (projection.kind: factored / sparse with a smaller dim) or use attribution.path: exact"
        )
    n = store.n_rows
    if op == "diagonal":
        sq = np.zeros(k)
        for _, block in store.iter_blocks():
            sq += (block.astype(np.float64) ** 2).sum(0)
        diag = sq / n
        lam = config.damping_factor * diag.mean()
        return SpectralOperator(op, k, [Block(0, k, 1.0 / (diag + lam))], {"damping": lam, "lambda_0": diag.mean()})
    second = np.zeros((k, k))
    for _, block in store.iter_blocks():
        b = block.astype(np.float64)
        second += b.T @ b
    fisher = second / n
    lambda_0 = float(np.trace(fisher)) / k
    sigma, basis = np.linalg.eigh(fisher)
    sigma = np.clip(sigma, 0.0, None)
    info = {"lambda_0": lambda_0, "largest_eigenvalue": float(sigma[-1])}
    if op == "fisher":
        lam = config.damping_factor * lambda_0
        values = 1.0 / (sigma + lam)
        info["damping"] = lam
    elif op == "lissa_fisher":
        lam = config.damping_factor * lambda_0
        scale = config.lissa_scale or 1.1 * (sigma[-1] + lam)
        ratio = 1.0 - (sigma + lam) / scale
        if np.abs(ratio).max() >= 1.0:
            raise ConfigError(
                f"LiSSA diverges: attribution.lissa_scale={scale:.4g} is below half the largest damped eigenvalue "
                f"{sigma[-1] + lam:.4g}; raise it (or leave it unset for 1.1 x that eigenvalue)"
            )
        values = (1.0 - ratio**config.lissa_depth) / (sigma + lam)
        info.update(damping=lam, scale=scale, depth=config.lissa_depth)
    elif op == "trak":
        if n <= k:
            info["warning"] = f"{n} rows <= {k} columns: G is singular, the pseudo-inverse drops its null space"
        keep = sigma > 1e-8 * sigma[-1]
        values = np.where(keep, 1.0 / np.where(keep, sigma, 1.0), 0.0)
        info["damping"] = 0.0
    else:
        raise ConfigError(f"no projected operator '{op}'")
    return SpectralOperator(op, k, [Block(0, k, values, basis)], info)


def _fit_datainf(store, groups: list[tuple[int, int]]) -> SpectralOperator:
    n = store.n_rows
    sums = np.zeros(len(groups))
    for _, block in store.iter_blocks():
        for i, (lo, hi) in enumerate(groups):
            sums[i] += (block[:, lo:hi].astype(np.float64) ** 2).sum()
    lambdas = [s / (n * (hi - lo)) / 10.0 for s, (lo, hi) in zip(sums, groups)]
    weighted = [np.zeros((hi - lo, hi - lo)) for lo, hi in groups]
    for _, block in store.iter_blocks():
        for (lo, hi), lam, acc in zip(groups, lambdas, weighted):
            g = block[:, lo:hi].astype(np.float64)
            acc += (g / (lam + (g**2).sum(1, keepdims=True))).T @ g
    blocks = []
    for (lo, hi), lam, acc in zip(groups, lambdas, weighted):
        matrix = (np.eye(hi - lo) - acc / n) / lam
        values, basis = np.linalg.eigh(matrix)
        blocks.append(Block(lo, hi, np.clip(values, 0.0, None), basis))
    return SpectralOperator("datainf", store.dim, blocks, {"layer_dampings": lambdas})


def fit_or_load(store, op: str, config: AttributionConfig, ctx=None, progress: bool = False) -> SpectralOperator:
    """The operator saved in the store for these settings, fitted and registered on first use. Kronecker
    operators (kfac, ekfac) also need the model and data: `ctx` (a QueryContext) supplies them."""
    key = operator_key(op, config)
    entry = store.manifest.get("preconditioners", {}).get(key)
    if entry:
        path = store.root / entry["file"]
        if not path.is_file():
            raise StoreError(
                f"store '{store.root}': preconditioner file {entry['file']} is missing; delete its manifest entry or rebuild"
            )
        return SpectralOperator.load(path, op, entry["info"])
    if op in KRONECKER:
        from tdastore.precond.kfac import fit_kronecker

        if ctx is None:
            raise ConfigError(f"operator '{op}' is fitted with the model: pass a query context")
        operator = fit_kronecker(store, ctx, op, progress)
    else:
        operator = fit_operator(store, op, config)
    if op != "identity" and isinstance(store.root, Path):  # object-store stores: fitted per process, not cached
        folder = store.root / PRECOND_DIR
        folder.mkdir(exist_ok=True)
        operator.save(folder / f"{key}.npz")
        store.register(
            "preconditioners",
            key,
            {
                "operator": op,
                "file": f"{PRECOND_DIR}/{key}.npz",
                "params": operator_params(op, config),
                "info": _jsonable(operator.info),
            },
        )
    return operator


def _jsonable(info: dict) -> dict:
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return float(v) if isinstance(v, (np.floating, float)) else v

    return {k: plain(v) for k, v in info.items()}
