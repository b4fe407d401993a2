"""One create-or-reopen for every output that a job writes unit by unit: the gradient store (units are shards),
the ground truth and the metagradient store (units are seed blocks x row or test blocks).

A job store is a directory (or object-store prefix) with a manifest that says what the job is (its identity),
arrays written region by region, and one `.done` marker per finished unit. Reopening checks the identity, so a
rerun resumes the same job and a different job is refused before anything is written; a directory that is not
a store of ours is never written into.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tdastore.errors import StoreError
from tdastore.store.checksums import chunk_table_problem
from tdastore.store.lease import LEASE_FILE, Lease
from tdastore.store.location import StorePath, store_path
from tdastore.store.manifest import MANIFEST_FILE, write_json_atomic

DONE = ".done"
CREATING = ".creating"  # present while a store is created, before its manifest is written


def foreign(root: StorePath) -> bool:
    """Whether `root` is something no job of ours may write into: a file, or a non-empty directory that is
    neither a store (no manifest) nor a creation of ours stopped before its manifest."""
    if not root.exists():
        return False
    if not root.is_dir():
        return True
    names = {p.name for p in root.iterdir()} - {LEASE_FILE}
    return bool(names) and MANIFEST_FILE not in names and CREATING not in names


@contextlib.contextmanager
def writing(root: StorePath, job: str, not_ours: str) -> Iterator[None]:
    """Hold `root` for one job: refused (nothing written) if it is not ours, else under a lease."""
    if foreign(root):
        raise StoreError(not_ours)
    created = not root.exists()
    try:
        with Lease(root, job):
            yield
    finally:
        if created and root.exists() and not any(True for _ in root.iterdir()):
            _remove_empty(root)  # a job refused before it wrote anything leaves nothing behind


def create_or_reopen(
    root: StorePath,
    read: Callable[[StorePath], dict],
    differences: Callable[[dict], list[str]],
    create: Callable[[], dict],
    refused: Callable[[list[str]], str],
    not_ours: str,
) -> dict:
    """The manifest of the job store at `root`: reopened when `differences(manifest)` is empty, else a
    StoreError `refused(differences)`; created by `create()` (which writes the arrays and returns the manifest)
    when `root` is missing or empty; a non-empty directory without a manifest is refused with `not_ours`, unless it
    is a creation of ours that stopped before its manifest (a `.creating` marker), which is cleared and redone."""
    if root.exists() and (root / MANIFEST_FILE).exists():
        manifest = read(root)
        problems = differences(manifest)
        if problems:
            raise StoreError(refused(problems))
        return manifest
    if foreign(root):
        raise StoreError(not_ours)
    if root.exists() and (root / CREATING).exists():
        _clear(root)  # a creation stopped before its manifest: ours, and nothing in it is done yet
    root.mkdir(parents=True, exist_ok=True)
    (root / CREATING).write_text("this store is being created; without manifest.json it is recreated on rerun\n")
    manifest = create()
    write_json_atomic(root / MANIFEST_FILE, manifest)
    (root / CREATING).unlink()
    return manifest


def _remove_empty(root: StorePath) -> None:
    if isinstance(root, Path):
        root.rmdir()
    else:
        root.fs.rm(root.path, recursive=True)


def _clear(root: StorePath) -> None:
    for child in root.iterdir():
        if child.name == LEASE_FILE:
            continue
        if isinstance(child, Path):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            child.fs.rm(child.path, recursive=True)


def open_job(
    root: StorePath, identity: dict, read, create: Callable[[], dict], *, what: str, fix: str, not_ours: str
) -> dict:
    """create_or_reopen for a job store whose identity is a set of manifest keys (ground truth, metagradients,
    LDS): another job's store is refused as "<what> '<root>' holds another job (differs in [...])"."""
    return create_or_reopen(
        root,
        read,
        lambda manifest: differing_keys(manifest, identity),
        create,
        refused=lambda keys: f"{what} '{root}' holds another job (differs in {keys}) and was left unchanged: {fix}",
        not_ours=not_ours,
    )


def read_job_manifest(root: Path, kind: str, what: str, command: str) -> dict:
    """The manifest of a job store of `kind`, or an error naming what the directory is and what makes one."""
    path = store_path(root) / MANIFEST_FILE
    if not path.is_file():
        raise StoreError(f"'{root}' is not a {what} store (no {MANIFEST_FILE}): run `{command}` first")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != kind:
        raise StoreError(f"'{root}' is not a {what} store (it is a {manifest.get('kind', 'gradient')} store)")
    return manifest


def done_markers(folder: StorePath) -> set[str]:
    """Names of the units whose `.done` marker exists in `folder`: their data is durable."""
    if not folder.is_dir():
        return set()
    return {p.name[: -len(DONE)] for p in folder.glob(f"*{DONE}")}


def mark_done(folder: StorePath, name: str, payload: dict) -> None:
    """Mark unit `name` finished, atomically, after its data was written."""
    write_json_atomic(folder / f"{name}{DONE}", payload)


def differing_keys(manifest: dict, identity: dict) -> list[str]:
    """The identity keys whose stored value differs."""
    return [key for key in identity if manifest.get(key) != identity[key]]


def unit_problems(root: StorePath, deep: bool = False) -> dict[str, str]:
    """{unit: why} for the done units of a job store whose chunk files differ from the chunk tables their
    `.done` markers recorded (cheap: presence and sizes; deep: every byte's crc32). Markers of older jobs, with
    no table, are trusted here; their chunks' own crc32c still fails any read of a flipped byte."""
    problems = {}
    for name in sorted(done_markers(root / "units")):
        try:
            marker = json.loads((root / "units" / f"{name}{DONE}").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            problems[name] = "its .done marker is corrupt"
            continue
        reason = chunk_table_problem(root, marker.get("chunks", {}) if isinstance(marker, dict) else None, deep)
        if reason:
            problems[name] = reason
    return problems


def mark_units_for_rerun(root: StorePath, units: list[str]) -> None:
    """Remove these units' markers and mark the job running: its outputs are refused until the next run of the
    same command recomputes exactly these units."""
    if not units:
        return
    for name in units:
        marker = root / "units" / f"{name}{DONE}"
        if marker.exists():
            marker.unlink()
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["status"] = "running"
    write_json_atomic(root / MANIFEST_FILE, manifest)
