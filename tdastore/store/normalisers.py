"""The second moments a normalised store's rows were scaled by (tdastore/grads/normaliser.py), kept beside
its rows as normaliser.safetensors and checked against the sha256 its projection spec records."""

from __future__ import annotations

from tdastore.errors import StoreError
from tdastore.grads.normaliser import Normaliser
from tdastore.store.location import StorePath
from tdastore.store.manifest import read_manifest, write_bytes_atomic

NORMALISER_FILE = "normaliser.safetensors"


def save_normaliser(root: StorePath, normaliser: Normaliser) -> None:
    write_bytes_atomic(root / NORMALISER_FILE, normaliser.to_bytes())


def store_normaliser(root: StorePath) -> Normaliser | None:
    """The normaliser a store's rows were scaled by (its projection spec names it), or None."""
    spec = read_manifest(root)["projection"].get("normaliser")
    if spec is None:
        return None
    path = root / NORMALISER_FILE
    if not path.is_file():
        raise StoreError(f"the store's normaliser {path} is missing: rebuild the store (same command)")
    return Normaliser.from_bytes(path.read_bytes(), spec, str(path))
