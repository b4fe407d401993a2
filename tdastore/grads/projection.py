"""Random projections of per-example gradients, deterministic from (seed, parameter name).

The p x k matrix is never held at once: each parameter's rows are cut into fixed blocks of
`block_rows`, and each block is generated from its own seed derived from (seed, name, block). Two
processes with the same spec therefore build bitwise-identical matrices without any broadcast, and a
block cache bounded by `cache_mb` makes repeated batches a plain matrix product.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from tdastore.config import ProjectionConfig


def derive_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed for one block of one parameter's projection rows."""
    digest = hashlib.sha256(f"{seed}:{name}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Projector:
    """Maps {name: [B, *shape]} per-example gradients to [B, out_dim]."""

    kind = "none"

    def __init__(self, config: ProjectionConfig, shapes: dict[str, tuple[int, ...]]):
        self.config = config
        self.names = list(shapes)
        self.numel = {n: math.prod(s) for n, s in shapes.items()}
        self.in_dim = sum(self.numel.values())

    @property
    def out_dim(self) -> int:
        return self.in_dim

    def spec(self) -> dict:
        """What must match for two stores (or a store and a query) to share a projection."""
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim}

    def project(self, grads: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """{name: [B, *shape]} -> [B, out_dim], written into `out` (any float dtype) when given."""
        batch = next(iter(grads.values())).shape[0]
        out = torch.empty(batch, self.out_dim) if out is None else out  # [B, p]
        column = 0
        for name in self.names:
            out[:, column : column + self.numel[name]].copy_(grads[name].reshape(batch, -1))
            column += self.numel[name]
        return out


class _BlockProjector(Projector):
    """Shared machinery: per-(name, block) generation with a bounded cache."""

    def __init__(self, config: ProjectionConfig, shapes: dict[str, tuple[int, ...]]):
        super().__init__(config, shapes)
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self._cache_bytes = 0
        self._budget = config.cache_mb * 2**20

    @property
    def out_dim(self) -> int:
        return self.config.dim

    def spec(self) -> dict:
        cfg = self.config
        return {**super().spec(), "seed": cfg.seed, "block_rows": cfg.block_rows, **self._extra_spec()}

    def _extra_spec(self) -> dict:
        return {}

    def blocks(self, name: str) -> Iterator[tuple[int, int, int]]:
        """(block index, first row, stop row) over one parameter's flattened entries."""
        rows = self.config.block_rows
        for block, start in enumerate(range(0, self.numel[name], rows)):
            yield block, start, min(start + rows, self.numel[name])

    def _block(self, name: str, block: int, n_rows: int, device=None) -> tuple[torch.Tensor, ...]:
        """The block's matrix, generated on the CPU (the same bits on every device), kept on `device`."""
        key = (name, block, str(device))
        if key in self._cache:
            return self._cache[key]
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, name, block))
        tensors = tuple(t.to(device) for t in self._generate(generator, n_rows))
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._cache_bytes + size <= self._budget:
            self._cache[key] = tensors
            self._cache_bytes += size
        return tensors

    def _generate(self, generator: torch.Generator, n_rows: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def project(self, grads: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        first = next(iter(grads.values()))
        batch, device = first.shape[0], first.device
        total = torch.zeros(batch, self.out_dim, device=device)  # [B, k] accumulated in float32
        for name in self.names:
            flat = grads[name].reshape(batch, -1).float()  # [B, p_name]
            for block, start, stop in self.blocks(name):
                self._apply(total, flat[:, start:stop], self._block(name, block, stop - start, device))
        return total if out is None else out.copy_(total)

    def _apply(self, out: torch.Tensor, rows: torch.Tensor, block: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError


class DenseProjector(_BlockProjector):
    """Gaussian N(0, 1/k) or Rademacher +-1/sqrt(k) entries: E <Pu, Pv> = <u, v>."""

    def __init__(self, config: ProjectionConfig, shapes: dict[str, tuple[int, ...]]):
        super().__init__(config, shapes)
        self.kind = config.kind

    def _generate(self, generator: torch.Generator, n_rows: int) -> tuple[torch.Tensor, ...]:
        k = self.config.dim
        if self.kind == "gaussian":
            block = torch.randn(n_rows, k, generator=generator)  # [rows, k]
        else:
            block = torch.randint(0, 2, (n_rows, k), generator=generator).float().mul_(2).sub_(1)  # [rows, k]
        return (block.mul_(1.0 / math.sqrt(k)),)

    def _apply(self, out: torch.Tensor, rows: torch.Tensor, block: tuple[torch.Tensor, ...]) -> None:
        out.addmm_(rows, block[0])  # [B, rows] @ [rows, k]


class SparseProjector(_BlockProjector):
    """Sparse JL (Kane-Nelson block construction): each input coordinate lands in `nonzeros` columns,
    one per column block of width k / nonzeros, with a random sign and scale 1/sqrt(nonzeros)."""

    kind = "sparse"

    def _extra_spec(self) -> dict:
        return {"nonzeros": self.config.nonzeros}

    def _generate(self, generator: torch.Generator, n_rows: int) -> tuple[torch.Tensor, ...]:
        s = self.config.nonzeros
        width = self.config.dim // s
        offsets = torch.arange(s) * width  # [s]
        cols = torch.randint(0, width, (s, n_rows), generator=generator) + offsets[:, None]  # [s, rows]
        signs = torch.randint(0, 2, (s, n_rows), generator=generator).float().mul_(2).sub_(1)
        return cols, signs.mul_(1.0 / math.sqrt(s))

    def _apply(self, out: torch.Tensor, rows: torch.Tensor, block: tuple[torch.Tensor, ...]) -> None:
        cols, signs = block
        for t in range(cols.shape[0]):
            out.index_add_(1, cols[t], rows * signs[t])  # scatter [B, rows] into [B, k]


def make_projector(config: ProjectionConfig, shapes: dict[str, tuple[int, ...]]) -> Projector:
    if config.kind == "none":
        return Projector(config, shapes)
    if config.kind in ("gaussian", "rademacher"):
        return DenseProjector(config, shapes)
    if config.kind == "sparse":
        return SparseProjector(config, shapes)
    if config.kind == "factored":
        raise ValueError("the factored projection is applied inside FactoredLinearGradients, not by a Projector")
    raise ValueError(f"unknown projection kind '{config.kind}': use none, gaussian, rademacher, sparse or factored")
