"""A hostile new user's mistakes, across every command: each is exit status 2 with a message that names the
problem (no traceback), nothing is left behind, and the store's bytes are unchanged."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
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
        "null_train.yaml": "train: null\n",
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
    header = ",".join([*features, features[0], "target"])
    (tmp / "same_columns.csv").write_text(header + "\n" + ",".join(["0.5"] * (len(features) + 2)) + "\n")
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
    from tdastore.groundtruth.pool import run_groundtruth

    tiny_gt = {"output": str(tmp / "gt"), "epochs": 1, "seeds": 2, "seed_block": 2, "left_out_count": 2,
               "left_out_block": 2, "test_points": 2, "workers": 1}  # fmt: skip
    run_groundtruth(small_config(tmp, groundtruth=tiny_gt), progress=False)
    return {"tmp": tmp, "cfg": tmp / "cfg.yaml", "store": tmp / "store", "features": features, "gt": tmp / "gt"}


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
        (["train", *c, "--train.epochs", "-3"], "train.epochs' must lie in 1.."),
        (["train", *c, "--train.batch_size", "0"], "train.batch_size' must be positive"),
        (["train", *c, "--model.hidden", "[0]"], "model.hidden' sizes must be positive"),
        (["train", *c, "--model.hidden", "16,x"], "must be an integer"),
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
        # nonsense once accepted, tracebacks and an abort (issue 24, list 7)
        (["train", *c, "--train.epochs", "0"], "would save an untrained model"),
        (["train", "--config", str(t / "null_train.yaml")], "'train' must be a mapping"),
        (["query", store, "--split", "test", "--kind", "ivf", "--index.nlist", "0"], "index.nlist"),
        (["query", store, "--split", "test", "--kind", "pq", "--index.pq_m", "7"], "index.pq_m 7"),
        (
            [
                "build",
                *c,
                "--projection.kind",
                "gaussian",
                "--projection.dim",
                "1000000000000",
                "--output",
                str(t / "never"),
            ],
            "projection.dim",
        ),  # noqa: E501
        (["ground-truth", *g, "--groundtruth.test_points", "0"], "groundtruth.test_points"),
        (["metagrad", *c, "--ground-truth", str(w["gt"]), "--metagrad.seeds", "99"], "metagrad.seeds 99 exceeds the 2"),
        (["build", *c, "--build.cpus_per_worker", "0", "--output", str(t / "never")], "build.cpus_per_worker"),
        (["train", *c, "--train.epochs", "99999999999999999999999"], "train.epochs"),
        (["train", *c, "--train.momentum", "-3"], "train.momentum"),
        (["query", store, "--inputs", str(t / "same_columns.csv")], "more than once"),
        (["serve", store, "--port", "-1"], "port"),
        (["serve", store, "--token-file", str(t / "no_token")], "--token-file"),
        (["serve", store, "--token-file", str(t / "empty.csv")], "at least 16 characters"),
        (["serve", store, "--startup-timeout", "0"], "--startup-timeout must be positive"),
        (["serve", store, "--startup-timeout", "soon"], "invalid float value"),
        (["serve", store, "--port", "70000"], "port"),
        (["index", store, "--method", "grad_dot", "--kind", "hnsw", "--index.hnsw_m", "0"], "index.hnsw_m"),
        (["build", *c, "--address", "127.0.0.1:1", "--output", str(t / "never")], "no Ray cluster answers"),
        *([(["train", *c, "--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else []),
        # every config section's fields, one wrong value each
        *[(["train", *c, f"--{key}", value], words) for key, value, words in BAD_FIELDS],
    ]


BAD_FIELDS = [  # (key, a wrong value, words of the message)
    ("device", "tpu", "must be auto, cpu"),
    ("device", "cuda:x", "not one of auto, cpu"),
    ("task.test_fraction", "0", "task.test_fraction"),
    ("task.split_seed", "x", "must be an integer"),
    ("task.max_length", "0", "task.max_length"),
    ("task.standardize_target", "maybe", "true or false"),
    ("task.features", "[x0, [1]]", "must be a string"),
    ("model.hidden", "[-1]", "model.hidden"),
    ("model.hidden", "[a]", "must be an integer"),
    ("model.dtype", "int8", "must be one of"),
    ("model.attention", "flash", "must be one of"),
    ("train.weight_decay", "-1", "train.weight_decay"),
    ("train.lr", ".inf", "finite"),
    ("train.lr", ".nan", "finite"),
    ("train.batch_size", "-5", "train.batch_size"),
    ("train.momentum", "1", "train.momentum"),
    ("train.epochs", "2000000", "train.epochs"),
    ("gradients.batch_size", "0", "gradients.batch_size"),
    ("gradients.max_tokens", "0", "gradients.max_tokens"),
    ("gradients.params", "[]", "gradients.params"),
    ("gradients.modules", "[5]", "gradients.modules"),
    ("gradients.full_norms", "7", "true or false"),
    ("projection.dim", "0", "projection.dim"),
    ("projection.dim", "-5", "projection.dim"),
    ("projection.nonzeros", "0", "projection.nonzeros"),
    ("projection.block_rows", "0", "projection.block_rows"),
    ("projection.cache_mb", "-1", "projection.cache_mb"),
    ("projection.factors", "[0, 4]", "projection.factors"),
    ("projection.factors", "[1, 2, 3]", "projection.factors"),
    ("projection.module_factors", "{fc1: [0, 2]}", "projection.module_factors"),
    ("projection.kind", "fourier", "must be one of"),
    ("store.dtype", "int8", "must be one of"),
    ("store.chunk_rows", "0", "store.chunk_rows"),
    ("store.compressor", "gzip", "must be one of"),
    ("build.workers", "0", "build.workers"),
    ("build.gpus_per_worker", "0", "build.gpus_per_worker"),
    ("build.max_retries", "-1", "build.max_retries"),
    ("build.cpus_per_worker", "-1", "build.cpus_per_worker"),
    ("attribution.path", "other", "must be one of"),
    ("attribution.lissa_depth", "0", "attribution.lissa_depth"),
    ("attribution.replay_steps", "0", "attribution.replay_steps"),
    ("attribution.replay_seeds", "-2", "attribution.replay_seeds"),
    ("attribution.lissa_scale", "0", "attribution.lissa_scale"),
    ("attribution.lissa_batch_size", "0", "attribution.lissa_batch_size"),
    ("attribution.cg_tol", "0", "cg_tol"),
    ("attribution.cg_max_iter", "0", "attribution.cg_max_iter"),
    ("attribution.batch_size", "0", "attribution.batch_size"),
    ("attribution.max_dense_dim", "0", "attribution.max_dense_dim"),
    ("attribution.max_exact_params", "0", "attribution.max_exact_params"),
    ("attribution.kfac_examples", "0", "attribution.kfac_examples"),
    ("attribution.damping_factor", "lots", "attribution.damping_factor"),
    ("attribution.methods", "[]", "attribution.methods"),
    ("index.kind", "annoy", "must be one of"),
    ("index.nprobe", "0", "index.nprobe"),
    ("index.ef_search", "0", "ef_search"),
    ("index.refine", "0", "index.refine"),
    ("index.pq_m", "0", "index.pq_m"),
    ("index.nlist", "-4", "index.nlist"),
    ("index.hnsw_m", "1", "index.hnsw_m"),
    ("groundtruth.coupling", "swap", "must be one of"),
    ("groundtruth.optimizer", "rmsprop", "must be one of"),
    ("groundtruth.lr", "0", "groundtruth.lr"),
    ("groundtruth.batch_size", "0", "batch_size"),
    ("groundtruth.weight_decay", "-1", "groundtruth.weight_decay"),
    ("groundtruth.clip_norm", "0", "groundtruth.clip_norm"),
    ("groundtruth.epochs", "0", "groundtruth.epochs"),
    ("groundtruth.seeds", "0", "groundtruth.seeds"),
    ("groundtruth.seed_block", "0", "groundtruth.seed_block"),
    ("groundtruth.left_out_block", "0", "left_out_block"),
    ("groundtruth.max_replicas", "0", "max_replicas"),
    ("groundtruth.workers", "0", "workers"),
    ("groundtruth.threads_per_worker", "0", "groundtruth.threads_per_worker"),
    ("groundtruth.execution", "fast", "must be one of"),
    ("groundtruth.left_out_count", "0", "groundtruth.left_out_count"),
    ("groundtruth.compile", "sometimes", "true or false"),
    ("query.top_k", "0", "query.top_k"),
    ("query.workers", "-1", "query.workers"),
    ("query.threads_per_worker", "0", "query.threads_per_worker"),
    ("query.ray_min_inputs", "-1", "query.ray_min_inputs"),
    ("query.split", "validation", "must be one of"),
    ("metagrad.mode", "sideways", "must be one of"),
    ("metagrad.seed_block", "0", "metagrad.seed_block"),
    ("metagrad.test_block", "0", "metagrad.test_block"),
    ("metagrad.checkpoint_every", "0", "metagrad.checkpoint_every"),
    ("metagrad.memory_mb", "0", "metagrad.memory_mb"),
    ("metagrad.workers", "0", "metagrad.workers"),
    ("metagrad.rows", "some", "must be one of"),
    ("lds.subsets", "1", "lds.subsets"),
    ("lds.fraction", "1", "lds.fraction"),
    ("lds.seeds", "0", "lds.seeds"),
    ("lds.subset_block", "0", "subset_block"),
    ("lds.workers", "0", "workers"),
]


def files_under(root) -> dict:
    """Every file under root with its size and modification time: what a case must leave as it found it."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_mistake_is_a_clear_error(world, capsys, monkeypatch):
    (world["tmp"] / "ok.txt").write_text("not a table")
    (world["tmp"] / "missing.csv").unlink(missing_ok=True)
    monkeypatch.chdir(world["tmp"])  # a default output (runs/...) would land here and be seen
    before = tree_digest(world["store"])
    found = cases(world)
    assert len(found) >= 150
    failures = []
    for argv, words in found:
        files = files_under(world["tmp"])
        try:
            status = main(argv)
        except SystemExit as done:  # argparse's own usage errors
            status = done.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        if status != 2 or words not in err or "Traceback" in err or len(lines) != 1:
            failures.append(f"{argv[:2]} {argv[-2:]} -> {status}: {err.strip()[-300:]!r} (wanted {words!r})")
        elif files_under(world["tmp"]) != files:
            changed = set(files_under(world["tmp"]).items()) ^ set(files.items())
            failures.append(f"{argv[:2]} {argv[-2:]} wrote {sorted(changed)[:3]}")
    assert not failures, f"{len(failures)} of {len(found)}:\n" + "\n".join(failures)
    assert tree_digest(world["store"]) == before
    tmp = world["tmp"]
    for left_behind in ("never", "nomodel", "badw", "ev", "gt-never"):
        assert not (tmp / left_behind).exists(), left_behind
    assert json.loads((world["store"] / "manifest.json").read_text())["status"] == "complete"
