"""The fitted sides a factored store's rows were projected with (projection.basis pca, tdastore/grads/basis.py),
kept beside its rows as basis.safetensors and checked against the sha256 its projection spec records."""

from __future__ import annotations

from tdastore.errors import StoreError
from tdastore.grads.basis import Basis
from tdastore.store.location import StorePath
from tdastore.store.manifest import read_manifest, write_bytes_atomic

BASIS_FILE = "basis.safetensors"


def save_basis(root: StorePath, basis: Basis) -> None:
    write_bytes_atomic(root / BASIS_FILE, basis.to_bytes())


def store_basis(root: StorePath) -> Basis | None:
    """The basis a store's rows were projected with (its projection spec names it), or None (random sides)."""
    spec = read_manifest(root)["projection"].get("basis")
    if spec is None:
        return None
    path = root / BASIS_FILE
    if not path.is_file():
        raise StoreError(f"the store's projection basis {path} is missing: rebuild the store (same command)")
    return Basis.from_bytes(path.read_bytes(), spec, str(path))
