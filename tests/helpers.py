"""Test-only views of production objects (kept out of the classes themselves)."""

from __future__ import annotations

import torch

from tdastore.errors import StoreError
from tdastore.store.manifest import identity_mismatches


def projection_matrix(projector, name: str) -> torch.Tensor:
    """The full [p_name, k] matrix of one parameter of a block projector (small models only)."""
    eye = torch.eye(projector.numel[name])  # [p_name, p_name]
    zeros = {n: torch.zeros(eye.shape[0], projector.numel[n]) for n in projector.names if n != name}
    return projector.project({**zeros, name: eye})


def flatten(per_example, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """{name: [B, *shape]} -> [B, p] in the order of the computer's parameter names."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in per_example.names], dim=1)


def check_store_matches(store, identity: dict) -> None:
    """Raise if the model, task, gradients or projection asked for differ from the store's."""
    problems = identity_mismatches(store.manifest, {**store.manifest, **identity})
    if problems:
        raise StoreError(f"store '{store.root}' does not match:\n  - " + "\n  - ".join(problems))


def metagrad_scores(meta, seeds, mode: str = "auto") -> torch.Tensor:
    """Leave-one-out estimates a_i ~ -dg/dw_i of a MetaGradient, averaged over seeds: [E, T, R]."""
    return -torch.stack([meta.gradients(s, mode) for s in seeds]).mean(0)
