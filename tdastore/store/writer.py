"""Writing a store: create or reopen it for a build, write shards idempotently, finalise.

A shard owns a chunk-aligned row range, so concurrent writers never touch the same Zarr chunk. Its
rows are written and fsynced first, then its metadata, then its `.done` marker (each via `.part` and
rename): a shard without a marker is simply rewritten on resume, and a marker always means durable rows.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from tdastore.atomic import temporary_name
from tdastore.errors import StoreError
from tdastore.store.checksums import FILE_NAME, checksummed, chunk_table, confined, file_crc, region_chunk_keys
from tdastore.store.job_store import create_or_reopen, done_markers
from tdastore.store.location import StorePath, is_local, read_parquet, write_parquet_atomic, zarr_store
from tdastore.store.manifest import (
    GRADS_DIR,
    MANIFEST_FILE,
    META_FILE,
    SCHEMA_VERSION,
    SHARDS_DIR,
    identity_mismatches,
    read_manifest,
    write_bytes_atomic,
    write_json_atomic,
)

MAX_CHUNK_BYTES = 64 * 2**20
META_ROW_GROUP = 2048  # rows per row group of meta.parquet


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # store rows [start, stop)
    stop: int
    array: str = GRADS_DIR  # the Zarr array holding them: grads.zarr, or an appended segment's
    offset: int = 0  # the store row of that array's first row

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(n_rows: int, shard_rows: int, first_row: int = 0, first_index: int = 0, array: str = GRADS_DIR):
    """Shards of `shard_rows` rows over store rows [first_row, first_row + n_rows), held by `array` from its row 0."""
    starts = range(first_row, first_row + n_rows, shard_rows)
    return [
        Shard(first_index + i, start, min(start + shard_rows, first_row + n_rows), array, first_row)
        for i, start in enumerate(starts)
    ]


def store_shards(manifest: dict) -> list[Shard]:
    """The shards of a store's manifest (appended ones in their segments' arrays)."""
    return [
        Shard(e["shard"], e["start"], e["stop"], e.get("array", GRADS_DIR), e.get("offset", 0))
        for e in manifest["shards"]
    ]


def shard_entry(shard: Shard) -> dict:
    entry = {"shard": shard.index, "start": shard.start, "stop": shard.stop, "done": False}
    if shard.array != GRADS_DIR:
        entry.update(array=shard.array, offset=shard.offset)
    return entry


def segments(manifest: dict) -> list[dict]:
    """[{array, start, stop, ...}]: the Zarr arrays that hold a store's rows in order (one unless appended)."""
    return manifest.get("segments") or [{"array": GRADS_DIR, "start": 0, "stop": manifest["n_rows"]}]


def prepare_store(root: StorePath, identity: dict, n_rows: int, dim: int, dtype: str, extra: dict) -> dict:
    """Create a new store, or check that an existing one is the same build and return its manifest.

    `identity` holds IDENTITY_FIELDS. Nothing is written into a directory that is not a store, nor into
    a store whose identity differs, so an existing store is never damaged by a wrong build.
    """

    def create() -> dict:
        (root / SHARDS_DIR).mkdir(exist_ok=True)
        create_rows_array(root, GRADS_DIR, n_rows, dim, dtype, identity["layout"])
        shards = plan_shards(n_rows, identity["layout"]["shard_rows"])
        return {
            "array": json.loads((root / GRADS_DIR / ZARR_JSON).read_text()),  # restores a lost zarr.json
            "schema_version": SCHEMA_VERSION,
            "status": "building",
            "n_rows": n_rows,
            "dim": dim,
            "dtype": dtype,
            **identity,
            **extra,
            "shards": [shard_entry(s) for s in shards],
            "preconditioners": {},
            "indexes": {},
        }

    manifest = create_or_reopen(
        root,
        read_manifest,
        lambda manifest: identity_mismatches(manifest, identity),
        create,
        refused=lambda problems: (
            f"store '{root}' was built with a different setup and was left unchanged ("
            + "; ".join(problems)
            + "): build into a new --output directory, or rebuild with the store's config"
        ),
        not_ours=not_a_store(root),
    )
    restore_array_metadata(root, manifest)
    return manifest


ZARR_JSON = "zarr.json"


def create_rows_array(root: StorePath, name: str, n_rows: int, dim: int, dtype: str, layout: dict, overwrite=False):
    """An empty [n_rows, dim] Zarr array `name` in the store's layout (chunks, checksummed compressors)."""
    chunk_cols = max(1, min(dim, MAX_CHUNK_BYTES // (layout["chunk_rows"] * np.dtype(dtype).itemsize)))
    zarr.create_array(
        store=zarr_store(root / name),
        shape=(n_rows, dim),
        chunks=(layout["chunk_rows"], chunk_cols),
        dtype=dtype,
        fill_value=0,
        compressors=checksummed(_compressors(layout["compressor"])),
        overwrite=overwrite,
    )


def add_segment(root: StorePath, manifest: dict, n_rows: int, task: dict, source: dict) -> dict:
    """Grow a complete store by `n_rows` rows of `source` (the appended data, encoded by the store's `task`):
    a new Zarr array `grads-NNNN.zarr` of the same layout, new shards after the last, status building. Rows
    already stored are never rewritten: the new array starts at its own chunk 0, so every shard still owns
    whole chunks."""
    first, number = manifest["n_rows"], len(segments(manifest))
    name = f"grads-{number:04d}.zarr"
    layout = manifest["layout"]
    create_rows_array(root, name, n_rows, manifest["dim"], manifest["dtype"], layout, overwrite=True)
    shards = plan_shards(n_rows, layout["shard_rows"], first, len(manifest["shards"]), name)
    manifest = {**manifest, "segments": [dict(s) for s in segments(manifest)]}
    manifest["segments"][0].setdefault("task", manifest["task"])
    manifest["segments"].append(
        {
            "array": name,
            "start": first,
            "stop": first + n_rows,
            "task": task,
            "source": source,
            "zarr_json": json.loads((root / name / ZARR_JSON).read_text()),
        }
    )
    manifest["shards"] = manifest["shards"] + [shard_entry(s) for s in shards]
    manifest["n_rows"] = first + n_rows
    manifest["status"] = "building"
    write_json_atomic(root / MANIFEST_FILE, manifest)  # the segment exists from here on; before, it is redone
    return manifest


def restore_array_metadata(root: StorePath, manifest: dict) -> bool:
    """Rewrite each rows array's zarr.json from the manifest's copy when it is missing or differs (damaged): the
    chunks are kept. Returns whether it did; stores from before the copy are left as they are."""
    restored = False
    for name, wanted in array_metadata(manifest).items():
        path = root / name / ZARR_JSON
        try:
            if json.loads(path.read_text()) == wanted:
                continue
        except (OSError, ValueError):  # missing, unreadable or not JSON: damaged
            pass
        write_json_atomic(path, wanted)
        restored = True
    return restored


def array_metadata(manifest: dict) -> dict[str, dict]:
    """{array name: its zarr.json as written} for every rows array the manifest keeps a copy of."""
    copies = {GRADS_DIR: manifest["array"]} if manifest.get("array") is not None else {}
    copies.update({s["array"]: s["zarr_json"] for s in segments(manifest) if "zarr_json" in s})
    return copies


def not_a_store(root: StorePath) -> str:
    if root.exists() and not root.is_dir():
        return f"'{root}' is a file, not a store directory: choose a new --output directory"
    return f"'{root}' exists, is not empty and is not a tdastore store: choose a new --output directory"


def _compressors(name: str):
    if name == "none":
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")]
    return [ZstdCodec(level=1)]  # fast: gradients compress little


def shard_marker(root: StorePath, index: int) -> StorePath:
    return root / SHARDS_DIR / f"{index:06d}.done"


def shard_meta_path(root: StorePath, index: int) -> StorePath:
    return root / SHARDS_DIR / f"{index:06d}.parquet"


def shard_statistics_path(root: StorePath, index: int) -> StorePath:
    return root / SHARDS_DIR / f"{index:06d}.kfac.npz"


def write_npz_atomic(path: StorePath, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def read_shard_statistics(root: StorePath, manifest: dict) -> list[dict] | None:
    """Every shard's K-FAC factor sums gathered during the build, or None when some shard has none (a store
    built before, or without the hooks): fitting then takes a separate pass."""
    parts = []
    for entry in manifest["shards"]:
        marker = json.loads(shard_marker(root, entry["shard"]).read_text())
        if "statistics" not in marker:
            return None
        path = confined(root / SHARDS_DIR, marker["statistics"], FILE_NAME)
        if path is None:
            raise StoreError(f"store '{root}': the marker of shard {entry['shard']} is damaged: run `tdastore verify`")
        with np.load(io.BytesIO(path.read_bytes())) as data:
            parts.append({key: data[key] for key in data.files})
    return parts


def done_shards(root: StorePath) -> set[int]:
    """Shards whose marker exists: their rows and metadata are durable."""
    return {int(name) for name in done_markers(root / SHARDS_DIR)}


def write_shard(
    root: StorePath, shard: Shard, rows: np.ndarray, meta: pa.Table, statistics: dict | None = None
) -> dict:
    """Write one shard's rows [n, k], metadata and (factored stores) K-FAC factor sums, then mark it done.
    Safe to repeat."""
    array = zarr.open_array(store=zarr_store(root / shard.array), mode="r+")
    if rows.shape != (shard.rows, array.shape[1]):
        raise StoreError(f"shard {shard.index}: rows of shape {rows.shape}, expected {(shard.rows, array.shape[1])}")
    rows = np.ascontiguousarray(rows, dtype=array.dtype)
    region = slice(shard.start - shard.offset, shard.stop - shard.offset)  # rows of its own array
    array[region] = rows
    keys = region_chunk_keys(array, (region, slice(None)))  # this shard's chunks
    if is_local(root):  # object stores have no fsync: a finished put is durable
        _fsync_chunks(root / shard.array, keys)
    meta_path = shard_meta_path(root, shard.index)
    write_parquet_atomic(meta, meta_path)
    if statistics is not None:  # durable before the marker, like the rows
        write_npz_atomic(shard_statistics_path(root, shard.index), statistics)
    marker = {
        "shard": shard.index,
        "start": shard.start,
        "stop": shard.stop,
        "crc32": zlib.crc32(rows.data),  # of the rows as stored (decoded)
        "chunks": chunk_table(root / shard.array, keys),
        **({"array": shard.array} if shard.array != GRADS_DIR else {}),
        "meta": file_crc(meta_path),
        **({"statistics": shard_statistics_path(root, shard.index).name} if statistics is not None else {}),
        **({"statistics_crc": file_crc(shard_statistics_path(root, shard.index))} if statistics is not None else {}),
    }
    write_json_atomic(shard_marker(root, shard.index), marker)
    return marker


def _fsync_chunks(array_dir: Path, keys: list[str]) -> None:
    """Flush this shard's chunk files before it is declared done (all-zero chunks have none)."""
    for key in keys:
        path = array_dir / key
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def update_shard_table(root: StorePath, manifest: dict) -> dict:
    done = done_shards(root)
    for entry in manifest["shards"]:
        entry["done"] = entry["shard"] in done
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return manifest


def consolidate_meta(root: StorePath, manifest: dict) -> None:
    """Every shard's metadata into one meta.parquet, streamed shard by shard (memory: one shard, not the store),
    in small row groups: a query's hits read the few groups that hold them (train_text), never the whole file."""
    import pyarrow.parquet as pq

    target = root / META_FILE
    part = temporary_name(target) if is_local(root) else target  # one put on object storage
    sink = str(part) if is_local(root) else part.fs.open(part.path, "wb")
    rows, writer = 0, None
    try:
        for entry in manifest["shards"]:
            table = read_parquet(shard_meta_path(root, entry["shard"]))
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema, write_statistics=False)  # kept in memory per group
            elif table.schema != writer.schema:  # e.g. an appended file's integer labels beside float ones
                table = table.cast(writer.schema)
            writer.write_table(table, row_group_size=META_ROW_GROUP)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
        if not is_local(root):
            sink.close()
    if rows != manifest["n_rows"]:
        raise StoreError(f"store '{root}': metadata has {rows} rows, expected {manifest['n_rows']}")
    if is_local(root):
        with open(part, "rb+") as handle:
            os.fsync(handle.fileno())
        part.replace(target)


def finalize_store(root: StorePath, manifest: dict, summary: dict) -> dict:
    """All shards done: consolidate metadata into meta.parquet (its size and crc32 recorded in the manifest, for
    verify) and mark the store complete."""
    done = done_shards(root)
    missing = [e["shard"] for e in manifest["shards"] if e["shard"] not in done]
    if missing:
        raise StoreError(f"store '{root}' cannot be finalised: shards {missing[:10]} are not done; rerun the build")
    consolidate_meta(root, manifest)
    manifest = update_shard_table(root, manifest)
    manifest["meta_checksum"] = file_crc(root / META_FILE)
    manifest["status"] = "complete"
    manifest["summary"] = summary
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return manifest
