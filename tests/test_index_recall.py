"""Approximate FAISS kinds against flat on 100k stored gradients of a trained model."""

import numpy as np
import pytest

import tdastore
from tdastore.distributed.build import build_store
from tdastore.tasks.synthetic import write_synthetic_regression

ROWS = 101_000


@pytest.fixture(scope="module")
def large_store(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recall")
    write_synthetic_regression(tmp / "data.parquet", ROWS, 20)
    config = tdastore.load_config(
        {
            "task": {"dataset": str(tmp / "data.parquet"), "kind": "regression", "target": "y", "test_fraction": 0.01},
            "model": {"hidden": [64, 64]},
            "train": {"epochs": 2, "lr": 0.01, "batch_size": 256, "output_dir": str(tmp / "model")},
            "gradients": {"batch_size": 1024},
            "projection": {"kind": "factored", "factors": [8, 8]},
            "store": {"chunk_rows": 4096, "shard_rows": 16384},
        }
    )
    tdastore.train(config, progress=False)
    return build_store(config, tmp / "store", progress=False)


def recall_at_10(reference, candidate) -> float:
    a = reference.column("train_row").to_numpy().reshape(-1, 10)
    b = candidate.column("train_row").to_numpy().reshape(-1, 10)
    return float(np.mean([len(set(r) & set(c)) / 10 for r, c in zip(a, b)]))


@pytest.mark.parametrize("method", ["grad_dot", "if_gn"])
def test_each_kind_reaches_recall_095(large_store, method):
    """Stated configuration (IndexConfig defaults): ivf and pq nlist = 4 sqrt(N), nprobe 64 (pq: IVF-PQ with
    dim/4 sub-quantizers, exact re-ranking of 4 x top-k); hnsw M 32, efSearch 256; sq8 8-bit scalar."""
    assert large_store.n_rows > 99_000
    flat = tdastore.query(large_store, method, split="test", top_k=10, kind="flat")
    assert flat.num_rows == 10 * 1010
    for kind in ("ivf", "hnsw", "sq8", "pq"):
        recall = recall_at_10(flat, tdastore.query(large_store, method, split="test", top_k=10, kind=kind))
        assert recall >= 0.95, (kind, recall)


def test_a_quantiser_trained_on_a_sample_is_shared_by_every_shard(large_store):
    """index.train_rows: one IVF quantiser trained on 16,384 rows spread over the store serves four index shards
    (the same centroids in each) at recall >= 0.95 against flat."""
    import faiss

    overrides = {"index": {"shard_rows": 32768, "train_rows": 16384, "nlist": 256}}
    flat = tdastore.query(large_store, "grad_dot", split="test", top_k=10, kind="flat")
    shared = tdastore.query(large_store, "grad_dot", split="test", top_k=10, kind="ivf", overrides=overrides)
    assert recall_at_10(flat, shared) >= 0.95
    folder = large_store.root / "indexes" / "grad_dot-ivf"
    indexes = [faiss.read_index(str(p)) for p in sorted(folder.glob("*.faiss"))]  # alive while their parts are read
    assert len(indexes) == 4
    centroids = [faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 256) for index in indexes]
    assert all(np.array_equal(centroids[0], c) for c in centroids[1:])
