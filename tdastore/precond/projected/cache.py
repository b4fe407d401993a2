"""Fitted projected operators are saved in the store (precond/<key>.npz) and named in its manifest, keyed by
the operator and the settings it depends on, so a second query with the same settings loads instead of fitting."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tdastore.config import AttributionConfig
from tdastore.errors import StoreError
from tdastore.precond.projected.spectral import SpectralOperator
from tdastore.precond.registry import FitInputs, operator_class
from tdastore.store.checksums import file_crc
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
    persist = name != "identity" and writable(store.root) and not inputs.config.store.read_only
    if entry and entry.get("stale"):  # fitted before rows were appended (`tdastore build --append`)
        print(f"the fitted {name} operator predates rows appended to the store: refitting it", file=sys.stderr)
    elif entry:
        path = _inside(store, entry["file"])
        if "checksum" not in entry or file_crc(path) == entry["checksum"]:
            return SpectralOperator.load(path, name, entry["info"])
        if not persist:
            raise StoreError(
                f"store '{store.root}': the fitted {name} operator {entry['file']} does not match its checksum "
                f"(corrupt): run `tdastore verify {store.root}` (it drops it) and refit it with `tdastore index "
                f"{store.root} --method ...` where the store is writable"
            )
        print(f"the fitted {name} operator {entry['file']} is damaged (checksum): refitting it", file=sys.stderr)
    operator = cls()
    operator.check_size(store, config)
    fitted = operator.fit(inputs)
    if persist:  # else (read-only): kept in memory by this process
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
                "checksum": file_crc(folder / f"{key}.npz"),  # [size, crc32], checked on every load and by verify
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
