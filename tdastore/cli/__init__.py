"""The `tdastore` command line: one subcommand per job, its config flags generated from the typed config."""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import sys
import threading
import typing

from tdastore.cli import commands
from tdastore.cli.flags import add_config_flags, suggestion
from tdastore.config import INDEX_KINDS, Config
from tdastore.errors import Interrupted, TdaStoreError, Terminated
from tdastore.version import __version__

ALL_SECTIONS = list(Config.__dataclass_fields__)  # every section of the config, in order
QUERY_ALIASES = {
    "--path": "attribution.path",
    "--measurement": "attribution.measurement",
    "--scale": "attribution.scale",
    "--normalize": "attribution.normalize",
    "--damping-factor": "attribution.damping_factor",
    "--lissa-depth": "attribution.lissa_depth",
    "--index-shard-rows": "index.shard_rows",
}
CONFIG_COMMANDS = ("train", "build", "plan", "index", "query", "ground-truth", "metagrad", "lds", "evaluate")
KINDS = list(INDEX_KINDS)


def _config_option(parser: argparse.ArgumentParser, required: bool = False, what: str = "") -> None:
    parser.add_argument("--config", required=required, default=None, help=f"YAML config (see configs/); optional{what}")


def _quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the command, the problem and where help is (exit 2, as argparse)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port(text: str) -> int:
    """--port: a TCP port, 0..65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (0..65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535)")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tdastore",
        description="Training data attribution at scale: per-example gradient stores built with Ray.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"tdastore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def command(name: str, func, help: str, description: str) -> argparse.ArgumentParser:
        usage = f"tdastore {name} [options]" + (" [--section.field VALUE ...]" if name in CONFIG_COMMANDS else "")
        p = sub.add_parser(name, help=help, description=description, allow_abbrev=False, usage=usage)
        p.set_defaults(func=func)
        return p

    train = command(
        "train",
        commands.cmd_train,
        "train the final model of a config and save its weights",
        "Train the final model (SGD) and write model.safetensors + config.yaml to train.output_dir.",
    )
    _config_option(train)
    train.add_argument("--skip-if-trained", action="store_true", help="do nothing if train.output_dir has weights")
    train.add_argument("--overwrite", action="store_true", help="replace existing weights in train.output_dir")
    _quiet(train)
    add_config_flags(train, ALL_SECTIONS)

    build = command(
        "build",
        commands.cmd_build,
        "compute per-example gradients into a store with Ray actors",
        "Build (or resume) a gradient store: Zarr rows, Parquet metadata, manifest.",
    )
    _config_option(build)
    build.add_argument(
        "--output", default=None, help="store directory or URI, created or resumed (default: store.path)"
    )
    build.add_argument("--split", choices=["train", "test"], default="train", help="which split's gradients")
    build.add_argument(
        "--append",
        action="store_true",
        help="grow the existing store by the rows of --task.dataset (encoded by the store's own task), as new "
        "shards of the same spec; without --config, the store's own config is used. Resumes like a build",
    )
    build.add_argument(
        "--keep-operators",
        action="store_true",
        help="with --append: keep fitted operators (fitted on the old rows only: an approximation) instead of "
        "refitting them on next use",
    )
    _quiet(build)
    add_config_flags(build, ALL_SECTIONS, {"--workers": "build.workers", "--address": "build.address"})

    info = command("info", commands.cmd_info, "print a summary of a store", "Summarise a gradient store.")
    info.add_argument("store", help="store directory")

    verify = command(
        "verify",
        commands.cmd_verify,
        "check a store's chunks against their recorded checksums",
        "Check every done shard of a gradient store (its .done marker, metadata file, chunk files: sizes, "
        "with --deep every byte against its crc32) and the store's zarr.json and meta.parquet; or every "
        "done unit of a ground-truth, metagradient or LDS store. Damaged shards or units lose their "
        "marker and the next run of the same command recomputes exactly them; exit status 2 when any "
        "is found. Every chunk also carries a crc32c that each read checks.",
    )
    verify.add_argument("store", help="gradient store, ground-truth, metagradient or LDS directory (or URI)")
    verify.add_argument("--deep", action="store_true", help="read every chunk and compare its crc32")

    index = command(
        "index",
        commands.cmd_index,
        "build FAISS indexes of methods over a store",
        "Fit each method's operator (saved in the store) and index K^(1/2)-transformed rows, so a "
        "preconditioned query is an inner-product search. Up-to-date indexes are reused.",
    )
    index.add_argument("store", nargs="?", default=None, help="store directory (default: store.path of --config)")
    index.add_argument("--method", default=None, help="a method of `tdastore methods` (default: attribution.methods)")
    _config_option(index, what=": its attribution and index sections apply")
    _quiet(index)
    add_config_flags(index, ["attribution", "index"], {**QUERY_ALIASES, "--kind": "index.kind"})

    query = command(
        "query",
        commands.cmd_query,
        "attribute test inputs to training rows",
        "Top-k (or, with --bottom, the most negative) training rows per test input (test_id, rank, "
        "train_id, score), and optionally the full score matrix.",
    )
    query.add_argument("store", nargs="?", default=None, help="store directory (default: store.path of --config)")
    query.add_argument("--method", default=None, help="a method of `tdastore methods` (default query.method)")
    source = query.add_mutually_exclusive_group()
    source.add_argument(
        "--inputs",
        default=None,
        help=".csv/.parquet with the task's feature and target columns; "
        "text stores: .jsonl/.json/.parquet/.csv/.txt documents (prompts)",
    )
    source.add_argument("--split", choices=["test", "train"], default=None, help="a split of the store's task")
    query.add_argument("--top-k", type=int, default=None, help="training rows per test input (default 10)")
    query.add_argument("--bottom", action="store_true", help="the most negative scores (opponents) instead")
    query.add_argument(
        "--aggregate",
        choices=("mean", "sum", "max"),
        default=None,
        help="one ranking for the whole set of test inputs: each training row's mean / sum / max score over them",
    )
    query.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="search a FAISS index of this kind (built if missing); default: exact streamed scoring",
    )
    query.add_argument("--out", default=None, help="write the table as Parquet")
    query.add_argument(
        "--scores-out",
        default=None,
        help="write the full [n_test, N] score matrix as a Zarr group (scores, test_id, train_id)",
    )
    query.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray actors scoring input blocks x store row ranges when there are at least query.ray_min_inputs "
        "inputs (default query.workers, 0: in process)",
    )
    query.add_argument(
        "--tokens",
        default=None,
        metavar="OUT",
        help="token-level scores of every top-k hit (causal LM stores, factored): each training-document token's and "
        "each query target token's share of the score, written to OUT (.parquet table, .html or .png coloured tokens; "
        "a folder gets all three); the ten strongest tokens per hit are printed",
    )
    _address(query)
    _config_option(query, what=": its query, attribution and index sections apply")
    _quiet(query)
    add_config_flags(query, ["attribution", "index"], QUERY_ALIASES)

    gt = command(
        "ground-truth",
        commands.cmd_ground_truth,
        "run the further-training gold standard as a Ray job pool",
        "Further training from the final model for every seed and left-out row (groundtruth section of the "
        "config); resumes from finished units.",
    )
    _config_option(gt)
    _address(gt)
    _quiet(gt)
    add_config_flags(gt, ALL_SECTIONS)

    mg = command(
        "metagrad",
        commands.cmd_metagrad,
        "differentiate the gold standard's further training",
        "Scores a_i ~ -dg/dw_i for the ground truth's rows, at every evaluation point, by reverse- or "
        "forward-mode differentiation through the further-training steps; units of seed blocks x test "
        "blocks on Ray, written beside the ground truth.",
    )
    _config_option(mg, what=" (the config the ground truth was run with)")
    mg.add_argument("--ground-truth", default=None, help="ground-truth store (default: groundtruth.output)")
    _address(mg)
    _quiet(mg)
    add_config_flags(
        mg,
        ALL_SECTIONS,
        {
            "--coupling": "metagrad.coupling",
            "--mode": "metagrad.mode",
            "--rows": "metagrad.rows",
            "--seeds": "metagrad.seeds",
        },
    )

    plan = command(
        "plan",
        commands.cmd_plan,
        "what a build and its queries will need: memory, sizes, times",
        "Before anything heavy runs: the row and store sizes, each worker's memory (weights, projection matrices, "
        "a shard's buffer, the largest batch, measured) and the build time on build.workers workers from a "
        "short calibration on this machine; then, for every index kind, its size and a service replica's memory "
        "(with --index-shards), and the time of a streamed exact pass (read + decode rate measured here).",
    )
    _config_option(plan)
    plan.add_argument("--rows", type=int, default=None, help="plan queries over this many rows (default: the data's)")
    plan.add_argument(
        "--index-shards", type=int, default=1, help="scatter-gather deployments the service splits an index over"
    )
    add_config_flags(plan, ALL_SECTIONS, {"--workers": "build.workers"})

    lds = command(
        "lds",
        commands.cmd_lds,
        "further training with random subsets left out, for the LDS metric",
        "The linear datamodeling score's runs: lds.subsets random subsets of lds.fraction of the training rows left "
        "out of the ground truth's further training (its optimizer, schedule, coupling and test points), "
        "lds.seeds seeds each; a resumable Ray job pool written beside the ground truth.",
    )
    _config_option(lds, what=" (the config the ground truth was run with)")
    lds.add_argument("--ground-truth", default=None, help="ground-truth store (default: groundtruth.output)")
    _address(lds)
    _quiet(lds)
    add_config_flags(lds, ALL_SECTIONS)

    ev = command(
        "evaluate",
        commands.cmd_evaluate,
        "compare every method with the gold standard",
        "Cosine and Spearman of each method against the gold vector at every evaluation point, seed curves; "
        "writes report.md, results.json and PNG plots.",
    )
    ev.add_argument("--store", default=None, help="gradient store of the same model (default: store.path)")
    ev.add_argument("--ground-truth", default=None, help="ground truth (default: groundtruth.output)")
    ev.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    ev.add_argument("--out", default=None, help="output directory (default with --config: GT/evaluation)")
    ev.add_argument("--metric", default="cosine", help="comma-separated: cosine (always), lds (runs its job if needed)")
    ev.add_argument(
        "--damping-sweep",
        nargs="?",
        const="",
        default=None,
        metavar="FACTORS",
        help="also score each damped method at these damping factors (comma-separated numbers and auto; "
        "without a value 100,10,1,0.1,0.01,0.001,auto) and plot cosine (and LDS) against damping",
    )
    _config_option(ev, what=": its store, ground truth, attribution and index sections apply")
    add_config_flags(ev, ["attribution", "index"], QUERY_ALIASES)

    quick = command(
        "quickstart",
        commands.cmd_quickstart,
        "the whole method end to end on embedded data sets",
        "Train, build a store with Ray, run the gold standard and every method, evaluate, and write "
        "reports (diabetes, breast_cancer and a demo language model; about 17 minutes on 2 cores).",
    )
    quick.add_argument("--output", default="runs/quickstart", help="output directory")
    quick.add_argument(
        "--datasets",
        default=None,
        help="comma-separated subset of diabetes,breast_cancer,text-demo (default: all three; text-demo: the "
        "demo LM on Python's docstrings in the paper's text setting)",
    )
    quick.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the final models' initialisation and batch order (and the demo LM's): another seed is another "
        "final model, the spread benchmarks/spread.py reports",
    )
    _address(quick)
    _quiet(quick)

    srv = command(
        "serve",
        commands.cmd_serve,
        "a Ray Serve HTTP API for influence queries over a store (text or tabular)",
        "POST /query with raw test inputs (feature rows by position or name, or texts) for top_k and bottom_k "
        "training rows; /methods, /health, and /docs generated from the store's schema. Every replica holds the "
        "model, the operators and the FAISS indexes; concurrent requests are batched into one gradient pass. "
        "Binds loopback unless --host says otherwise.",
    )
    srv.add_argument("store", help="store directory or URI")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    srv.add_argument("--port", type=port, default=8000, help="TCP port (default 8000; 0: any free one)")
    srv.add_argument("--replicas", type=int, default=1, help="Serve replicas answering queries")
    srv.add_argument("--kind", choices=KINDS, default="flat", help="FAISS index kind")
    srv.add_argument("--methods", default=None, help="comma-separated methods to serve (default: all it can)")
    srv.add_argument("--max-batch", type=int, default=32, help="requests per gradient pass (1: none)")
    srv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    srv.add_argument(
        "--index-shards",
        type=int,
        default=1,
        help="split each index over this many shard deployments (scatter-gather top-k) for indexes above a "
        "replica's memory",
    )
    srv.add_argument(
        "--read-only",
        action="store_true",
        help="never write into the store: operators and indexes it lacks are fitted in memory by every replica "
        "(prepare them beforehand with `tdastore index` to start fast)",
    )
    srv.add_argument(
        "--token-file",
        default=None,
        help="a file holding a bearer token; every request but /health must send 'Authorization: Bearer TOKEN'",
    )
    srv.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for Serve's proxy and every replica to answer /health before giving up (default 300)",
    )
    _address(srv)

    demo = command(
        "demo-lm",
        commands.cmd_demo_lm,
        "write an offline demo LM: a GPT-2 and tokenizer trained on Python's docstrings",
        "Trains a BPE tokenizer (tokenizers) and a small GPT-2 on paragraphs of the standard library's "
        "docstrings and saves them as a transformers directory, with corpus.jsonl and prompts.jsonl: what "
        "configs/tiny_gpt2.yaml points at. No network needed.",
    )
    demo.add_argument("--out", default="runs/tiny-gpt2", help="output directory")
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--width", type=int, default=64)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--vocab", type=int, default=512)
    demo.add_argument("--context", type=int, default=128)
    demo.add_argument("--steps", type=int, default=100, help="AdamW training steps on the corpus")
    _quiet(demo)

    command(
        "methods",
        commands.cmd_methods,
        "list the methods of the unified view",
        "The method table: each method's operator on the projected and exact paths.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        print(f"tdastore {args.command}: error: {suggestion(unknown, subparser)}", file=sys.stderr)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)  # SIGTERM stops a job as Ctrl-C does
    try:
        if getattr(args, "address", None):  # a cluster nobody answers at is refused before any output is made
            from tdastore.distributed.ray_session import check_reachable

            check_reachable(args.address)
        args.func(args)
    except TdaStoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused, or a library could not find or read a file
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C (130) or SIGTERM (143), between or inside a job's units
        if previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal does not cut the shutdown short
        print(f"\n{err if isinstance(err, Interrupted) else Interrupted('this step', 130)}", file=sys.stderr)
        _quiet_shutdown()
        return Terminated.exit_code if signal.SIGTERM in _signals_seen else getattr(err, "exit_code", 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


_signals_seen: list[int] = []  # Ray's calls may turn the raised Terminated into a plain KeyboardInterrupt


def _raise_terminated(signum, frame) -> None:
    _signals_seen.append(signum)
    raise Terminated()


def _quiet_shutdown() -> None:
    """Stop a Ray session this process started without Ray's own lines about the interrupted calls."""
    import logging

    if "ray" not in sys.modules:
        return
    import ray

    logging.getLogger("ray").setLevel(logging.CRITICAL)
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()


def os_error_message(err: OSError) -> str:
    """The OS's own reason and the path, with the fix that reason calls for (not one blanket suffix)."""
    where = f" ({err.filename})" if err.filename else ""
    fixes = {
        errno.ENOENT: "check the path (relative paths are read from the current directory)",
        errno.EACCES: "check the path's permissions",
        errno.EPERM: "check the path's permissions",
        errno.EROFS: "the file system is mounted read-only: write elsewhere",
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
    }
    fix = fixes.get(err.errno)
    if err.errno is None:  # raised with a message only (e.g. a library's "can't load ..." OSError)
        return str(err)
    return f"{err.strerror or err}{where}" + (f": {fix}" if fix else "")


if __name__ == "__main__":
    sys.exit(main())
