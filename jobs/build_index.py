"""Job: train the final model if its weights are missing, then build the gradient store (store.path)."""

from _job import parse, require


def main() -> None:
    config, args = parse(__doc__)
    from pathlib import Path

    import tdastore
    from tdastore.distributed.build import build_store
    from tdastore.training import WEIGHTS_FILE

    output = require(config.store.path, "store.path")
    if not (Path(config.train.output_dir) / WEIGHTS_FILE).is_file():
        tdastore.train(config, progress=False)
    store = build_store(config, output, address=args.address, progress=False)
    print(store.summary())


if __name__ == "__main__":
    main()
