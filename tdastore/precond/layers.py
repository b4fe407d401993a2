"""Per-layer structure shared by both paths: the one layer grouping and the one DataInf.

DataInf (Kwon et al. 2024) swaps averaging and inversion per layer l (Sherman-Morrison on each example):
    (G_l + lambda_l I)^-1 v ~ (1/lambda_l) (v - (1/n) sum_i (v . g_il) / (lambda_l + |g_il|^2) g_il),
    lambda_l = mean_i mean(g_il^2) / 10.
The exact path applies it to test gradients; the projected path applies it to the identity of each layer
block (giving K_l itself, to eigendecompose for FAISS). Both stream training rows twice, memory bounded by
the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

Blocks = Callable[[], Iterator[torch.Tensor]]  # () -> training rows [b, p], in order, each call a fresh pass


def layer_groups(names: list[str], sizes: list[int]) -> list[tuple[int, int]]:
    """Column ranges of a flat gradient grouped by module (a layer's weight and bias together)."""
    groups: list[tuple[int, int]] = []
    column, previous = 0, None
    for name, size in zip(names, sizes):
        module = name.rsplit(".", 1)[0]
        if module == previous:
            groups[-1] = (groups[-1][0], column + size)
        else:
            groups.append((column, column + size))
        previous = module
        column += size
    return groups


class DataInf:
    """Per-layer dampings from one pass over the training rows; `apply` is the second pass."""

    def __init__(self, make_blocks: Blocks, groups: list[tuple[int, int]]):
        self.make_blocks, self.groups = make_blocks, groups
        n, sums = 0, [0.0] * len(groups)
        for block in make_blocks():
            n += block.shape[0]
            for index, (lo, hi) in enumerate(groups):
                sums[index] += float(block[:, lo:hi].double().pow(2).sum())
        self.n = n
        self.lambdas = [total / (n * (hi - lo)) / 10.0 for total, (lo, hi) in zip(sums, groups)]

    def apply(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, vectors [m_l, p_l] -> the DataInf operator applied to them, float64 [m_l, p_l]."""
        corrections = [torch.zeros(v.shape, dtype=torch.float64, device=v.device) for v in vectors]
        for block in self.make_blocks():
            for (lo, hi), lam, v, correction in zip(self.groups, self.lambdas, vectors, corrections):
                g = block[:, lo:hi].double()  # [b, p_l]
                weights = (v.double() @ g.T) / (lam + g.pow(2).sum(1))  # [m_l, b]
                correction += weights @ g
        return [(v.double() - c / self.n) / lam for v, c, lam in zip(vectors, corrections, self.lambdas)]

    def apply_flat(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [m, p] (every layer's columns side by side) -> [m, p] float64."""
        parts = self.apply([vectors[:, lo:hi] for lo, hi in self.groups])
        return torch.cat(parts, dim=1)

    def layer_matrices(self) -> list[torch.Tensor]:
        """K_l [p_l, p_l] per layer (the operator applied to each layer's identity)."""
        return self.apply([torch.eye(hi - lo, dtype=torch.float64) for lo, hi in self.groups])
