"""Projected-path methods, FAISS search and queries against independent numpy computations."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config
from helpers import (
    assert_same_ranking,
    assert_same_top_k,
    assert_within,
    float32_atol,
    product_scale,
    projection_matrix,
)
from test_exact_methods import rel_err

import tdastore
from tdastore.cli import main as cli_main
from tdastore.distributed.build import build_store
from tdastore.errors import ConfigError, DataError, StoreError
from tdastore.grads.projection import make_projector
from tdastore.precond.projected.cache import operator_key
from tdastore.tasks import TabularTask
from tdastore.training import load_model


@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query")
    config = small_config(tmp, projection={"kind": "gaussian", "dim": 128, "seed": 5}, train={"epochs": 20})
    tdastore.train(config, progress=False)
    store = build_store(config, tmp / "store", progress=False)
    task = TabularTask(config.task, config.model)
    model = load_model(config, task)
    test = task.examples("test").slice(0, 12)
    # independent test side: a per-example autograd loop, projected with the explicit matrices
    params = dict(model.named_parameters())
    proj = make_projector(config.projection, {n: tuple(p.shape) for n, p in params.items()})
    matrix = torch.cat([projection_matrix(proj, n) for n in params]).double().numpy()  # [p, k]
    rows = []
    for i in range(len(test)):
        loss = task.test_function(model(test.inputs[i : i + 1]), test.targets[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
    t = torch.stack(rows).double().numpy() @ matrix  # [m, k]
    g = np.asarray(store.grads[:], dtype=np.float64)  # [N, k]
    return config, store, task, test, t, g, tmp


def fisher_parts(g):
    n, k = g.shape
    fisher = g.T @ g / n
    return fisher, np.trace(fisher) / k


def score_sides(method, t, g, config):
    """(left [m, k], right [n, k]) with the method's scores = left @ right.T / n, in float64."""
    n, k = g.shape
    fisher, lambda_0 = fisher_parts(g)
    lam = config.attribution.damping_factor * lambda_0
    if method == "grad_dot":
        return t, g
    if method == "tracin_final":
        return config.train.lr * t, g
    if method == "grad_cos":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        return unit(t), unit(g)
    if method == "if_gn":
        return np.linalg.solve(fisher + lam * np.eye(k), t.T).T, g
    if method == "if_diag":
        return t / (np.diag(fisher) + np.diag(fisher).mean() * config.attribution.damping_factor), g
    if method == "trak1":
        return t @ np.linalg.pinv(fisher, rcond=1e-8, hermitian=True), g
    if method == "datainf":
        lam_l = (g**2).mean() / 10
        matrix = (np.eye(k) - sum(np.outer(r, r) / (lam_l + r @ r) for r in g) / n) / lam_l
        return t @ matrix, g
    if method == "lissa":  # the recursion itself, run explicitly
        scale = 1.1 * (np.linalg.eigvalsh(fisher)[-1] + lam)
        x = t.T.copy()
        for _ in range(1, config.attribution.lissa_depth):
            x = t.T + x - ((fisher + lam * np.eye(k)) @ x) / scale
        return (x / scale).T, g
    raise KeyError(method)


def expected_scores(method, t, g, config):
    left, right = score_sides(method, t, g, config)
    return left @ right.T / len(g)


def score_atol(method, t, g, config):
    """The float32 rule for the method's scores [m, n]: sums of k products of the two sides' entries."""
    left, right = score_sides(method, t, g, config)
    return float32_atol(product_scale(left, right) / len(g), g.shape[1])


@pytest.mark.parametrize(
    "method", ["grad_dot", "grad_cos", "tracin_final", "if_gn", "if_diag", "trak1", "datainf", "lissa"]
)
def test_projected_methods_equal_numpy(built, method, tmp_path):
    config, store, task, test, t, g, _ = built
    expected = expected_scores(method, t, g, config)
    table = tdastore.query(store, method, inputs=test, top_k=store.n_rows, scores_out=tmp_path / "s.zarr")
    from tdastore.attribution.results import open_scores

    full, test_ids, train_ids = open_scores(tmp_path / "s.zarr")  # the matrix carries its ids as coordinates
    np.testing.assert_array_equal(test_ids, test.ids)
    np.testing.assert_array_equal(train_ids, store.meta.column("example_id").to_numpy())
    assert full.shape == expected.shape
    assert rel_err(full, expected) <= 1e-4
    got = np.zeros_like(expected)
    rows = table.column("train_row").to_numpy().reshape(len(test), -1)
    got[np.arange(len(test))[:, None], rows] = table.column("score").to_numpy().reshape(len(test), -1)
    assert rel_err(got, expected) <= 1e-4
    assert table.schema.metadata[b"tdastore.path"] == b"projected"


def test_lissa_closed_form_converges_to_the_solve(built):
    config, store, task, test, t, g, _ = built
    exact = expected_scores("if_gn", t, g, config)
    errors = [
        rel_err(
            tdastore.query(
                store, "lissa", inputs=test, top_k=1, scores_out=None, overrides={"attribution": {"lissa_depth": depth}}
            )
            .column("score")
            .to_numpy(),
            exact.max(1),
        )
        for depth in (3, 30, 3000)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_flat_index_equals_brute_force(built):
    config, store, task, test, t, g, _ = built
    for method in ("if_gn", "grad_cos", "grad_dot"):
        expected = expected_scores(method, t, g, config)
        table = tdastore.query(store, method, inputs=test, top_k=10, kind="flat")
        ids = table.column("train_row").to_numpy().reshape(len(test), 10)
        brute = np.argsort(-expected, axis=1, kind="stable")[:, :10]
        assert_same_ranking(ids, expected, score_atol(method, t, g, config))
        scores = table.column("score").to_numpy().reshape(len(test), 10)
        assert rel_err(scores, np.take_along_axis(expected, brute, 1)) <= 1e-4
    manifest = tdastore.open_store(store.root).manifest
    assert {"if_gn-flat", "grad_cos-flat", "grad_dot-flat"} <= set(manifest["indexes"])
    assert any(entry["operator"] == "fisher" for entry in manifest["preconditioners"].values())


def test_index_is_not_rebuilt_when_up_to_date(built):
    config, store, task, test, t, g, _ = built
    tdastore.query(store, "grad_dot", inputs=test, top_k=3, kind="flat")
    shard = store.root / "indexes" / "grad_dot-flat" / "shard-0000.faiss"
    before = shard.stat().st_mtime_ns
    tdastore.query(store, "grad_dot", inputs=test, top_k=3, kind="flat")
    assert shard.stat().st_mtime_ns == before


def test_sharded_index_merges_top_k(built):
    config, store, task, test, t, g, _ = built
    expected = expected_scores("grad_dot", t, g, config)
    from tdastore.index.faiss_index import build_index
    from tdastore.methods import get_method
    from tdastore.precond.projected.spectral import SpectralOperator

    handle = build_index(
        store,
        get_method("grad_dot"),
        SpectralOperator("identity", store.dim),
        "identity-x",
        "flat",
        config.index.__class__(shard_rows=100),
        progress=False,
    )
    # store shards of 64 rows; two never fit in 100, the last two (64 + 33) do
    assert [s[:2] for s in handle.shards] == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 353)]
    scores, rows = handle.search((t / len(g)).astype(np.float32), 7)
    assert_same_ranking(rows, expected, score_atol("grad_dot", t, g, config))


def test_query_from_a_file_equals_the_split(built, tmp_path):
    config, store, task, test, t, g, _ = built
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    rows = np.searchsorted(np.arange(len(bunch.data)), test.ids)
    columns = {name: bunch.data[rows, i] for i, name in enumerate(bunch.feature_names)}
    columns["target"] = bunch.target[rows]
    columns["id"] = test.ids
    path = tmp_path / "inputs.csv"
    pacsv.write_csv(pa.table(columns), path)
    from_file = tdastore.query(store, "if_gn", inputs=str(path), top_k=5)
    from_split = tdastore.query(store, "if_gn", inputs=test, top_k=5)
    atol = score_atol("if_gn", t, g, config)  # the file's features pass through float64 -> float32 once more
    rows = from_file.column("train_row").to_numpy().reshape(len(test), 5)
    assert_same_ranking(rows, expected_scores("if_gn", t, g, config), atol)
    assert_same_top_k(from_file, from_split, atol.max(1, keepdims=True))
    np.testing.assert_array_equal(from_file.column("test_id").to_numpy()[::5], test.ids)


def test_bad_queries_are_clear_errors(built, tmp_path):
    config, store, task, test, t, g, _ = built
    with pytest.raises(ConfigError, match="unknown method 'influence'"):
        tdastore.query(store, "influence", inputs=test)
    with pytest.raises(ConfigError, match="top-k 1000 must lie in 1..353"):
        tdastore.query(store, "grad_dot", inputs=test, top_k=1000)
    narrow = pa.table({"age": [0.1], "target": [100.0]})
    with pytest.raises(DataError, match="lack 9 of the task's 10 feature columns"):
        tdastore.query(store, "grad_dot", inputs=narrow)
    from tdastore.tasks.base import Examples

    wrong = Examples(torch.zeros(2, 7), torch.zeros(2), np.arange(2), np.zeros(2))
    with pytest.raises(DataError, match=r"\(7,\) features per row, the task has 10"):
        tdastore.query(store, "grad_dot", inputs=wrong)
    with pytest.raises(ConfigError, match="if_h' has no projected path"):
        tdastore.query(store, "if_h", inputs=test)
    with pytest.raises(ConfigError, match="operator 'ekfac' on the projected path needs .* projection.kind: factored"):
        tdastore.query(store, "ekfac", inputs=test)
    tdastore.query(store, "if_gn", inputs=test, top_k=3, kind="flat")
    with pytest.raises(StoreError, match="built for operator fisher-.*rebuild it"):
        tdastore.query(
            store, "if_gn", inputs=test, top_k=3, kind="flat", overrides={"attribution": {"damping_factor": 100.0}}
        )
    description = store.root / "indexes" / "if_gn-flat" / "index.json"
    original = description.read_text()
    edited = json.loads(original)
    edited["projection"]["seed"] = 99
    description.write_text(json.dumps(edited))
    try:
        with pytest.raises(StoreError, match="another projection"):
            tdastore.query(store, "if_gn", inputs=test, top_k=3, kind="flat")
    finally:
        description.write_text(original)
    with pytest.raises(ConfigError, match="max_dense_dim"):  # fitting a new 128 x 128 operator is refused
        tdastore.query(
            store, "if_gn", inputs=test, overrides={"attribution": {"max_dense_dim": 64, "damping_factor": 3.0}}
        )


def test_exact_path_on_a_query_matches_the_projected_grad_dot_of_an_unprojected_store(ray_cluster, tmp_path):
    config = small_config(tmp_path, train={"epochs": 5})
    tdastore.train(config, progress=False)
    store = build_store(config, tmp_path / "store", progress=False)
    projected = tdastore.query(store, "grad_dot", split="test", top_k=5)
    exact = tdastore.query(store, "grad_dot", split="test", top_k=5, overrides={"attribution": {"path": "exact"}})
    np.testing.assert_array_equal(projected.column("train_id").to_numpy(), exact.column("train_id").to_numpy())
    np.testing.assert_allclose(projected.column("score").to_numpy(), exact.column("score").to_numpy(), rtol=1e-4)
    assert exact.schema.metadata[b"tdastore.path"] == b"exact"
    with pytest.raises(ConfigError, match="max_dense_dim"):  # 1,441 columns: a dense fisher is refused here
        tdastore.query(store, "if_gn", split="test", overrides={"attribution": {"max_dense_dim": 1000}})


def test_cli_index_and_query(built, tmp_path, capsys):
    config, store, task, test, t, g, _ = built
    assert cli_main(["index", str(store.root), "--method", "if_gn", "--kind", "hnsw", "--quiet"]) == 0
    out = tmp_path / "top.parquet"
    assert (
        cli_main(
            [
                "query",
                str(store.root),
                "--method",
                "if_gn",
                "--split",
                "test",
                "--top-k",
                "4",
                "--kind",
                "hnsw",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    table = pq.read_table(out)
    assert table.column_names[:4] == ["test_id", "rank", "train_id", "score"]
    assert table.num_rows == 4 * len(task.examples("test"))
    assert cli_main(["query", str(store.root), "--method", "nope", "--split", "test"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli_main(["query", str(store.root)]) == 2
    capsys.readouterr()
    assert cli_main(["info", str(store.root)]) == 0  # the store lists what was fitted and indexed beside it
    shown = capsys.readouterr().out
    assert f"operator     {operator_key('fisher', config.attribution)}: fisher (damping_factor=10.0)" in shown
    assert "index        if_gn-hnsw in indexes/if_gn-hnsw (operator fisher-" in shown


def test_every_method_row_points_at_registered_operators():
    from tdastore.methods import METHODS
    from tdastore.precond.registry import operator_class, registered

    for method in METHODS.values():
        if method.further_training:
            continue
        for path in ("projected", "exact"):
            if getattr(method, path) is not None:
                assert operator_class(path, getattr(method, path)).name == getattr(method, path)
    assert {"identity", "fisher", "diagonal", "lissa_fisher", "trak", "datainf", "kfac", "ekfac"} <= set(
        registered("projected")
    )
    with pytest.raises(ConfigError, match="no projected operator 'nope'"):
        operator_class("projected", "nope")


def test_a_new_method_is_one_class_and_one_row(built, monkeypatch):
    from tdastore.methods import METHODS, Method
    from tdastore.precond.projected.operators import ProjectedOperator
    from tdastore.precond.projected.spectral import Block, SpectralOperator
    from tdastore.precond.registry import _REGISTRY

    class HalfIdentity(ProjectedOperator):
        name, dense = "half_identity", False

        def fit(self, inputs):
            k = inputs.store.dim
            return SpectralOperator(self.name, k, [Block(0, k, np.full(k, 0.5))])

    monkeypatch.setitem(_REGISTRY, ("projected", "half_identity"), HalfIdentity)
    monkeypatch.setitem(METHODS, "half_dot", Method("half_dot", "half_identity", None, summary="Grad-Dot / 2"))
    config, store, task, test, t, g, _ = built
    table = tdastore.query(store, "half_dot", inputs=test, top_k=5)
    expected = np.sort(0.5 * t @ g.T / store.n_rows, axis=1)[:, ::-1][:, :5]
    assert rel_err(table.column("score").to_numpy().reshape(len(test), 5), expected) <= 1e-4


def test_bottom_k_from_the_index_equals_streamed_opponents(built):
    config, store, task, test, t, g, _ = built
    expected = config.train.lr * t @ g.T / store.n_rows  # tracin_final: an index no other test here touches
    for kind in (None, "flat"):
        table = tdastore.Attributor(store, "tracin_final", kind=kind).bottom_k(test, 4)
        rows = table.column("train_row").to_numpy().reshape(len(test), 4)
        assert_same_ranking(rows, -expected, score_atol("tracin_final", t, g, config))
        scores = table.column("score").to_numpy().reshape(len(test), 4)
        assert rel_err(scores, np.sort(expected, axis=1)[:, :4]) <= 1e-4


def test_a_read_only_store_is_queried_without_writing(built, monkeypatch):
    """Operators and indexes of a store the process may not write stay in memory (the service's replicas)."""
    import os

    from test_build import tree_digest

    config, store, task, test, t, g, _ = built
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    before = tree_digest(store.root)
    table = tdastore.Attributor(store, "if_diag", kind="hnsw").top_k(test, 5)
    assert tree_digest(store.root) == before
    expected = np.sort(expected_scores("if_diag", t, g, config), axis=1)[:, ::-1][:, :5]
    assert rel_err(table.column("score").to_numpy().reshape(len(test), 5), expected) <= 1e-3


def test_a_dense_operator_too_large_is_refused_before_any_work(ray_cluster, tmp_path, trained_config):
    """Projected DataInf on an unprojected store whose largest layer block is above max_dense_dim."""
    import time

    from test_build import tree_digest

    store = build_store(trained_config, tmp_path / "store", progress=False)  # blocks of 352, 1,056 and 33
    before, began = tree_digest(store.root), time.perf_counter()
    for method in ("datainf", "if_gn"):
        with pytest.raises(ConfigError, match=r"needs a 1,056 x 1,056 matrix|needs a 1,441 x 1,441 matrix"):
            tdastore.query(store, method, split="test", overrides={"attribution": {"max_dense_dim": 1000}})
    assert time.perf_counter() - began < 5 and tree_digest(store.root) == before


def test_score_units_tile_the_matrix():
    """Units cover every (input, row) once, ranges are whole chunk columns, and few input blocks are split
    into row ranges so every worker has work."""
    from tdastore.attribution.on_ray import plan_score_units

    for m, n, block, chunk, workers, ranges in (
        (12, 353, 12, 64, 2, None),
        (1000, 20000, 256, 8192, 2, None),
        (7, 100, 3, 10, 4, 1),
    ):
        covered = np.zeros((m, n), dtype=int)
        units = plan_score_units(m, n, block, chunk, workers, ranges)
        for u in units:
            covered[u.test_lo : u.test_hi, u.row_lo : u.row_hi] += 1
            assert u.row_lo % chunk == 0 and (u.row_hi % chunk == 0 or u.row_hi == n)
        assert (covered == 1).all()
        assert len(units) >= min(2 * workers, -(-m // block) * -(-n // chunk)) or ranges == 1
    assert len(plan_score_units(12, 353, 12, 64, 2)) == 4  # one input block: rows split in 4 ranges


def test_scores_on_ray_equal_in_process(built, tmp_path):
    """Top-k, bottom-k and the full score matrix computed by 2 Ray actors over input blocks x row ranges equal
    the in-process answers (projected and exact paths), and the written matrix carries the ids."""
    from tdastore.attribution import Attributor
    from tdastore.attribution.results import open_scores

    config, store, task, test, t, g, _ = built
    for method, overrides in (("if_gn", None), ("grad_cos", {"attribution": {"path": "exact"}})):
        local = Attributor(store, method, overrides)
        on_ray = Attributor(store, method, overrides, share=local, workers=2, ray_min_inputs=1)
        for chunks, answer in (((12, 64), "top_k"), ((5, 128), "bottom_k")):
            local.score_chunks = on_ray.score_chunks = chunks
            paths = [tmp_path / f"{method}-{answer}-{where}.zarr" for where in ("local", "ray")]
            expected = getattr(local, answer)(test, 7, scores_out=paths[0])
            got = getattr(on_ray, answer)(test, 7, scores_out=paths[1])
            assert got.schema.metadata[b"tdastore.workers"] == b"2"
            assert b"tdastore.workers" not in expected.schema.metadata
            # Ray actors (one thread each) and this process (two) sum the same products: the rule's tolerance
            if method == "if_gn":
                atol = score_atol(method, t, g, config).max(1, keepdims=True)  # [m, 1]
            else:  # exact cosines: unit vectors of all p parameters, |u| @ |v| <= 1
                p = sum(w.numel() for w in task.make_model().parameters())
                atol = float32_atol(1.0 / store.n_rows, p)
            assert_same_top_k(got, expected, atol)
            (full, test_ids, train_ids), (want, _, _) = open_scores(paths[1]), open_scores(paths[0])
            assert not np.isnan(full).any()  # every chunk written
            assert_within(full, want, atol)
            np.testing.assert_array_equal(test_ids, test.ids)
            np.testing.assert_array_equal(train_ids, store.meta.column("example_id").to_numpy())


def test_a_store_built_with_relative_paths_answers_from_anywhere_and_after_a_copy(ray_cluster, tmp_path, monkeypatch):
    """The manifest records resolved paths (and where the store was), so a query from another directory, or of
    the store copied with its model beside it after the originals are gone, answers as the first query did."""
    import shutil
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    config = small_config(Path("."), model={"hidden": [8]}, train={"epochs": 1})
    assert config.train.output_dir == "model"  # relative, as a user writes it
    tdastore.train(config, progress=False)
    expected = tdastore.query(tdastore.build(config, "store", progress=False), split="test", top_k=3)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    from_elsewhere = tdastore.query(tdastore.open_store(tmp_path / "store"), split="test", top_k=3)
    assert from_elsewhere.equals(expected)
    for part in ("store", "model"):
        shutil.copytree(tmp_path / part, tmp_path / "copy" / part)
        shutil.rmtree(tmp_path / part)
    copied = tdastore.query(tdastore.open_store(tmp_path / "copy" / "store"), split="test", top_k=3)
    assert copied.equals(expected)
    shutil.rmtree(tmp_path / "copy" / "model")
    with pytest.raises(StoreError, match="no trained weights"):
        tdastore.query(tdastore.open_store(tmp_path / "copy" / "store"), split="test", top_k=3)


def test_file_system_errors_name_their_own_cause():
    import errno

    from tdastore.cli import os_error_message

    missing = os_error_message(FileNotFoundError(errno.ENOENT, "No such file or directory", "b/store"))
    assert (
        missing
        == "No such file or directory (b/store): check the path (relative paths are read from the current directory)"
    )
    assert "read-only" in os_error_message(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert os_error_message(OSError("can't load tokenizer for 'gpt2tiny'")) == "can't load tokenizer for 'gpt2tiny'"


def test_raw_scale_and_aggregation_over_a_set_of_queries(built, tmp_path, capsys):
    """attribution.scale raw: the inner products without the paper's 1/n, on both paths; --aggregate ranks rows
    by the mean / sum / max of their scores over the test inputs, as numpy does from the full matrix."""
    config, store, task, test, t, g, tmp = built
    paper = attributor_of(store, "grad_dot").score_matrix(test)
    raw = attributor_of(store, "grad_dot", {"attribution": {"scale": "raw"}}).score_matrix(test)
    np.testing.assert_allclose(raw, paper * store.n_rows, rtol=1e-5, atol=1e-6 * np.abs(raw).max())
    np.testing.assert_allclose(raw, t @ g.T, rtol=1e-4, atol=1e-4 * np.abs(raw).max())
    exact = {"attribution": {"path": "exact"}}
    exact_paper = attributor_of(store, "grad_dot", exact).score_matrix(test)
    exact_raw = attributor_of(store, "grad_dot", {"attribution": {"path": "exact", "scale": "raw"}}).score_matrix(test)
    np.testing.assert_allclose(exact_raw, exact_paper * store.n_rows, rtol=1e-5)
    attributor = attributor_of(store, "if_gn")
    full = attributor.score_matrix(test).astype(np.float64)  # [m, N]
    for how, reduce in (("mean", np.mean), ("sum", np.sum), ("max", np.max)):
        table = attributor.aggregate_top_k(test, 7, how)
        expected = reduce(full, axis=0)
        ranked = np.argsort(-expected, kind="stable")[:7]
        np.testing.assert_array_equal(table.column("train_row").to_numpy(), ranked)
        np.testing.assert_allclose(table.column("score").to_numpy(), expected[ranked], rtol=1e-5)
        assert table.column("rank").to_pylist() == list(range(1, 8)) and "test_id" not in table.column_names
    assert cli_main(["query", str(store.root), "--split", "test", "--aggregate", "max", "--top-k", "3", "--quiet"]) == 0
    assert "highest max score over the test inputs" in capsys.readouterr().out


def attributor_of(store, method, overrides=None):
    return tdastore.Attributor(store, method, overrides)


def test_normalize_unit_normalises_either_side_of_any_method(built, tmp_path):
    """attribution.normalize train / test / both: the method's scores with the stored rows and / or the query's
    gradient unit-normalised first, as numpy computes them; train-normalised rows get an index of their own."""
    config, store, task, test, t, g, tmp = built
    expected = expected_scores("if_gn", t, g, config)  # [m, N]
    g_norm, t_norm = np.linalg.norm(g, axis=1), np.linalg.norm(t, axis=1)
    divisors = {"train": g_norm[None, :], "test": t_norm[:, None], "both": t_norm[:, None] * g_norm[None, :]}
    for side, divisor in divisors.items():
        attributor = attributor_of(store, "if_gn", {"attribution": {"normalize": side}})
        got = attributor.score_matrix(test)
        assert rel_err(got, expected / divisor) <= 1e-4, side
        assert attributor.top_k(test, 3).schema.metadata[b"tdastore.normalize"] == side.encode()
    table = tdastore.query(store, "if_gn", inputs=test, top_k=5, kind="flat",
                           overrides={"attribution": {"normalize": "train"}})  # fmt: skip
    ranked = np.argsort(-(expected / divisors["train"]), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(table.column("train_row").to_numpy().reshape(len(test), 5), ranked)
    assert (store.root / "indexes" / "if_gn-unit-flat" / "index.json").is_file()
    plain = attributor_of(store, "grad_cos", {"attribution": {"normalize": "test"}}).score_matrix(test)
    np.testing.assert_array_equal(plain, attributor_of(store, "grad_cos").score_matrix(test))  # already both
    exact = {"path": "exact"}
    exact_dot = attributor_of(store, "grad_dot", {"attribution": exact}).score_matrix(test)
    exact_cos = attributor_of(store, "grad_cos", {"attribution": exact}).score_matrix(test)
    exact_both = attributor_of(store, "grad_dot", {"attribution": {**exact, "normalize": "both"}}).score_matrix(test)
    np.testing.assert_allclose(exact_both, exact_cos, rtol=1e-5, atol=1e-7 * np.abs(exact_cos).max())
    assert not np.allclose(exact_dot, exact_cos)
    with pytest.raises(ConfigError, match="normalize"):
        attributor_of(store, "grad_dot", {"attribution": {"normalize": "rows"}})
    out = tmp_path / "hits.parquet"
    argv = ["query", str(store.root), "--split", "test", "--normalize", "train", "--scale", "raw", "--top-k", "2"]
    assert cli_main([*argv, "--out", str(out), "--quiet"]) == 0
    assert pq.read_schema(out).metadata[b"tdastore.normalize"] == b"train"
