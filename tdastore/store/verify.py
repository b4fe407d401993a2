"""Checking what was written: every done shard's chunk files against the sizes and crc32s its `.done` marker
recorded, its metadata file (size and crc32), the gradient array's zarr.json (against the manifest's copy), the
consolidated meta.parquet (against the manifest's crc32), and the manifest's shard table. A bad shard loses its
marker (the store becomes incomplete, so it is never served) and the next build recomputes exactly that shard;
a bad zarr.json or meta.parquet is rewritten by the next build from what the store still holds."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import zarr

from tdastore.store.checksums import FILE_NAME, RELATIVE_PATH, chunk_table_problem, confined, file_crc, sha256_of
from tdastore.store.location import StorePath, zarr_store
from tdastore.store.manifest import GRADS_DIR, MANIFEST_FILE, META_FILE, SHARDS_DIR, read_manifest, write_json_atomic
from tdastore.store.writer import ZARR_JSON, array_metadata, done_shards, segments, shard_marker, shard_meta_path


@dataclass(frozen=True)
class ShardProblem:
    shard: int | None  # None: the store as a whole (zarr.json, meta.parquet) or a derived artefact
    reason: str
    derived: tuple[str, str] | None = None  # (manifest section, key) of a damaged fitted operator or index

    def describe(self) -> str:
        return f"shard {self.shard}: {self.reason}" if self.shard is not None else self.reason


def verify_store(root: StorePath, deep: bool = False) -> list[ShardProblem]:
    """Problems of the done shards and of the store's own files (cheap: markers, metadata files and their
    crc32, chunk files present at their recorded sizes; deep: also every chunk's crc32, and the decoded rows'
    crc32 where a marker has no chunk table)."""
    manifest = read_manifest(root)
    done, problems = done_shards(root), _store_problems(root, manifest) + _derived_problems(root, manifest)
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


def _store_problems(root: StorePath, manifest: dict) -> list[ShardProblem]:
    problems = []
    copies = array_metadata(manifest)
    for name in [s["array"] for s in segments(manifest)]:  # grads.zarr, and appended segments' arrays
        try:
            array_meta = json.loads((root / name / ZARR_JSON).read_text())
        except (OSError, ValueError):
            array_meta = None
        if array_meta is None or (name in copies and array_meta != copies[name]):
            state = "missing or unreadable" if array_meta is None else "changed since the build"
            problems.append(ShardProblem(None, f"{name}/{ZARR_JSON} is {state}"))
    meta = root / META_FILE
    if manifest.get("status") == "complete":
        if not meta.is_file():
            problems.append(ShardProblem(None, f"{META_FILE} is missing"))
        elif "meta_checksum" in manifest and file_crc(meta) != manifest["meta_checksum"]:
            problems.append(ShardProblem(None, f"{META_FILE} does not match its checksum (truncated or corrupt)"))
    return problems


def _derived_problems(root: StorePath, manifest: dict) -> list[ShardProblem]:
    """Fitted operators (precond/*.npz: [size, crc32] in the manifest) and FAISS indexes (index.json and the
    sha256 of every shard file): missing, outside the store, or changed since they were written."""
    problems = []
    for key, entry in manifest.get("preconditioners", {}).items():
        path = confined(root, str(entry.get("file", "")), RELATIVE_PATH)
        if path is None or not path.is_file():
            reason = "is missing" if path is not None else "lies outside the store"
        elif "checksum" in entry and file_crc(path) != entry["checksum"]:
            reason = "does not match its checksum (corrupt)"
        else:
            continue
        problems.append(ShardProblem(None, f"fitted operator {entry.get('file')} {reason}", ("preconditioners", key)))
    for key, entry in manifest.get("indexes", {}).items():
        folder = confined(root, str(entry.get("directory", "")), RELATIVE_PATH)
        reason = None if folder is not None else "lies outside the store"
        try:
            description = json.loads((folder / "index.json").read_text()) if folder is not None else {}
        except (OSError, ValueError):
            reason = "has a missing or unreadable index.json"
            description = {}
        digests = description.get("shard_sha256", {})
        for shard in description.get("shards", []) if reason is None else []:
            name = str(shard[2])
            path = confined(folder, name, FILE_NAME)
            if path is None or not path.is_file():
                reason = f"lacks its shard {name[:80]!r}"
            elif name in digests and sha256_of(path) != digests[name]:
                reason = f"has a shard {name} that does not match its sha256 (corrupt)"
            if reason:
                break
        if reason:
            problems.append(ShardProblem(None, f"index {key} {reason}", ("indexes", key)))
    return problems


def _shard_problem(root: StorePath, index: int, deep: bool) -> str | None:
    try:
        marker = json.loads(shard_marker(root, index).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its .done marker is corrupt"
    if not isinstance(marker, dict):
        return "its .done marker is corrupt"
    meta_path = shard_meta_path(root, index)
    if not meta_path.is_file():
        return f"its metadata file {meta_path.name} is missing"
    if "meta" in marker and file_crc(meta_path) != marker["meta"]:
        return f"its metadata file {meta_path.name} does not match its checksum (truncated or corrupt)"
    if "statistics" in marker:
        path = confined(root / SHARDS_DIR, marker["statistics"], FILE_NAME)
        if path is None:
            return f"its marker names a file outside the store ({str(marker['statistics'])[:80]!r})"
        if not path.is_file():
            return f"its K-FAC statistics file {marker['statistics']} is missing"
        if "statistics_crc" in marker and file_crc(path) != marker["statistics_crc"]:
            return f"its K-FAC statistics file {marker['statistics']} does not match its checksum"
    array_dir = confined(root, str(marker.get("array", GRADS_DIR)), FILE_NAME)
    if array_dir is None:
        return f"its marker names an array outside the store ({str(marker.get('array'))[:80]!r})"
    reason = chunk_table_problem(array_dir, marker.get("chunks", {}), deep)
    if reason:
        return reason
    if deep and "chunks" not in marker:  # markers of older builds: the decoded rows' checksum
        array = zarr.open_array(store=zarr_store(root / GRADS_DIR, read_only=True), mode="r")
        try:
            rows = np.ascontiguousarray(array[marker["start"] : marker["stop"]])
        except Exception as err:  # zarr raises several kinds for undecodable chunks
            return f"its rows cannot be decoded ({err})"
        if zlib.crc32(rows.data) != marker["crc32"]:
            return "its rows do not match their checksum (corrupt)"
    return None


def mark_for_rebuild(root: StorePath, problems: list[ShardProblem]) -> None:
    """Remove the bad shards' markers and mark the store incomplete: it is not served, and the next build
    recomputes exactly these shards, restores zarr.json from the manifest and rewrites the consolidated
    metadata."""
    if not problems:
        return
    derived = [p.derived for p in problems if p.derived is not None]
    if derived:  # a damaged operator or index is dropped: the next `tdastore index` or query refits it
        manifest = read_manifest(root)
        for section, key in derived:
            entry = manifest.get(section, {}).pop(key, {})
            target = confined(root, str(entry.get("file") or entry.get("directory") or ""), RELATIVE_PATH)
            if target is not None and target.is_file():
                target.unlink()
            elif target is not None and target.is_dir():
                for path in sorted(target.iterdir()):
                    path.unlink()
        write_json_atomic(root / MANIFEST_FILE, manifest)
        problems = [p for p in problems if p.derived is None]
        if not problems:
            return
    for problem in problems:
        if problem.shard is None:
            continue
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
