"""Job: compare attribution.methods with the gold standard; writes the report next to the ground truth."""

from _job import parse, require


def main() -> None:
    config, args = parse(__doc__, lambda p: p.add_argument("--out", default=None, help="report directory"))
    from pathlib import Path

    import tdastore
    from tdastore.evaluate.run import evaluate

    store = tdastore.open_store(require(config.store.path, "store.path"))
    out = Path(args.out or Path(config.groundtruth.output) / "evaluation")
    evaluate(store, config.groundtruth.output, methods=config.attribution.methods, out=out)
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
