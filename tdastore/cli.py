"""The `tdastore` command line: one subcommand per job, each driven by the same typed config."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tdastore.errors import ConfigError, TdaStoreError


def _cmd_train(args: argparse.Namespace) -> None:
    import tdastore
    from tdastore.tasks.tabular import make_task
    from tdastore.training import evaluate_loss

    config = tdastore.load_config(args.config)
    began = time.perf_counter()
    model = tdastore.train(config, progress=not args.quiet)
    task = make_task(config.task, config.model)
    print(
        f"trained {task.name} ({task.kind}) in {time.perf_counter() - began:.1f} s: "
        f"train loss {evaluate_loss(model, task, 'train'):.4f}, test loss {evaluate_loss(model, task, 'test'):.4f}\n"
        f"weights: {config.train.output_dir}/model.safetensors"
    )


def _cmd_build(args: argparse.Namespace) -> None:
    import tdastore

    config = tdastore.load_config(args.config)
    output = args.output or config.store.path
    if output is None:
        raise ConfigError("say where the store goes: --output STORE, or store.path in the config")
    store = tdastore.build(
        config, output, split=args.split, address=args.address, workers=args.workers, progress=not args.quiet
    )
    print(store.summary())


def _cmd_info(args: argparse.Namespace) -> None:
    import tdastore

    print(tdastore.open_store(args.store, allow_incomplete=True).summary())


def _overrides(args: argparse.Namespace) -> dict:
    """Query-time settings from the command line (the store's own config supplies the rest)."""
    attribution = {
        k: v
        for k, v in {
            "path": getattr(args, "path", None),
            "damping_factor": getattr(args, "damping_factor", None),
            "lissa_depth": getattr(args, "lissa_depth", None),
        }.items()
        if v is not None
    }
    index = {"shard_rows": args.index_shard_rows} if getattr(args, "index_shard_rows", None) else {}
    return {"attribution": attribution, "index": index}


def _cmd_index(args: argparse.Namespace) -> None:
    import tdastore
    from tdastore.index.faiss_index import build_index
    from tdastore.precond.projected import fit_or_load, operator_key
    from tdastore.query import QueryContext

    store = tdastore.open_store(args.store)
    ctx = QueryContext(store, args.method, _overrides(args))
    if ctx.path != "projected":
        raise ConfigError("indexes hold projected-space rows: drop --path exact")
    op = ctx.method.operator("projected")
    operator = fit_or_load(store, op, ctx.config.attribution, ctx)
    handle = build_index(
        store,
        ctx.method,
        operator,
        operator_key(op, ctx.config.attribution),
        args.kind,
        ctx.config.index,
        progress=not args.quiet,
    )
    print(
        f"index {handle.directory} ({len(handle.shards)} shard(s), {store.n_rows:,} rows, "
        f"operator {handle.description['operator']})"
    )


def _cmd_query(args: argparse.Namespace) -> None:
    import tdastore

    store = tdastore.open_store(args.store)
    if args.inputs is None and args.split is None:
        raise ConfigError("say what to attribute: --inputs FILE (.csv/.parquet) or --split test")
    table = store.query(
        args.method,
        split=args.split,
        inputs=args.inputs,
        top_k=args.top_k,
        kind=args.kind,
        out=args.out,
        scores_out=args.scores_out,
        overrides=_overrides(args),
        progress=not args.quiet,
    )
    meta = {k.decode().split(".", 1)[1]: v.decode() for k, v in (table.schema.metadata or {}).items()}
    print(
        f"{table.num_rows:,} rows ({args.top_k} per test input), method {meta.get('method')}, path {meta.get('path')}"
        + (f", written to {args.out}" if args.out else "")
    )
    shown = table.slice(0, min(10, table.num_rows)).to_pydict()
    print("  ".join(f"{c:>10}" for c in shown))
    for row in zip(*shown.values()):
        print("  ".join(f"{v:>10.4g}" if isinstance(v, float) else f"{v:>10}" for v in row))


def _cmd_methods(args: argparse.Namespace) -> None:
    from tdastore.methods import METHODS

    print(f"{'method':<14}{'projected':<16}{'exact':<22}summary")
    for m in METHODS.values():
        print(f"{m.name:<14}{m.projected or '-':<16}{m.exact or '-':<22}{m.summary}")


def _cmd_ground_truth(args: argparse.Namespace) -> None:
    import tdastore
    from tdastore.groundtruth.pool import run_groundtruth

    config = tdastore.load_config(args.config)
    root = run_groundtruth(config, address=args.address, progress=not args.quiet)
    print(f"ground truth written to {root}")


def _cmd_metagrad(args: argparse.Namespace) -> None:
    import tdastore
    from tdastore.config import config_to_dict
    from tdastore.groundtruth.metagrad_pool import run_metagrad

    config = tdastore.load_config(args.config)
    settings = {k: v for k, v in {"coupling": args.coupling, "mode": args.mode, "rows": args.rows}.items() if v}
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    if settings:
        as_dict = config_to_dict(config)
        config = tdastore.load_config(as_dict | {"metagrad": as_dict["metagrad"] | settings})
    root = run_metagrad(config, args.ground_truth, address=args.address, progress=not args.quiet)
    print(f"metagradient scores written to {root}/scores.zarr")


def _cmd_demo_lm(args: argparse.Namespace) -> None:
    from tdastore.demo_text import make_tiny_lm

    out = make_tiny_lm(
        Path(args.out),
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=args.context,
        train_steps=args.steps,
        progress=not args.quiet,
    )
    print(f"model and tokenizer: {out / 'model'}; corpus: {out / 'corpus.jsonl'}; prompts: {out / 'prompts.jsonl'}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import tdastore
    from tdastore.evaluate.run import evaluate

    store = tdastore.open_store(args.store)
    methods = args.methods.split(",") if args.methods else None
    evaluate(store, args.ground_truth, methods=methods, out=args.out, path=args.path, overrides=_overrides(args))
    print(
        f"report: {args.out}/report.md, results: {args.out}/results.json, plots: {args.out}/cosine.png, seed_curves.png"
    )


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from tdastore.quickstart import run_quickstart

    run_quickstart(
        args.output,
        datasets=args.datasets.split(",") if args.datasets else None,
        address=args.address,
        progress=not args.quiet,
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    from tdastore.serve import serve

    serve(args.store, host=args.host, port=args.port, replicas=args.replicas, kind=args.kind, address=args.address)


def _add_query_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--path",
        choices=["projected", "exact"],
        default=None,
        help="projected: the store's space (indexable); exact: full parameter space on the model",
    )
    parser.add_argument(
        "--damping-factor", type=float, default=None, help="lambda = factor x mean squared gradient entry"
    )
    parser.add_argument("--lissa-depth", type=int, default=None, help="LiSSA: Neumann series depth")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdastore",
        description="Training data attribution at scale: per-example gradient stores built with Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train the final model of a config and save its weights",
        description="Train the final model (SGD) and write model.safetensors + config.yaml to train.output_dir.",
    )
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    build = sub.add_parser(
        "build",
        help="compute per-example gradients into a store with Ray actors",
        description="Build (or resume) a gradient store: Zarr rows, Parquet metadata, manifest.",
    )
    build.add_argument("--config", required=True, help="YAML config (see configs/)")
    build.add_argument("--output", default=None, help="store directory, created or resumed (default: store.path)")
    build.add_argument("--split", choices=["train", "test"], default="train", help="which split's gradients")
    build.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)"
    )
    build.add_argument("--workers", type=int, default=None, help="number of Ray actors (default: build.workers)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_build)

    info = sub.add_parser("info", help="print a summary of a store", description="Summarise a gradient store.")
    info.add_argument("store", help="store directory")
    info.set_defaults(func=_cmd_info)

    index = sub.add_parser(
        "index",
        help="build a FAISS index of a method over a store",
        description="Fit the method's operator (saved in the store) and index K^(1/2)-transformed "
        "rows, so a preconditioned query is an inner-product search. Up-to-date indexes "
        "are reused.",
    )
    index.add_argument("store", help="store directory")
    index.add_argument("--method", required=True, help="a method of `tdastore methods`")
    index.add_argument("--kind", choices=["flat", "ivf", "hnsw", "sq8", "pq"], default="flat", help="FAISS index kind")
    index.add_argument("--index-shard-rows", type=int, default=None, help="rows per index shard")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_query_settings(index)
    index.set_defaults(func=_cmd_index)

    query = sub.add_parser(
        "query",
        help="attribute test inputs to training rows",
        description="Top-k training rows per test input (test_id, rank, train_id, score), "
        "and optionally the full score matrix.",
    )
    query.add_argument("store", help="store directory")
    query.add_argument("--method", default="grad_dot", help="a method of `tdastore methods` (default grad_dot)")
    source = query.add_mutually_exclusive_group()
    source.add_argument(
        "--inputs",
        default=None,
        help=".csv/.parquet with the task's feature and target columns; "
        "text stores: .jsonl/.json/.parquet/.csv/.txt documents (prompts)",
    )
    source.add_argument("--split", choices=["test", "train"], default=None, help="a split of the store's task")
    query.add_argument("--top-k", type=int, default=10, help="training rows per test input")
    query.add_argument(
        "--kind",
        choices=["flat", "ivf", "hnsw", "sq8", "pq"],
        default=None,
        help="search a FAISS index of this kind (built if missing); default: exact streamed scoring",
    )
    query.add_argument("--out", default=None, help="write the top-k table as Parquet")
    query.add_argument("--scores-out", default=None, help="write the full [n_test, N] score matrix as Zarr")
    query.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_query_settings(query)
    query.set_defaults(func=_cmd_query)

    gt = sub.add_parser(
        "ground-truth",
        help="run the further-training gold standard as a Ray job pool",
        description="Further training from the final model for every seed and left-out row "
        "(groundtruth section of the config); resumes from finished units.",
    )
    gt.add_argument("--config", required=True, help="YAML config with a groundtruth section")
    gt.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    gt.add_argument("--quiet", action="store_true", help="no progress bar")
    gt.set_defaults(func=_cmd_ground_truth)

    mg = sub.add_parser(
        "metagrad",
        help="differentiate the gold standard's further training (metagradients)",
        description="Scores a_i ~ -dg/dw_i for the ground truth's rows, at every evaluation point, "
        "by reverse- or forward-mode differentiation through the further-training steps; "
        "units of seed blocks x test blocks on Ray, written beside the ground truth.",
    )
    mg.add_argument("--config", required=True, help="the YAML config the ground truth was run with")
    mg.add_argument("--ground-truth", default=None, help="ground-truth store (default: groundtruth.output)")
    mg.add_argument("--coupling", choices=["delete", "subtract"], default=None, help="default: the ground truth's")
    mg.add_argument(
        "--mode",
        choices=["auto", "forward", "reverse"],
        default=None,
        help="reverse: one pass per (eval point, test point); forward: one per row; auto: fewer",
    )
    mg.add_argument("--rows", choices=["left_out", "all"], default=None, help="rows to score (default left_out)")
    mg.add_argument("--seeds", type=int, default=None, help="the first n of the ground truth's seeds")
    mg.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    mg.set_defaults(func=_cmd_metagrad)

    ev = sub.add_parser(
        "evaluate",
        help="compare every method with the gold standard",
        description="Cosine and Spearman of each method against the gold vector at every evaluation "
        "point, seed curves; writes report.md, results.json and PNG plots.",
    )
    ev.add_argument("--store", required=True, help="gradient store of the same model")
    ev.add_argument("--ground-truth", required=True, help="ground-truth store from `tdastore ground-truth`")
    ev.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    ev.add_argument("--out", required=True, help="output directory")
    _add_query_settings(ev)
    ev.set_defaults(func=_cmd_evaluate)

    quick = sub.add_parser(
        "quickstart",
        help="the whole method end to end on embedded data sets",
        description="Train, build a store with Ray, run the gold standard and every method, "
        "evaluate, and write reports (diabetes and breast_cancer, a few minutes).",
    )
    quick.add_argument("--output", default="runs/quickstart", help="output directory")
    quick.add_argument("--datasets", default=None, help="comma-separated subset of diabetes,breast_cancer")
    quick.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    quick.add_argument("--quiet", action="store_true", help="no progress bars")
    quick.set_defaults(func=_cmd_quickstart)

    srv = sub.add_parser(
        "serve",
        help="an HTTP JSON API for influence queries over a store",
        description="POST /query with raw test inputs; Ray actors hold the model, operators and "
        "FAISS indexes. Binds loopback unless --host says otherwise.",
    )
    srv.add_argument("store", help="store directory")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1, help="Ray actors answering queries")
    srv.add_argument("--kind", choices=["flat", "ivf", "hnsw", "sq8", "pq"], default="flat", help="FAISS index kind")
    srv.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    srv.set_defaults(func=_cmd_serve)

    demo = sub.add_parser(
        "demo-lm",
        help="write an offline demo LM: a GPT-2 and tokenizer trained on Python's docstrings",
        description="Trains a BPE tokenizer (tokenizers) and a small GPT-2 on paragraphs of the standard "
        "library's docstrings and saves them as a transformers directory, with corpus.jsonl "
        "and prompts.jsonl: what configs/tiny_gpt2.yaml points at. No network needed.",
    )
    demo.add_argument("--out", default="runs/tiny-gpt2", help="output directory")
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--width", type=int, default=64)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--vocab", type=int, default=512)
    demo.add_argument("--context", type=int, default=128)
    demo.add_argument("--steps", type=int, default=100, help="AdamW training steps on the corpus")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo_lm)

    methods = sub.add_parser(
        "methods",
        help="list the methods of the unified view",
        description="The method table: each method's operator on the projected and exact paths.",
    )
    methods.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except TdaStoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
