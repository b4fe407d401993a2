"""Checking what was written: every done shard's chunk files against the sizes and crc32s its `.done` marker
recorded, its metadata file, and the manifest's shard table. A bad shard loses its marker (the store becomes
incomplete, so it is never served) and the next build recomputes exactly that shard."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from tdastore.store.location import StorePath, zarr_store
from tdastore.store.manifest import GRADS_DIR, MANIFEST_FILE, META_FILE, SHARDS_DIR, read_manifest, write_json_atomic
from tdastore.store.writer import done_shards, shard_marker, shard_meta_path


@dataclass(frozen=True)
class ShardProblem:
    shard: int
    reason: str


def verify_store(root: StorePath, deep: bool = False) -> list[ShardProblem]:
    """Problems of the done shards (cheap: markers, metadata files, chunk files present at their recorded
    sizes; deep: also every chunk's crc32, and the decoded rows' crc32 where a marker has no chunk table)."""
    manifest = read_manifest(root)
    done, problems = done_shards(root), []
    for entry in manifest["shards"]:
        index = entry["shard"]
        if index not in done:
            if entry.get("done"):
                problems.append(ShardProblem(index, "the manifest says done but its .done marker is missing"))
            continue
        reason = _shard_problem(root, index, deep)
        if reason:
            problems.append(ShardProblem(index, reason))
    return problems


def _shard_problem(root: StorePath, index: int, deep: bool) -> str | None:
    try:
        marker = json.loads(shard_marker(root, index).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its .done marker is corrupt"
    if not shard_meta_path(root, index).is_file():
        return f"its metadata file {shard_meta_path(root, index).name} is missing"
    if "statistics" in marker and not (root / SHARDS_DIR / marker["statistics"]).is_file():
        return f"its K-FAC statistics file {marker['statistics']} is missing"
    for key, (size, crc) in marker.get("chunks", {}).items():
        path = root / GRADS_DIR / key
        if not path.is_file():
            return f"chunk {key} is missing"
        data = path.read_bytes() if deep else None
        actual = len(data) if data is not None else _size(path)
        if actual != size:
            return f"chunk {key} has {actual} bytes, {size} were written (truncated or replaced)"
        if deep and zlib.crc32(data) != crc:
            return f"chunk {key} does not match its checksum (corrupt)"
    if deep and "chunks" not in marker:  # markers of older builds: the decoded rows' checksum
        array = zarr.open_array(store=zarr_store(root / GRADS_DIR, read_only=True), mode="r")
        try:
            rows = np.ascontiguousarray(array[marker["start"] : marker["stop"]])
        except Exception as err:  # zarr raises several kinds for undecodable chunks
            return f"its rows cannot be decoded ({err})"
        if zlib.crc32(rows.data) != marker["crc32"]:
            return "its rows do not match their checksum (corrupt)"
    return None


def _size(path) -> int:
    return path.stat().st_size if isinstance(path, Path) else int(path.fs.size(path.path))


def mark_for_rebuild(root: StorePath, problems: list[ShardProblem]) -> None:
    """Remove the bad shards' markers and mark the store incomplete: it is not served, and the next build
    recomputes exactly these shards and rewrites the consolidated metadata."""
    if not problems:
        return
    for problem in problems:
        marker = shard_marker(root, problem.shard)
        if marker.exists():
            marker.unlink()
    manifest = read_manifest(root)
    bad = {p.shard for p in problems}
    for entry in manifest["shards"]:
        entry["done"] = entry["done"] and entry["shard"] not in bad
    manifest["status"] = "building"
    write_json_atomic(root / MANIFEST_FILE, manifest)
    if (root / META_FILE).exists():
        (root / META_FILE).unlink()
