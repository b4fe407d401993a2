"""Checksums on every read, and the chunk tables that let `verify` find damage without decoding.

Every chunk of every Zarr array tdastore writes (the gradient store, the gold standard, LDS, metagradients, score
matrices) ends in a crc32c (Zarr v3's `crc32c` codec, after compression), which Zarr checks whenever it decodes
the chunk: a flipped byte is a StoreError at the first read, never a number in a result. Arrays written before
it (no `crc32c` in their zarr.json) still open and read as before; `verify --deep` checks their chunks against
the crc32 their `.done` markers recorded.

A unit's `.done` marker records the chunk table of what it wrote, {key: [size, crc32]} of the encoded files, so
`verify` finds a truncated, replaced or deleted chunk by its size (cheap) or bytes (deep). Keys are confined to
the store: one that leaves it is damage, never a path to follow.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from itertools import product
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from tdastore.errors import StoreError
from tdastore.store.location import StorePath, zarr_store


class BatchedCrc32cCodec(Crc32cCodec):
    """Zarr's crc32c codec (same name, same bytes), decoding and encoding a batch of chunks in one loop.

    Why: Zarr runs a bytes-to-bytes codec as one asyncio task per chunk, and that scheduling, not the crc32c
    (~30 GB/s), was the whole cost: +13% on a streamed pass of a float16 zstd store, +18% uncompressed. In one
    loop: +3% to +5% with zstd, +6% to +8% uncompressed (benchmarks/checksum_cost.py). Registered for the name
    "crc32c" when this module is imported, so every array tdastore opens checks its chunks through it."""

    async def decode(self, chunks_and_specs):
        return [None if chunk is None else self._decode_sync(chunk, spec) for chunk, spec in chunks_and_specs]

    async def encode(self, chunks_and_specs):
        return [None if chunk is None else self._encode_sync(chunk, spec) for chunk, spec in chunks_and_specs]


zarr.registry.register_codec("crc32c", BatchedCrc32cCodec)
zarr.config.set({"codecs.crc32c": f"{__name__}.BatchedCrc32cCodec"})

CHUNK_KEY = re.compile(r"^(?:[A-Za-z0-9_]+\.zarr/)?c(?:/\d+)+$")  # Zarr v3 default keys: [array/]c/i/j/...
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain file name, no separators, no '..'
RELATIVE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.=+-]*)*$")  # no '..', no '/x'


def checksummed(compressors: list | None) -> list:
    """The bytes-to-bytes codecs of a new array: `compressors` (None: none), then crc32c over their output."""
    return [*(compressors or []), BatchedCrc32cCodec()]


def create_array(path: StorePath, **kwargs) -> zarr.Array:
    """zarr.create_array at `path` with a crc32c on every chunk; compressors default to Zarr's zstd."""
    compressors = kwargs.pop("compressors", [ZstdCodec(level=0)])
    return zarr.create_array(store=zarr_store(path), compressors=checksummed(compressors), **kwargs)


def read_array(path: StorePath, selection=slice(None), *, what: str, fix: str) -> np.ndarray:
    """array[selection] of the Zarr array at `path`; a missing, undecodable or corrupt chunk (checksum mismatch)
    is a StoreError naming `what`, the cause and `fix`."""
    try:
        array = zarr.open_array(store=zarr_store(path, read_only=True), mode="r")
    except Exception as err:  # zarr raises several kinds for missing or damaged metadata
        raise StoreError(f"{what}: the array '{path}' is missing or damaged ({err}); {fix}") from err
    return read_region(array, selection, what=what, fix=fix)


def read_region(array: zarr.Array, selection, *, what: str, fix: str) -> np.ndarray:
    try:
        return array[selection]
    except Exception as err:  # checksum mismatch (ValueError), truncated zstd frames, short files, ...
        raise StoreError(f"{what} cannot be read: {describe_read_error(err)}; {fix}") from err


def describe_read_error(err: Exception) -> str:
    text = str(err)
    if "checksum" in text.lower():
        return "a chunk is corrupt (its crc32c does not match its bytes)"
    return f"a chunk cannot be decoded ({type(err).__name__}: {text[:200]})"


def region_chunk_keys(array: zarr.Array, region: tuple[slice, ...], prefix: str = "") -> list[str]:
    """The keys ('<prefix>c/i/j/...') of the chunks that `region` (one slice per dimension) touches."""
    ranges = []
    for size, chunk, part in zip(array.shape, array.chunks, region, strict=True):
        start, stop, _ = part.indices(size)
        ranges.append(range(start // chunk, -(-stop // chunk)) if stop > start else range(0))
    return [prefix + "c/" + "/".join(map(str, index)) for index in product(*ranges)]


def chunk_table(root: StorePath, keys: Iterable[str]) -> dict[str, list[int]]:
    """{key: [size, crc32]} of the encoded chunk files under `root` (keys of chunks with no file, all fill
    value, are left out: the table says which files must exist)."""
    table = {}
    for key in keys:
        path = root / key
        if path.is_file():
            data = path.read_bytes()
            table[key] = [len(data), zlib.crc32(data)]
    return table


def confined(root: StorePath, key: str, pattern: re.Pattern = CHUNK_KEY) -> StorePath | None:
    """root/key when `key` is a name of ours that stays inside `root`, else None (damage: never followed)."""
    if not isinstance(key, str) or not pattern.match(key):
        return None
    return root / key


def chunk_table_problem(root: StorePath, table: dict, deep: bool) -> str | None:
    """Why the chunk files under `root` differ from the table a marker recorded, or None."""
    if not isinstance(table, dict):
        return "its chunk table is damaged"
    for key, entry in table.items():
        path = confined(root, key)
        if path is None:
            return f"its marker names a chunk outside the store ({str(key)[:80]!r}): the marker is damaged"
        if not (isinstance(entry, list) and len(entry) == 2):
            return f"its chunk table entry for {key} is damaged"
        size, crc = entry
        if not path.is_file():
            return f"chunk {key} is missing"
        data = path.read_bytes() if deep else None
        actual = len(data) if data is not None else file_size(path)
        if actual != size:
            return f"chunk {key} has {actual} bytes, {size} were written (truncated or replaced)"
        if deep and zlib.crc32(data) != crc:
            return f"chunk {key} does not match its checksum (corrupt)"
    return None


def file_size(path: StorePath) -> int:
    return path.stat().st_size if isinstance(path, Path) else int(path.fs.size(path.path))


def file_crc(path: StorePath) -> list[int]:
    """[size, crc32] of a whole file (metadata files: recorded at write, checked by verify), read 8 MB at a time:
    a ten-million-row store's meta.parquet is 300 MB, and reading it whole set the build driver's peak memory."""
    size, crc = 0, 0
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            size, crc = size + len(block), zlib.crc32(block, crc)
    return [size, crc]


def sha256_of(path: StorePath) -> str:
    """The sha256 of a file, read 8 MB at a time (an index shard of a big store is gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def written_chunks(root: StorePath, name: str, array: zarr.Array, region: tuple[slice, ...]) -> dict[str, list[int]]:
    """The chunk table of what a unit just wrote into array `name` of the job store at `root` (keys relative to
    `root`: '<name>/c/i/j/...'), for its `.done` marker."""
    return chunk_table(root, region_chunk_keys(array, region, prefix=f"{name}/"))


JOB_REPAIR = "rerun the job's command (ground-truth, metagrad or lds): it recomputes the damaged units"
