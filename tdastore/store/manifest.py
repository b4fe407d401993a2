"""The manifest that makes a store self-describing, and the checks that refuse silent garbage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tdastore.atomic import temporary_name
from tdastore.errors import StoreError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRADS_DIR = "grads.zarr"
META_FILE = "meta.parquet"
SHARDS_DIR = "shards"

# Fields that must agree between an existing store and a build that extends or resumes it.
REQUIRED_KEYS = ("status", "n_rows", "dim", "dtype", "shards", "projection", "gradients", "model", "task", "layout")
IDENTITY_FIELDS = ("split", "task", "model", "gradients", "projection", "layout")


def write_json_atomic(path, payload: Any) -> None:
    """Write to `.part`, fsync, then rename: a reader never sees half a file (one put on an object store)."""
    write_bytes_atomic(path, json.dumps(payload, indent=2).encode())


def write_bytes_atomic(path, data: bytes) -> None:
    """Bytes to `path` so that no reader sees half of them: `.part` + fsync + rename locally, one put remotely."""
    if not isinstance(path, Path):
        path.write_bytes(data)
        return
    tmp = temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def read_manifest(root) -> dict:
    """The manifest of the store at `root`, or a StoreError saying why it is not a usable store."""
    if not root.exists():
        raise StoreError(f"store '{root}' does not exist: build one with `tdastore build --config CFG --output {root}`")
    if not root.is_dir():
        raise StoreError(f"'{root}' is a file, not a store directory")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise StoreError(
            f"'{root}' is not a tdastore store (no {MANIFEST_FILE}); point at a directory written by `tdastore build`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(
            f"the manifest of store '{root}' is corrupt ({err}); rebuild the store into a new directory"
        ) from err
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise StoreError(f"the manifest of store '{root}' has no schema_version: it was not written by tdastore")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise StoreError(
            f"store '{root}' has schema version {manifest['schema_version']}, this tdastore reads version "
            f"{SCHEMA_VERSION}: rebuild it with this version"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest] if manifest.get("kind") is None else []
    if missing:
        raise StoreError(
            f"the manifest of store '{root}' lacks {missing}: it is damaged; rebuild the store into a new directory"
        )
    return manifest


def identity_mismatches(existing: dict, wanted: dict) -> list[str]:
    """Human-readable differences in the fields that define what a store's rows mean."""
    problems = []
    for key in IDENTITY_FIELDS:
        if existing.get(key) != wanted.get(key):
            problems.append(f"{key}: store has {_short(existing.get(key))}, this build has {_short(wanted.get(key))}")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."
