"""The `tdastore` command line: one subcommand per job, each driven by the same typed config."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from tdastore.errors import TdaStoreError


def _cmd_train(args: argparse.Namespace) -> None:
    import tdastore
    from tdastore.training import evaluate_loss
    from tdastore.tasks.tabular import make_task

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
    store = tdastore.build(config, args.output, split=args.split, address=args.address, workers=args.workers,
                           progress=not args.quiet)
    print(store.summary())


def _cmd_info(args: argparse.Namespace) -> None:
    import tdastore

    print(tdastore.open_store(args.store, allow_incomplete=True).summary())


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdastore",
        description="Training data attribution at scale: per-example gradient stores built with Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the final model of a config and save its weights",
                           description="Train the final model (SGD) and write model.safetensors + config.yaml "
                                       "to train.output_dir.")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    build = sub.add_parser("build", help="compute per-example gradients into a store with Ray actors",
                           description="Build (or resume) a gradient store: Zarr rows, Parquet metadata, manifest.")
    build.add_argument("--config", required=True, help="YAML config (see configs/)")
    build.add_argument("--output", required=True, help="store directory (created, or resumed if it exists)")
    build.add_argument("--split", choices=["train", "test"], default="train", help="which split's gradients")
    build.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    build.add_argument("--workers", type=int, default=None, help="number of Ray actors (default: build.workers)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_build)

    info = sub.add_parser("info", help="print a summary of a store", description="Summarise a gradient store.")
    info.add_argument("store", help="store directory")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except TdaStoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
