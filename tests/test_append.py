"""Stores that grow: `tdastore build --append` adds rows as new shards of the same spec, equal to a build of the
union, with operators refit and indexes grown without retraining their quantiser."""

import dataclasses
import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

import tdastore
from tdastore.cli import main as cli_main
from tdastore.config import load_config
from tdastore.distributed.build import build_store
from tdastore.errors import StoreError
from tdastore.grads.per_example import PerExampleGradients
from tdastore.grads.projection import make_projector
from tdastore.store.verify import verify_store
from tdastore.tasks import TabularTask
from tdastore.training import load_model


def objects_route(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A small regression on the objects route: inputs [n, 6], targets [n], and build's model / loss / test data."""
    torch.manual_seed(seed)
    x, y = torch.randn(n, 6), torch.randn(n)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    loss = lambda out, target: (out.squeeze(-1) - target) ** 2  # noqa: E731
    return x, y, {"model": model, "loss": loss, "test_data": (x[:5], y[:5]), "progress": False}


def test_append_then_append_equals_a_build_of_the_union(ray_cluster, tmp_path):
    """Objects route: append(A) (a build) then append(B) holds the rows of build(A+B) bit for bit, with the same
    ids and metadata; a fitted operator is refit on the grown store (scores equal the union store's), a flat index
    grows to brute force's top-k, and an IVF index keeps its old shard and quantiser for the new rows."""
    x, y, objects = objects_route(700, seed=0)
    config = load_config(
        {
            "device": "cpu",
            "store": {"chunk_rows": 32, "shard_rows": 128},
            "projection": {"kind": "gaussian", "dim": 24},
            "build": {"workers": 2, "max_retries": 0},
            "index": {"nlist": 4, "nprobe": 4},
        }
    )
    union = tdastore.build(config, tmp_path / "union", data=(x, y), **objects)
    grown = tdastore.build(config, tmp_path / "grown", data=(x[:450], y[:450]), append=True, **objects)
    test = (x[:5], y[:5])
    before = tdastore.Attributor(grown, "if_gn").score_matrix(test)  # fits and saves the operator on 450 rows
    tdastore.Attributor(grown, "grad_dot", kind="ivf").top_k(test, 3)  # an IVF index of 450 rows
    ivf = tmp_path / "grown" / "indexes" / "grad_dot-ivf"
    old_shard = (ivf / "shard-0000.faiss").read_bytes()

    grown = tdastore.build(config, tmp_path / "grown", data=(x[450:], y[450:]), append=True, **objects)
    assert grown.n_rows == 700 and [s["array"] for s in grown.manifest["segments"]] == ["grads.zarr", "grads-0001.zarr"]
    assert np.array_equal(grown.read_rows(), union.read_rows())  # bit for bit, across the segment boundary
    for column in ("example_id", "row", "loss", "grad_norm"):
        assert grown.meta.column(column).equals(union.meta.column(column)), column
    assert verify_store(grown.root, deep=True) == []
    assert all(e["stale"] for e in grown.manifest["preconditioners"].values())

    after = tdastore.Attributor(grown, "if_gn").score_matrix(test)  # stale: refit on 700 rows
    np.testing.assert_allclose(after, tdastore.Attributor(union, "if_gn").score_matrix(test), rtol=1e-5, atol=1e-6)
    assert before.shape == (5, 450) and after.shape == (5, 700)

    hits = tdastore.Attributor(grown, "grad_dot", kind="flat").top_k(test, 10)
    plain = tdastore.Attributor(union, "grad_dot")
    queries = plain.test_rows(plain.examples(test))  # [5, 24]
    expected = np.argsort(-(queries @ union.read_rows().T), axis=1, kind="stable")[:, :10]  # brute force
    assert np.array_equal(hits.column("train_row").to_numpy().reshape(5, 10), expected)

    tdastore.Attributor(grown, "grad_dot", kind="ivf").top_k(test, 3)
    described = json.loads((ivf / "index.json").read_text())
    assert described["n_rows"] == 700 and described["appended_from_row"] == 450
    assert (ivf / "shard-0000.faiss").read_bytes() == old_shard  # the old rows' shard stands
    first, new = (faiss.read_index(str(ivf / s[2])) for s in (described["shards"][0], described["shards"][-1]))
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 4) for i in (first, new)]
    assert np.array_equal(*centroids) and new.ntotal == 700 - described["shards"][-1][0]

    again = tdastore.build(config, tmp_path / "grown", data=(x[450:], y[450:]), append=True, **objects)
    assert again.n_rows == 700  # the same data again (a notebook cell run twice): nothing appended

    (tmp_path / "grown" / "shards" / "000000.done").unlink()  # a shard of A's rows lost
    assert cli_main(["verify", str(tmp_path / "grown")]) == 2
    with pytest.raises(StoreError, match="other data than this run's; rerun the store's own build"):
        tdastore.build(config, tmp_path / "grown", data=(x[450:], y[450:]), append=True, **objects)


def test_append_a_file_with_the_stores_own_encoding_and_refusals(ray_cluster, tmp_path, trained_config, capsys):
    """Config route: `tdastore build --append --task.dataset B.csv` encodes B with the store's own z-scores; its
    rows equal autograd's per-example gradients of those examples; ids already stored, another projection, and
    an incomplete store are refused with the store unchanged."""
    config = dataclasses.replace(trained_config, projection=dataclasses.replace(trained_config.projection,
                                 kind="gaussian", dim=32))  # fmt: skip
    store = build_store(config, tmp_path / "store", progress=False)
    task = TabularTask(config.task, config.model)
    train = task.examples("train")
    raw = np.random.default_rng(0).normal(size=(40, len(task.columns)))
    columns = {name: raw[:, i] for i, name in enumerate(task.columns)}
    table = pa.table({**columns, "target": np.linspace(50, 300, 40), "id": np.arange(5000, 5040)})
    pacsv.write_csv(table, tmp_path / "new.csv")
    pacsv.write_csv(table.set_column(table.num_columns - 1, "id", pa.array(train.ids[:40])), tmp_path / "dup.csv")

    args = ["build", "--append", "--output", str(store.root), "--quiet"]
    assert cli_main([*args, "--task.dataset", str(tmp_path / "new.csv")]) == 0
    grown = tdastore.open_store(store.root)
    assert grown.n_rows == store.n_rows + 40
    assert np.array_equal(grown.read_rows(0, store.n_rows), store.read_rows())  # old rows untouched
    new = task.encode(table)  # the store's own standardisation
    model = load_model(config, task)
    pe = PerExampleGradients(model, task.per_example_loss, config.gradients.params)
    grads, losses = pe(new.inputs, new.targets)
    expected = make_projector(config.projection, pe.shapes).project(grads).numpy()
    np.testing.assert_allclose(grown.read_rows(store.n_rows), expected, rtol=1e-4, atol=1e-6)
    assert grown.meta.column("example_id").to_numpy()[store.n_rows :].tolist() == list(range(5000, 5040))
    np.testing.assert_allclose(grown.meta.column("loss").to_numpy()[store.n_rows :], losses.numpy(), rtol=1e-5)

    listing = sorted(p.name for p in grown.root.rglob("*"))
    capsys.readouterr()
    assert cli_main([*args, "--task.dataset", str(tmp_path / "dup.csv")]) == 2
    assert "already in store" in capsys.readouterr().err
    assert cli_main([*args, "--task.dataset", str(tmp_path / "new.csv"), "--projection.dim", "16"]) == 2
    assert "projection: store has" in capsys.readouterr().err
    assert cli_main(["build", "--output", str(store.root), "--keep-operators", "--quiet"]) == 2
    now = sorted(p.name for p in grown.root.rglob("*"))
    assert now == listing, set(now) ^ set(listing)
    assert tdastore.open_store(store.root).n_rows == store.n_rows + 40
    with pytest.raises(StoreError, match="already in store"):
        dup = dataclasses.replace(config.task, dataset=str(tmp_path / "dup.csv"))
        build_store(dataclasses.replace(config, task=dup), store.root, progress=False, append=True)


def test_appending_to_a_pca_store_keeps_its_basis(ray_cluster, tmp_path):
    """projection.basis pca: rows appended later are projected with the store's own fitted sides (the new data
    never refits them), so build(A) + append(B) holds build(A+B)'s basis and rows when both fit on A's first rows
    (rows to float32 rounding: the appended rows are batched from another first row)."""
    x, y, objects = objects_route(400, seed=1)
    config = load_config(
        {
            "device": "cpu",
            "store": {"chunk_rows": 32, "shard_rows": 64},
            "projection": {"kind": "factored", "factors": [4, 4], "basis": "pca", "basis_examples": 200},
            "build": {"workers": 2, "max_retries": 0},
        }
    )
    union = tdastore.build(config, tmp_path / "union", data=(x, y), **objects)
    grown = tdastore.build(config, tmp_path / "grown", data=(x[:250], y[:250]), append=True, **objects)
    basis = (grown.root / "basis.safetensors").read_bytes()
    assert grown.manifest["projection"]["basis"]["examples"] == 200  # more than B holds: B alone would refit
    grown = tdastore.build(config, tmp_path / "grown", data=(x[250:], y[250:]), append=True, **objects)
    assert grown.n_rows == 400 and (grown.root / "basis.safetensors").read_bytes() == basis
    assert grown.manifest["projection"] == union.manifest["projection"]
    np.testing.assert_allclose(grown.read_rows(), union.read_rows(), rtol=1e-5, atol=1e-6)
