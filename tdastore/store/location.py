"""Where a store lives: a local directory (pathlib.Path) or an fsspec URI (memory://, s3://, gs://, ...).

`store_path` returns a pathlib.Path for local paths and file:// URIs, and a RemotePath otherwise: a small
pathlib-like handle over one fsspec filesystem object, through which the manifest, the Zarr array and the
Parquet metadata are all read and written. Object stores have no rename of directories and no fsync; a
single object put is atomic, which is what the shard markers and the manifest rely on.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec


class RemotePath:
    """The subset of pathlib.Path the store uses, on an fsspec filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, protocol: str):
        self.fs, self.path, self.protocol = fs, path.rstrip("/"), protocol

    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{part}", self.protocol)

    def __str__(self) -> str:
        return (
            f"{self.protocol}://{self.path.lstrip('/')}"
            if self.protocol == "memory"
            else f"{self.protocol}://{self.path}"
        )

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def with_name(self, name: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path.rsplit('/', 1)[0]}/{name}", self.protocol)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def iterdir(self) -> Iterator[RemotePath]:
        for entry in self.fs.ls(self.path, detail=False):
            yield RemotePath(self.fs, entry, self.protocol)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        return (p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)) if self.is_dir() else iter(())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def replace(self, target: RemotePath) -> None:
        self.fs.mv(self.path, target.path)

    def touch(self) -> None:
        self.write_bytes(b"")

    def unlink(self) -> None:
        self.fs.rm(self.path)


StorePath = Path | RemotePath


def store_path(location: str | Path | RemotePath) -> StorePath:
    """A local Path (plain paths and file:// URIs) or a RemotePath (any other fsspec protocol)."""
    if isinstance(location, (Path, RemotePath)):
        return location
    text = str(location)
    if "://" not in text:
        return Path(text)
    protocol = text.split("://", 1)[0]
    if protocol == "file":
        return Path(text[len("file://") :])
    # no listing cache: other nodes write shards and markers this process must see when it lists them
    fs, path = fsspec.core.url_to_fs(text, use_listings_cache=False)
    return RemotePath(fs, path, protocol)


def is_local(path: StorePath) -> bool:
    return isinstance(path, Path)


def absolute(path: StorePath) -> StorePath:
    """A local path made absolute (resolved); a URI as it is."""
    return path.resolve() if is_local(path) else path


def writable(root: StorePath) -> bool:
    """Whether derived artefacts (fitted operators, indexes) may be saved beside a store: a local directory this
    process may write, or object storage (written with single puts)."""
    return os.access(root, os.W_OK) if is_local(root) else True


def zarr_store(path: StorePath, read_only: bool = False):
    """What zarr opens: a directory string locally, an FsspecStore on the same filesystem otherwise."""
    if is_local(path):
        return str(path)
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from zarr.storage import FsspecStore

    if getattr(path.fs, "async_impl", False):
        # s3fs / gcsfs: zarr runs its own event loop, so it needs an instance made for asynchronous use there
        # (sharing the synchronous one fails with "attached to a different loop")
        return FsspecStore.from_url(str(path), storage_options=path.fs.storage_options, read_only=read_only)
    return FsspecStore(AsyncFileSystemWrapper(path.fs, asynchronous=True), path=path.path, read_only=read_only)


def read_parquet(path: StorePath):
    import pyarrow.parquet as pq

    return pq.read_table(str(path)) if is_local(path) else pq.read_table(path.path, filesystem=path.fs)


def write_parquet(table, path: StorePath) -> None:
    import pyarrow.parquet as pq

    if is_local(path):
        pq.write_table(table, str(path))
    else:
        pq.write_table(table, path.path, filesystem=path.fs)
