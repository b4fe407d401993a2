"""A hostile new user's mistakes, across every command: each is exit status 2 with a message that names the
problem (no traceback), nothing is left behind, and the store's bytes are unchanged."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from conftest import small_config
from test_build import tree_digest

import tdastore
from tdastore.cli import main
from tdastore.config import config_to_dict
from tdastore.distributed.build import build_store


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    """A trained model, its config file, a built store, and files of every kind of wrong."""
    tmp = tmp_path_factory.mktemp("bad")
    config = small_config(tmp)
    tdastore.train(config, progress=False)
    store = build_store(config, tmp / "store", progress=False)
    raw = config_to_dict(config)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    for name, text in {
        "syntax.yaml": "train: {lr: 0.1\n",
        "list.yaml": "- 1\n- 2\n",
        "empty.csv": "",
        "noheader.csv": "1,2\n3,4\n",
    }.items():
        (tmp / name).write_text(text)
    rows = 30
    base = {f"x{i}": np.arange(rows, dtype=float) * (i + 1) % 7 for i in range(3)}
    tables = {
        "ok.csv": {**base, "y": np.arange(rows) % 2, "id": np.arange(rows)},
        "blank_label.csv": {**base, "y": ["a", "b", ""] * 10},
        "float_ids.csv": {**base, "y": np.arange(rows) % 2, "id": np.arange(rows) + 0.5},
        "same_ids.csv": {**base, "y": np.arange(rows) % 2, "id": np.full(rows, 7)},
        "text_ids.csv": {**base, "y": np.arange(rows) % 2, "id": ["a"] * rows},
        "nan.csv": {**base, "x0": [np.nan] + [1.0] * (rows - 1), "y": np.arange(rows) % 2},
    }
    for name, columns in tables.items():
        pacsv.write_csv(pa.table(columns), tmp / name)
    features = list(tdastore.Attributor(store, "grad_dot").task.columns)
    text_first = {c: ["abc"] * 3 if i == 0 else [0.0] * 3 for i, c in enumerate(features)}
    pacsv.write_csv(pa.table(text_first | {"target": [1.0] * 3}), tmp / "text_feature.csv")
    pacsv.write_csv(pa.table({c: [0.0] * 3 for c in features[:-1]} | {"target": [1.0] * 3}), tmp / "narrow.csv")
    (tmp / "empty_inputs.csv").write_text("")
    (tmp / "a_file").write_text("not a store")
    (tmp / "damaged").mkdir()
    manifest = {k: v for k, v in store.manifest.items() if k != "n_rows"}
    (tmp / "damaged" / "manifest.json").write_text(json.dumps(manifest))
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("someone's")
    bad_weights = tmp / "bad_weights"
    bad_weights.mkdir()
    weights = (tmp / "model" / "model.safetensors").read_bytes()
    (bad_weights / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    gt_store = tmp / "store"
    return {"tmp": tmp, "cfg": tmp / "cfg.yaml", "store": gt_store, "features": features}


def data_flags(world, name: str, kind: str = "classification", extra: tuple = ()) -> list[str]:
    tmp = world["tmp"]
    return [
        "train", "--config", str(world["cfg"]), "--task.dataset", str(tmp / name), "--task.kind", kind,
        "--task.target", "y", "--train.output_dir", str(tmp / f"m-{name}"), "--quiet", *extra,
    ]  # fmt: skip


def cases(w) -> list[tuple[list[str], str]]:
    t, cfg, store = w["tmp"], str(w["cfg"]), str(w["store"])
    c = ["--config", cfg]
    g = [*c, "--groundtruth.output", str(t / "gt-never")]
    return [
        # config files and flags
        (["train", "--config", str(t / "syntax.yaml")], "not valid YAML at line"),
        (["train", "--config", str(t / "list.yaml")], "must hold a mapping"),
        (["train", "--config", str(t / "missing.yaml")], "does not exist"),
        (["train", *c, "--train.epochs", "two"], "must be an integer"),
        (["train", *c, "--train.lr", "-1"], "train.lr' must be positive"),
        (["train", *c, "--train.epochs", "-3"], "train.epochs' must be >= 0"),
        (["train", *c, "--train.batch_size", "0"], "train.batch_size' must be positive"),
        (["train", *c, "--model.hidden", "[0]"], "model.hidden' sizes must be positive"),
        (["train", *c, "--model.hidden", "32"], "must be a list"),
        (["train", *c, "--task.test_fraction", "1.5"], "task.test_fraction"),
        (["train", *c, "--task.kind", "ranking"], "must be one of"),
        (["build", *c, "--task.dataset", "nosuchset", "--output", str(t / "never")], "unknown data set 'nosuchset'"),
        (["build", *c, "--task.class", "nomodule_zz:Task", "--output", str(t / "never")], "cannot be imported"),
        (  # noqa: E501
            ["build", *c, "--task.class", "tdastore.config:Config", "--output", str(t / "never")],
            "not a tdastore.tasks.Task subclass",
        ),
        (["train", *c, "--train.epoch", "3"], "did you mean '--train.epochs'"),
        (["train", *c], "trained weights exist"),
        (
            ["build", *c, "--projection.kind", "sparse", "--projection.dim", "100", "--projection.nonzeros", "3"],
            "divide",
        ),
        (["build", *c, "--store.shard_rows", "100"], "multiple of store.chunk_rows"),
        (["build", *c, "--workers", "-1", "--output", str(t / "never")], "build.workers' must be positive"),
        (["build", *c, "--projection.factors", "[16]"], "two positive sizes"),
        (["build", *c, "--groundtruth.steps", "10"], "not both"),
        (["build", *c, "--groundtruth.eval_every", "999"], "eval_every"),
        (["build", *c, "--attribution.damping_factor", "-1"], "damping_factor' must be >= 0"),
        (["build", *c, "--index.shard_rows", "0"], "index.shard_rows' must be positive"),
        (["build", *c, "--metagrad.seeds", "0"], "metagrad.seeds' must be positive"),
        (["build", *c, "--nosuch.flag", "1"], "unrecognized argument"),
        # data files
        (data_flags(w, "missing.csv"), "does not exist"),
        (data_flags(w, ""), "is a directory"),
        (data_flags(w, "empty.csv"), "is empty (0 bytes)"),
        (data_flags(w, "ok.csv", extra=("--task.target", "nocolumn")), "task.target must name a column"),
        (data_flags(w, "ok.csv", extra=("--task.features", "[x0, zz]")), "does not have"),
        (data_flags(w, "ok.csv", "classification", ("--task.kind", "null")), "task.kind is required"),
        (data_flags(w, "blank_label.csv"), "has empty values"),
        (data_flags(w, "float_ids.csv", extra=("--task.id_column", "id")), "non-integer"),
        (data_flags(w, "same_ids.csv", extra=("--task.id_column", "id")), "ids must be unique"),
        (data_flags(w, "text_ids.csv", extra=("--task.id_column", "id")), "must hold integers"),
        (data_flags(w, "ok.csv", extra=("--task.id_column", "nope")), "is not a column"),
        (data_flags(w, "nan.csv"), "NaN/Inf"),
        # builds and stores
        (["build", *c, "--output", str(t / "a_file")], "is a file"),
        (["build", *c, "--output", str(t / "foreign")], "is not empty and is not a tdastore store"),
        (["build", *c, "--output", store, "--projection.kind", "gaussian", "--projection.dim", "8"], "different setup"),  # noqa: E501
        (["build", *c, "--output", store, "--split", "test"], "split: store has"),
        (["build", *c, "--output", str(t / "nomodel"), "--train.output_dir", str(t / "nowhere")], "no trained weights"),  # noqa: E501
        (["build", *c, "--output", str(t / "badw"), "--train.output_dir", str(t / "bad_weights")], "cannot be read"),
        (["info", str(t / "nostore")], "does not exist"),
        (["info", str(t / "a_file")], "is a file"),
        (["info", str(t / "foreign")], "is not a tdastore store"),
        (["verify", str(t / "nostore")], "does not exist"),
        (["info", str(t / "damaged")], "lacks ['n_rows']"),
        (["query", str(t / "damaged"), "--split", "test"], "it is damaged"),
        # queries
        (["query", store], "say what to attribute"),
        (["query", store, "--split", "test", "--method", "influence"], "unknown method 'influence'"),
        (["query", store, "--split", "test", "--top-k", "0"], "top-k 0 must lie in"),
        (["query", store, "--split", "test", "--top-k", "100000"], "must lie in"),
        (["query", store, "--inputs", str(t / "nothere.csv")], "does not exist"),
        (["query", store, "--inputs", str(t / "empty_inputs.csv")], "is empty (0 bytes)"),
        (["query", store, "--inputs", str(t / "narrow.csv")], "feature columns"),
        (["query", store, "--inputs", str(t / "text_feature.csv")], "not numeric"),
        (["query", store, "--inputs", str(t / "ok.txt")], "neither .csv nor .parquet"),
        (["query", store, "--split", "test", "--out", str(t / "nodir" / "x.parquet")], "directory does not exist"),
        (["query", store, "--split", "test", "--scores-out", str(t / "a_file")], "exists"),
        (["query", store, "--split", "test", "--method", "if_h"], "has no projected path"),
        (["query", store, "--split", "test", "--method", "ekfac"], "projection.kind: factored"),
        (["query", store, "--split", "test", "--method", "metagrad"], "differentiates the ground truth"),
        (["query", store, "--split", "test", "--path", "exact", "--kind", "flat"], "FAISS indexes belong"),
        (
            ["query", store, "--split", "test", "--method", "if_gn", "--attribution.max_dense_dim", "16"],
            "max_dense_dim",
        ),  # noqa: E501
        (["query", store, "--split", "test", "--damping-factor", "-2"], "damping_factor' must be >= 0"),
        (["index", store, "--method", "grad_dot", "--path", "exact"], "drop --path exact"),
        (["index", store, "--method", "nope"], "unknown method 'nope'"),
        (["index", store, "--method", "grad_dot", "--index-shard-rows", "0"], "index.shard_rows' must be positive"),
        # ground truth and evaluation
        (["ground-truth", *g, "--groundtruth.left_out_count", "100000"], "left_out_count must lie in"),
        (
            ["ground-truth", *g, "--groundtruth.left_out_count", "null", "--groundtruth.left_out_indices", "[1, 1]"],
            "duplicates",
        ),  # noqa: E501
        (
            ["ground-truth", *g, "--groundtruth.left_out_count", "null", "--groundtruth.left_out_indices", "[-4, 2]"],
            "out of range",
        ),  # noqa: E501
        (
            ["ground-truth", *g, "--groundtruth.left_out_count", "null", "--groundtruth.left_out_every", "0"],
            "must be positive",
        ),  # noqa: E501
        (["ground-truth", *c, "--groundtruth.output", str(t / "foreign")], "not a ground-truth store"),
        (
            ["evaluate", "--store", store, "--ground-truth", str(t / "nogt"), "--out", str(t / "ev")],
            "not a ground-truth store",
        ),  # noqa: E501
        (["evaluate", "--store", store, "--ground-truth", store, "--out", str(t / "ev")], "not a ground-truth store"),
        (["evaluate", "--store", store, "--ground-truth", store], "say where the report goes"),
        (["metagrad", *c, "--ground-truth", store], "not a ground-truth store"),
        (["serve", str(t / "nostore")], "does not exist"),
        (["serve", store, "--replicas", "0"], "at least one replica"),
    ]


def test_every_mistake_is_a_clear_error(world, capsys):
    (world["tmp"] / "ok.txt").write_text("not a table")
    (world["tmp"] / "missing.csv").unlink(missing_ok=True)
    before = tree_digest(world["store"])
    found = cases(world)
    assert len(found) >= 60
    failures = []
    for argv, words in found:
        try:
            status = main(argv)
        except SystemExit as done:  # argparse's own usage errors
            status = done.code
        err = capsys.readouterr().err
        if status != 2 or words not in err or "Traceback" in err:
            failures.append(f"{argv[:2]} ... -> {status}: {err.strip()[-300:]!r} (wanted {words!r})")
    assert not failures, "\n".join(failures)
    assert tree_digest(world["store"]) == before
    tmp = world["tmp"]
    for left_behind in ("never", "nomodel", "badw", "ev", "gt-never"):
        assert not (tmp / left_behind).exists(), left_behind
    assert json.loads((world["store"] / "manifest.json").read_text())["status"] == "complete"
