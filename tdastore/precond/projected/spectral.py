"""Spectral operators K = block-diag_l( Q_l diag(d_l) Q_l^T ) over column blocks of the store's space.

`solve` applies K; `transform` applies diag(sqrt d) Q^T, so transform(a) . transform(b) = a^T K b and an
inverse-Hessian query becomes a plain inner-product search over transformed rows. Saved as .npz in the store.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdastore.precond.layers import layer_groups
from tdastore.store.writer import write_npz_atomic


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
        write_npz_atomic(path, arrays)  # a local directory or object storage

    @classmethod
    def load(cls, path: Path, name: str, info: dict) -> SpectralOperator:
        with np.load(io.BytesIO(path.read_bytes())) as data:
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
        params = manifest["gradients"]["params"]
        return layer_groups(list(params), [int(np.prod(shape)) for shape in params.values()])
    if proj["kind"] == "factored":
        groups, col = [], 0
        for k_out, k_in in proj["modules"].values():
            groups.append((col, col + k_out * k_in))
            col += k_out * k_in
        return groups
    return [(0, manifest["dim"])]
