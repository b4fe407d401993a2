"""Job: the further-training gold standard (groundtruth section) as a Ray job pool; resumes finished units."""

from _job import parse


def main() -> None:
    config, args = parse(__doc__)
    from pathlib import Path

    import tdastore
    from tdastore.groundtruth.pool import run_groundtruth
    from tdastore.training import WEIGHTS_FILE

    if not (Path(config.train.output_dir) / WEIGHTS_FILE).is_file():
        tdastore.train(config, progress=False)
    print(f"ground truth written to {run_groundtruth(config, address=args.address, progress=False)}")


if __name__ == "__main__":
    main()
