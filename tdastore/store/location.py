"""Where a store lives: a local directory (pathlib.Path) or an fsspec URI (memory://, s3://, gs://, ...).

`store_path` returns a pathlib.Path for local paths and file:// URIs, and a universal-pathlib `UPath`
otherwise: one fsspec filesystem object (`.fs`, `.path`) through which the manifest, the Zarr array and the
Parquet metadata are all read and written. Object stores have no rename and no fsync; a single object put is
atomic, which is what the shard markers and the manifest rely on (`write_parquet_atomic`, `write_bytes_atomic`
put once there, and write a temporary sibling then rename locally).
"""

from __future__ import annotations

import os
from pathlib import Path

from upath import UPath

from tdastore.atomic import temporary_name

StorePath = Path | UPath


def store_path(location: str | Path | UPath) -> StorePath:
    """A local Path (plain paths and file:// URIs) or a UPath (any other fsspec protocol)."""
    if isinstance(location, (Path, UPath)):
        return location
    text = str(location)
    if "://" not in text:
        return Path(text)
    protocol = text.split("://", 1)[0]
    if protocol == "file":
        return Path(text[len("file://") :])
    # no listing cache: other nodes write shards and markers this process must see when it lists them
    return UPath(text, use_listings_cache=False)


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
        return FsspecStore.from_url(str(path), storage_options=path.storage_options, read_only=read_only)
    return FsspecStore(AsyncFileSystemWrapper(path.fs, asynchronous=True), path=path.path, read_only=read_only)


def read_parquet(path: StorePath, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    if is_local(path):
        return pq.read_table(str(path), columns=columns)
    return pq.read_table(path.path, filesystem=path.fs, columns=columns)


def open_parquet(path: StorePath):
    """A pyarrow ParquetFile (footer read, no data) for reading row groups on demand."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(path)) if is_local(path) else pq.ParquetFile(path.path, filesystem=path.fs)


def write_parquet(table, path: StorePath, row_group_size: int | None = None) -> None:
    import pyarrow.parquet as pq

    if is_local(path):
        pq.write_table(table, str(path), row_group_size=row_group_size)
    else:
        pq.write_table(table, path.path, filesystem=path.fs, row_group_size=row_group_size)


def write_parquet_atomic(table, path: StorePath, row_group_size: int | None = None) -> None:
    """No reader sees half a file: a temporary sibling renamed locally, one put on object storage."""
    if not is_local(path):
        write_parquet(table, path, row_group_size)
        return
    tmp = temporary_name(path)
    write_parquet(table, tmp, row_group_size)
    tmp.replace(path)
