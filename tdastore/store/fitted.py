"""What a store's rows were computed with beyond its spec's numbers: the normaliser's second moments
(tdastore/grads/normaliser.py) and the fitted projection sides (tdastore/grads/basis.py). Each is kept beside the
rows as a safetensors file and checked against the sha256 the store's projection spec records."""

from __future__ import annotations

from tdastore.errors import StoreError
from tdastore.grads.basis import Basis
from tdastore.grads.normaliser import Normaliser
from tdastore.store.location import StorePath
from tdastore.store.manifest import read_manifest, write_bytes_atomic

BASIS_FILE = "basis.safetensors"
NORMALISER_FILE = "normaliser.safetensors"
# projection spec key -> (file, class with to_bytes / from_bytes(data, spec, where), what an error calls it)
FITTED = {
    "basis": (BASIS_FILE, Basis, "projection basis"),
    "normaliser": (NORMALISER_FILE, Normaliser, "normaliser"),
}


def save_basis(root: StorePath, basis: Basis) -> None:
    write_bytes_atomic(root / BASIS_FILE, basis.to_bytes())


def save_normaliser(root: StorePath, normaliser: Normaliser) -> None:
    write_bytes_atomic(root / NORMALISER_FILE, normaliser.to_bytes())


def store_basis(root: StorePath) -> Basis | None:
    """The sides a store's rows were projected with (its projection spec names them), or None (random sides)."""
    return _stored(root, "basis")


def store_normaliser(root: StorePath) -> Normaliser | None:
    """The normaliser a store's rows were scaled by (its projection spec names it), or None."""
    return _stored(root, "normaliser")


def _stored(root: StorePath, key: str):
    spec = read_manifest(root)["projection"].get(key)
    if spec is None:
        return None
    name, kind, called = FITTED[key]
    path = root / name
    if not path.is_file():
        raise StoreError(f"the store's {called} {path} is missing: rebuild the store (same command)")
    return kind.from_bytes(path.read_bytes(), spec, str(path))
