"""Data-dependent sides of the factored projection (projection.basis: pca), LoGra's PCA initialisation.

A random Kronecker projection P_out^T G P_in keeps a per-example gradient's inner products only on average, and
each side is a k-column sketch of its own: at 16 x 16 the product's error is of the order of a 16-column Gaussian
projection's, not a 256-column one's. Projecting each side onto the top eigenvectors of the training gradients' own
second moments instead,
    C_out = sum_i G_i G_i^T  [d_out, d_out],    C_in = sum_i G_i^T G_i  [d_in, d_in],
keeps the k_out x k_in directions where the gradients carry most of their energy (per side, Eckart-Young), so a
stored inner product is the exact one restricted to that subspace: biased towards the dominant directions,
with no sampling noise. G_i is a block's per-example gradient exactly as its rows see it (the normaliser's
scales applied, a tied weight's uses summed), over the first projection.basis_examples training examples, in
float64. The bases are orthonormal columns: a side's top-k eigenvectors, largest eigenvalue first, each
column's largest entry positive (one sign on every machine's eigh).

A block with a side wider than projection.basis_max_dim (a large vocabulary's embedding: its C_out alone would
be vocab^2) keeps the random sides of projection.seed; so does a side no wider than its k (the identity).
The store keeps the matrices (basis.safetensors) and records their sha256 in its projection spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from tdastore.devices import model_device
from tdastore.grads.normaliser import checked_tensors, moments_digest, tensors_to_bytes

CHUNK_ENTRIES = 1 << 25  # per-example gradient entries formed at once while fitting (256 MB in float64)


@dataclass
class Basis:
    """Fitted side matrices of a factored projection: '<block>.out' / '<block>.in' -> [d, k] float32 (CPU)."""

    matrices: dict[str, torch.Tensor]
    examples: int  # training examples the second moments were summed over

    def spec(self) -> dict:
        return {"kind": "pca", "examples": self.examples, "sha256": moments_digest(self.matrices)}

    def to_bytes(self) -> bytes:
        return tensors_to_bytes(self.matrices)

    @classmethod
    def from_bytes(cls, data: bytes, spec: dict, where: str) -> Basis:
        """The basis a store was built with; its bytes must give the sha256 its spec recorded."""
        return cls(checked_tensors(data, spec, f"projection basis {where}"), int(spec["examples"]))


def top_eigenvectors(second_moment: torch.Tensor, k: int) -> torch.Tensor:
    """[d, d] symmetric (float64) -> [d, k] float32: its top-k eigenvectors, largest first, each column's
    largest-magnitude entry positive."""
    _, vectors = torch.linalg.eigh(second_moment)  # ascending
    top = vectors[:, -k:].flip(1)  # [d, k]
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))  # [1, k]
    return (top * torch.where(signs == 0, 1.0, signs)).float().contiguous()


def fit_pca_basis(computer, examples, batch_size: int, limit: int, max_dim: int, progress: bool = False) -> Basis:
    """The PCA sides of a FactoredLinearGradients' blocks from its own per-example gradients (see the module
    docstring); `computer` differentiates the training loss with the store's normaliser. One block's per-example
    gradients are formed at a time, CHUNK_ENTRIES at most."""
    from tdastore.grads.factored import module_factors

    fitted = {}  # block -> (k_out, k_in), the blocks a basis is fitted for
    for block, (name, d_out, d_in) in enumerate(computer.blocks):
        k_out, k_in = module_factors(computer.config, name)
        if max(d_out, d_in) <= max_dim and (d_out > k_out or d_in > k_in):
            fitted[block] = (k_out, k_in)
    uses: dict[int, list[int]] = {}  # block -> its modules (a tied weight has two)
    for index, block in enumerate(computer.block_of):
        uses.setdefault(block, []).append(index)
    n = min(limit, len(examples))
    device = model_device(computer.model)
    c_out = {b: torch.zeros(computer.blocks[b][1], computer.blocks[b][1], dtype=torch.float64) for b in fitted}
    c_in = {b: torch.zeros(computer.blocks[b][2], computer.blocks[b][2], dtype=torch.float64) for b in fitted}
    for start in tqdm(range(0, n, batch_size), desc="PCA basis", unit="batch", disable=not progress):
        part = examples.slice(start, min(start + batch_size, n)).to(device)
        _, captured = computer.capture(part.inputs, part.targets)
        for block in fitted:
            _, d_out, d_in = computer.blocks[block]
            sides = [computer._scaled_sides(index, *captured[index]) for index in uses[block]]
            step = max(1, CHUNK_ENTRIES // (d_out * d_in))
            for lo in range(0, len(part), step):
                gradient = sum(_per_example(u, w, d_out, lo, lo + step) for u, w in sides).double()  # [b, out, in]
                c_out[block] += torch.einsum("boi,bpi->op", gradient, gradient).cpu()
                c_in[block] += torch.einsum("boi,boj->ij", gradient, gradient).cpu()
    matrices = {}
    for block, (k_out, k_in) in fitted.items():
        name, d_out, d_in = computer.blocks[block]
        if d_out > k_out:
            matrices[f"{name}.out"] = top_eigenvectors(c_out[block], k_out)
        if d_in > k_in:
            matrices[f"{name}.in"] = top_eigenvectors(c_in[block], k_in)
    return Basis(matrices, n)


def _per_example(u, w, d_out: int, lo: int, hi: int) -> torch.Tensor:
    """Examples lo:hi of one module's per-example gradient sum_t u_t w_t^T, [b, d_out, d_in] float32; an
    embedding's out side (ids [B, T], per-id scale or None) is scattered by id, no one-hot formed."""
    w = w[lo:hi].detach()  # [b, T, d_in]
    if not isinstance(u, tuple):
        return torch.bmm(u[lo:hi].detach().transpose(1, 2), w)
    ids, scale = u
    ids = ids[lo:hi]  # [b, T]
    if scale is not None:
        w = w * scale[ids].unsqueeze(-1)
    out = w.new_zeros(w.shape[0], d_out, w.shape[2])
    return out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, w.shape[2]), w)
