"""Fitted projected operators are saved in the store (precond/<key>.npz) and named in its manifest, keyed by
the operator and the settings it depends on, so a second query with the same settings loads instead of fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tdastore.config import AttributionConfig
from tdastore.errors import StoreError
from tdastore.precond.projected.spectral import SpectralOperator
from tdastore.precond.registry import FitInputs, operator_class
from tdastore.store.location import writable

PRECOND_DIR = "precond"


def operator_key(name: str, config: AttributionConfig) -> str:
    """The cache key of projected operator `name` under these attribution settings."""
    return operator_class("projected", name).key(config)


def fit_or_load(name: str, inputs: FitInputs) -> SpectralOperator:
    """The operator saved in the store for these settings, else fitted (size checked first) and registered."""
    store, config = inputs.store, inputs.config.attribution
    cls = operator_class("projected", name)
    key = cls.key(config)
    entry = store.manifest.get("preconditioners", {}).get(key)
    if entry:
        return SpectralOperator.load(_inside(store, entry["file"]), name, entry["info"])
    operator = cls()
    operator.check_size(store, config)
    fitted = operator.fit(inputs)
    if name != "identity" and writable(store.root):  # read-only local stores: fitted per process, not cached
        folder = store.root / PRECOND_DIR
        folder.mkdir(exist_ok=True)
        fitted.save(folder / f"{key}.npz")
        store.register(
            "preconditioners",
            key,
            {
                "operator": name,
                "file": f"{PRECOND_DIR}/{key}.npz",
                "params": cls.params(config),
                "info": _jsonable(fitted.info),
            },
        )
    return fitted


def _inside(store, relative: str) -> Path:
    """A manifest's file entry, refused unless it names an existing file inside the store."""
    path = store.root / relative
    if isinstance(store.root, Path) and not path.resolve().is_relative_to(store.root.resolve()):
        raise StoreError(
            f"store '{store.root}': preconditioner file '{relative}' lies outside the store; "
            "delete its manifest entry (it is refitted) or rebuild the store"
        )
    if not path.is_file():
        raise StoreError(
            f"store '{store.root}': preconditioner file {relative} is missing; delete its manifest entry or rebuild"
        )
    return path


def _jsonable(info: dict) -> dict:
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return float(v) if isinstance(v, (np.floating, float)) else v

    return {k: plain(v) for k, v in info.items()}
