"""Stores at fsspec URIs: file:// through the Ray build, memory:// through the same writer in one process."""

import fsspec
import numpy as np
import pytest
from conftest import small_config
from helpers import assert_same_top_k, ranked_atol
from upath import UPath

import tdastore
from tdastore.distributed.build import build_store, store_identity
from tdastore.distributed.gradient_worker import ShardComputer
from tdastore.errors import StoreError
from tdastore.store.location import store_path
from tdastore.store.writer import finalize_store, plan_shards, prepare_store, write_shard


@pytest.fixture
def config(tmp_path):
    config = small_config(tmp_path, projection={"kind": "gaussian", "dim": 32})
    tdastore.train(config, progress=False)
    return config


def test_file_uri_store_reads_back_equal(ray_cluster, tmp_path, config):
    local = build_store(config, tmp_path / "local", progress=False)
    uri = f"file://{tmp_path / 'by_uri'}"
    built = build_store(config, uri, progress=False)
    reopened = tdastore.open_store(uri)
    np.testing.assert_array_equal(reopened.read_rows(), local.read_rows())
    assert reopened.meta.equals(local.meta) and built.manifest["status"] == "complete"


def write_in_process(config, uri: str):
    """The build's own writer, shard by shard, without Ray (memory:// lives in this process only)."""
    root = store_path(uri)
    identity = store_identity(config, "train")
    n_rows = identity.pop("_n_rows")
    manifest = prepare_store(
        root,
        identity,
        n_rows,
        identity["projection"]["out_dim"],
        config.store.dtype,
        {"config": tdastore.config.config_to_dict(config)},
    )
    computer = ShardComputer(config, "train")
    for shard in plan_shards(n_rows, config.store.shard_rows):
        rows, meta = computer.compute(shard)
        write_shard(root, shard, rows, meta)
    finalize_store(root, manifest, {})
    return root


def test_memory_uri_store_reads_back_equal(ray_cluster, tmp_path, config):
    local = build_store(config, tmp_path / "local", progress=False)
    uri = "memory://tdastore-test/store"
    try:
        root = write_in_process(config, uri)
        assert isinstance(root, UPath)
        fs = fsspec.filesystem("memory")
        assert fs.exists("/tdastore-test/store/manifest.json") and fs.exists("/tdastore-test/store/meta.parquet")
        remote = tdastore.open_store(uri)
        np.testing.assert_array_equal(remote.read_rows(), local.read_rows())
        assert remote.meta.equals(local.meta)
        # queries stream from the remote store; its fitted operator and index are saved there too
        a = tdastore.query(remote, "if_gn", split="test", top_k=5)
        b = tdastore.query(local, "if_gn", split="test", top_k=5)
        np.testing.assert_array_equal(a.column("train_id").to_numpy(), b.column("train_id").to_numpy())
        np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=1e-5)
        flat = tdastore.query(remote, "grad_dot", split="test", kind="flat")
        assert fs.exists("/tdastore-test/store/indexes/grad_dot-flat/index.json")
        streamed = tdastore.query(local, "grad_dot", split="test")
        assert_same_top_k(flat, streamed, ranked_atol(streamed, local.dim))  # FAISS's products vs torch's
        with pytest.raises(StoreError, match="built with a different setup"):
            write_in_process(small_config(tmp_path, projection={"kind": "gaussian", "dim": 16}), uri)
    finally:
        fsspec.filesystem("memory").rm("/tdastore-test", recursive=True)


def test_missing_remote_store_is_a_clear_error():
    with pytest.raises(StoreError, match="does not exist"):
        tdastore.open_store("memory://nothing-here/store")
