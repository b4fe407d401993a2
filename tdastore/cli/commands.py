"""What each `tdastore` command does, given its parsed arguments (the parser is in tdastore/cli/__init__.py).

Commands that run a config (train, build, ground-truth, metagrad) take `--config CFG` (optional) and any
`--section.field` flag on top. Commands over a built store (index, query, evaluate, serve) use the store's own
config, with the attribution and index sections of `--config` and of the flags on top.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from tdastore.attribution import Attributor
from tdastore.cli.flags import config_overrides
from tdastore.config import Config, QueryConfig, load_config
from tdastore.errors import ConfigError, StoreError
from tdastore.store.gradient_store import open_store
from tdastore.store.location import store_path
from tdastore.store.manifest import MANIFEST_FILE, read_manifest

QUERY_SECTIONS = ["attribution", "index"]


def run_config(args: argparse.Namespace) -> Config:
    """The config of a command: the YAML file (if any) with the flags given on top."""
    return load_config(args.config, config_overrides(args))


def query_overrides(args: argparse.Namespace) -> dict:
    """Query-time settings: the attribution/index sections of --config, then the flags."""
    base = {}
    if args.config is not None:
        config = load_config(args.config)
        base = {section: dict(getattr(config, section).__dict__) for section in QUERY_SECTIONS}
    for section, values in config_overrides(args, QUERY_SECTIONS).items():
        base.setdefault(section, {}).update(values)
    return base


def store_argument(args: argparse.Namespace, value: str | None, flag: str = "STORE") -> str:
    """A store path from the command line, else store.path of --config."""
    if value is not None:
        return value
    path = load_config(args.config).store.path if args.config is not None else None
    if path is None:
        raise ConfigError(f"say which store: pass {flag}, or --config with store.path set")
    return path


def cmd_train(args: argparse.Namespace) -> None:
    import time

    from tdastore.tasks import make_task
    from tdastore.training import WEIGHTS_FILE, evaluate_loss, train

    config = run_config(args)
    weights = Path(config.train.output_dir) / WEIGHTS_FILE
    if args.skip_if_trained and weights.is_file():
        print(f"weights exist at {weights}: nothing to train (--skip-if-trained)")
        return
    began = time.perf_counter()
    task = make_task(config.task, config.model)  # loaded once: trained on, then evaluated
    model = train(config, progress=not args.quiet, task=task, overwrite=args.overwrite)
    print(
        f"trained {task.name} ({task.kind}) in {time.perf_counter() - began:.1f} s: "
        f"train loss {evaluate_loss(model, task, 'train'):.4f}, test loss {evaluate_loss(model, task, 'test'):.4f}\n"
        f"weights: {weights}"
    )


def cmd_build(args: argparse.Namespace) -> None:
    from tdastore.distributed.build import build_store

    config = run_config(args)
    output = args.output or config.store.path
    if output is None:
        raise ConfigError("say where the store goes: --output STORE, or store.path in the config")
    if args.keep_operators and not args.append:
        raise ConfigError("--keep-operators goes with --append (it keeps operators fitted before rows are appended)")
    if args.append and args.config is None and (store_path(output) / MANIFEST_FILE).exists():
        config = load_config(read_manifest(store_path(output))["config"], config_overrides(args))  # the store's own
    append = {"append": args.append, "keep_operators": args.keep_operators}
    store = build_store(config, output, split=args.split, progress=not args.quiet, **append)
    print(store.summary())


def cmd_info(args: argparse.Namespace) -> None:

    print(open_store(args.store, allow_incomplete=True).summary())


def cmd_verify(args: argparse.Namespace) -> None:
    from tdastore.store.location import store_path
    from tdastore.store.verify import mark_for_rebuild, verify_store

    root = store_path(args.store)
    kind = job_kind(root)
    if kind is not None:
        return verify_job(root, kind, args.deep)
    problems = verify_store(root, deep=args.deep)
    if not problems:
        print(f"store '{root}': every done shard checks out ({'deep: checksums' if args.deep else 'sizes'})")
        return
    mark_for_rebuild(root, problems)
    found = "\n".join(f"  {p.describe()}" for p in problems)
    raise StoreError(
        f"store '{root}' has {len(problems)} problem(s):\n{found}\ndamaged shards lost their markers and the store "
        "is marked incomplete: rerun the same `tdastore build` to recompute exactly these shards and rewrite the "
        "store's own files"
    )


def job_kind(root) -> str | None:
    """The kind of a job store (groundtruth, lds, metagrad), None for a gradient store (or not a store)."""
    import json

    from tdastore.store.manifest import MANIFEST_FILE

    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("kind") if isinstance(manifest, dict) else None


def verify_job(root, kind: str, deep: bool) -> None:
    from tdastore.store.job_store import mark_units_for_rerun, unit_problems

    problems = unit_problems(root, deep=deep)
    if not problems:
        print(f"{kind} store '{root}': every done unit checks out ({'deep: checksums' if deep else 'sizes'})")
        return
    mark_units_for_rerun(root, list(problems))
    found = "\n".join(f"  unit {name}: {reason}" for name, reason in problems.items())
    raise StoreError(
        f"{kind} store '{root}' has {len(problems)} damaged unit(s):\n{found}\ntheir markers were removed and the "
        "job is marked running: rerun the same job command to recompute exactly these units"
    )


def cmd_index(args: argparse.Namespace) -> None:
    from tdastore.methods import get_method

    store = open_store(store_argument(args, args.store))
    overrides = query_overrides(args)
    if overrides.get("attribution", {}).get("path") == "exact":
        raise ConfigError("indexes hold projected-space rows: drop --path exact")
    overrides.setdefault("attribution", {})["path"] = "projected"
    kind = overrides.get("index", {}).get("kind", "flat")
    methods = [args.method] if args.method else (overrides["attribution"].get("methods") or ["grad_dot"])
    normalised = "normaliser" in store.manifest["projection"]  # rows scaled by Adam's v: adam_dot / adam_cos
    if args.method is None and normalised:
        methods = [m for m in methods if get_method(m).normalised_store] or ["adam_dot", "adam_cos"]
    for name in methods:
        if args.method is None and get_method(name).projected is None:
            print(f"{name}: no projected path, nothing to index")
            continue
        if args.method is None and get_method(name).normalised_store and not normalised:
            print(f"{name}: needs a store built with gradients.normalizer, nothing to index")
            continue
        attributor = Attributor(store, name, overrides, kind=kind, progress=not args.quiet)
        handle = attributor.index
        print(
            f"index {handle.directory} ({len(handle.shards)} shard(s), {store.n_rows:,} rows, "
            f"operator {handle.description['operator']})"
        )


def cmd_query(args: argparse.Namespace) -> None:

    store = open_store(store_argument(args, args.store))
    q = load_config(args.config).query if args.config is not None else None
    method = args.method or (q.method if q else "grad_dot")
    inputs = args.inputs if args.inputs is not None else (q.inputs if q else None)
    split = args.split or (q.split if q and inputs is None else None)
    top_k = args.top_k if args.top_k is not None else (q.top_k if q else 10)
    kind = args.kind or (q.kind if q else None)
    out = args.out or (q.out if q else None)
    if inputs is None and split is None:
        raise ConfigError("say what to attribute: --inputs FILE (.csv/.parquet) or --split test")
    q = q or QueryConfig()
    attributor = Attributor(
        store,
        method,
        query_overrides(args),
        kind=kind,
        progress=not args.quiet,
        workers=args.workers or q.workers,
        ray_min_inputs=q.ray_min_inputs,
        threads=q.threads_per_worker,
        address=args.address,
    )
    if args.tokens:
        from tdastore.attribution.tokens import require_tokens

        require_tokens(attributor)  # before the search, not after it
    if args.aggregate:
        if args.bottom or args.tokens or args.scores_out:
            raise ConfigError(
                "--aggregate ranks rows by one aggregated score: leave out --bottom, --tokens, --scores-out"
            )
        table = attributor.aggregate_top_k(inputs, top_k, args.aggregate, split=split)
        if out:
            pq.write_table(table, out)
        print(f"{table.num_rows} rows with the highest {args.aggregate} score over the test inputs"
              + (f", written to {out}" if out else ""))  # fmt: skip
        shown = table.drop_columns([c for c in ("train_text",) if c in table.column_names]).to_pydict()
        for row in zip(*shown.values()):
            print("  ".join(f"{v:>10.4g}" if isinstance(v, float) else f"{v:>10}" for v in row))
        return
    answer = attributor.bottom_k if args.bottom else attributor.top_k
    table = answer(inputs, top_k, split=split, out=out, scores_out=args.scores_out)
    meta = {k.decode().split(".", 1)[1]: v.decode() for k, v in (table.schema.metadata or {}).items()}
    print(
        f"{table.num_rows:,} rows ({top_k} per test input, {'most negative' if args.bottom else 'most positive'}), "
        f"method {meta.get('method')}, path {meta.get('path')}" + (f", written to {out}" if out else "")
    )
    shown = table.slice(0, min(10, table.num_rows)).to_pydict()
    print("  ".join(f"{c:>10}" for c in shown))
    for row in zip(*shown.values()):
        print("  ".join(f"{v:>10.4g}" if isinstance(v, float) else f"{v:>10}" for v in row))
    if args.tokens:
        from tdastore.attribution.render import strongest_tokens, write_token_scores

        if args.bottom:
            raise ConfigError("--tokens explains the top-k hits: leave out --bottom")
        rows = table.column("train_row").to_numpy()[: table.num_rows]
        test = attributor.examples(inputs, split)
        tokens = attributor.token_scores_of(test, table)
        write_token_scores(tokens, args.tokens)
        print(strongest_tokens(tokens))
        print(f"token scores of {len(set(rows.tolist()))} documents written to {args.tokens}")


def cmd_methods(args: argparse.Namespace) -> None:
    from tdastore.methods import METHODS

    print(f"{'method':<14}{'projected':<16}{'exact':<22}summary")
    for m in METHODS.values():
        print(f"{m.name:<14}{m.projected or '-':<16}{m.exact or '-':<22}{m.summary}")


def cmd_ground_truth(args: argparse.Namespace) -> None:
    from tdastore.groundtruth.pool import run_groundtruth

    root = run_groundtruth(run_config(args), address=args.address, progress=not args.quiet)
    print(f"ground truth written to {root}")


def cmd_metagrad(args: argparse.Namespace) -> None:
    from tdastore.groundtruth.metagrad_pool import run_metagrad

    root = run_metagrad(run_config(args), args.ground_truth, address=args.address, progress=not args.quiet)
    print(f"metagradient scores written to {root}/scores.zarr")


def cmd_plan(args: argparse.Namespace) -> None:
    from tdastore.plan import plan_build, plan_queries

    config = run_config(args)
    build = plan_build(config)
    queries = plan_queries(config, args.rows or build.rows, build.row_columns, args.index_shards)
    print("\n".join(build.lines() + queries.lines()))


def cmd_lds(args: argparse.Namespace) -> None:
    from tdastore.groundtruth.lds import run_lds

    root = run_lds(run_config(args), args.ground_truth, address=args.address, progress=not args.quiet)
    print(f"LDS further training written to {root}: `tdastore evaluate ... --metric cosine,lds` reports it")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tdastore.evaluate.run import evaluate

    config = load_config(args.config) if args.config is not None else None
    store = open_store(store_argument(args, args.store, "--store"))
    ground_truth = args.ground_truth or (config.groundtruth.output if config else None)
    if ground_truth is None:
        raise ConfigError("say which ground truth: --ground-truth GT, or --config with groundtruth.output")
    out = args.out or (str(Path(config.groundtruth.output) / "evaluation") if config else None)
    if out is None:
        raise ConfigError("say where the report goes: --out DIR (or --config: GT/evaluation)")
    overrides = query_overrides(args)
    methods = args.methods.split(",") if args.methods else overrides.get("attribution", {}).get("methods")
    path = config_overrides(args, ["attribution"]).get("attribution", {}).get("path")
    metrics = tuple(m.strip() for m in args.metric.split(",") if m.strip())
    grid = None
    if args.damping_sweep is not None:
        from tdastore.evaluate.run import DAMPING_GRID

        grid = DAMPING_GRID if args.damping_sweep == "" else tuple(_damping(v) for v in args.damping_sweep.split(","))
    evaluate(
        store,
        ground_truth,
        methods=methods,
        out=out,
        path=path,
        overrides=overrides,
        metrics=metrics,
        damping_grid=grid,
    )
    print(f"report: {out}/report.md, results: {out}/results.json, plots: {out}/cosine.png, seed_curves.png")


def _damping(text: str) -> float | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--damping-sweep: '{text}' is not a number or auto (e.g. 10,1,0.1,auto)") from None


def cmd_quickstart(args: argparse.Namespace) -> None:
    from tdastore.quickstart import run_quickstart

    datasets = args.datasets.split(",") if args.datasets else None
    run_quickstart(args.output, datasets=datasets, address=args.address, progress=not args.quiet, seed=args.seed)


def cmd_serve(args: argparse.Namespace) -> None:
    from tdastore.serve import run_service

    run_service(
        args.store,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        kind=args.kind,
        methods=args.methods.split(",") if args.methods else None,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        index_shards=args.index_shards,
        address=args.address,
        read_only=args.read_only,
        token_file=args.token_file,
        startup_timeout_s=args.startup_timeout,
    )


def cmd_demo_lm(args: argparse.Namespace) -> None:
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
