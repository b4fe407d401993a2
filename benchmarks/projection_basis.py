"""What the factored projection's sides cost in agreement: random Gaussian sides vs PCA sides (projection.basis).

On the text demo of a finished `tdastore quickstart --datasets text-demo` (its LM, config and gold standard),
builds the factored store over every matrix (`modules: all`) at each size in --factors with random and with PCA
sides, plain and with the Adafactor normaliser, and evaluates the projected methods on each against the same
gold standard, beside the exact path over all parameters. Reference in the same run: the random sides at the
same size; `--factors 0` keeps every side whole (the exact inner products over the store's matrices, what a
projection of them approaches).

    python benchmarks/projection_basis.py --run runs/quickstart/text-demo [--factors 16 32 64 0]

Writes benchmarks/results/projection_basis.json and prints cosine at the report's evaluation points and the best
LDS for each (size, basis, method).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PLAIN = ["grad_dot", "if_gn", "datainf", "ekfac"]
NORMALISED = ["adam_dot", "adam_cos"]
WHOLE = 1 << 20  # a side this wide is never projected (the identity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/quickstart/text-demo", help="a finished text-demo folder")
    parser.add_argument("--factors", type=int, nargs="+", default=[16, 32, 64, 0], help="0: every side whole")
    parser.add_argument("--out", default="benchmarks/results/projection_basis.json")
    args = parser.parse_args()

    from tdastore.config import config_to_dict, load_config
    from tdastore.distributed.build import build_store
    from tdastore.distributed.ray_session import ray_session
    from tdastore.evaluate.report import report_points
    from tdastore.evaluate.run import evaluate

    run = Path(args.run)
    base = config_to_dict(load_config(run / "config.yaml"))
    found: dict = {"run": str(run), "rows": {}}
    with ray_session(None, num_cpus=2):
        exact = evaluate(
            build_store(load_config(base), run / "store", progress=False),
            run / "groundtruth",
            methods=["grad_dot", "adam_dot"],
            path="exact",
            progress=False,
        )
        for name, entry in exact["methods"].items():
            found["rows"][f"exact all parameters {name}"] = {"cosine": entry["cosine"], "columns": None}
        found["evals"] = exact["evals"]
        for factors in args.factors:
            whole = factors == 0  # every side kept whole: the exact inner products over the store's matrices
            for basis in ("random",) if whole else ("random", "pca"):
                kinds = (("none", ["grad_dot"]), ("adafactor", ["adam_dot"])) if whole else (
                    ("none", PLAIN), ("adafactor", NORMALISED))  # fmt: skip
                for normalizer, methods in kinds:
                    sides = [WHOLE, WHOLE] if whole else [factors, factors]
                    config = load_config({
                        **base,
                        "gradients": {**base["gradients"], "normalizer": normalizer},
                        "projection": {**base["projection"], "basis": basis, "factors": sides},
                    })  # fmt: skip
                    began = time.perf_counter()
                    store = build_store(config, run / f"basis-{basis}-{factors}-{normalizer}", progress=False)
                    built = time.perf_counter() - began
                    results = evaluate(store, run / "groundtruth", methods=methods, path="projected", progress=False,
                                       metrics=("cosine", "lds"))  # fmt: skip
                    for name, entry in results["methods"].items():
                        if "error" in entry:  # e.g. a dense operator too wide for these columns
                            print(f"{factors} x {factors} {basis} {name}: skipped ({entry['error']})", flush=True)
                            continue
                        found["rows"][f"{'whole' if whole else factors} {basis} {name}"] = {
                            "cosine": entry["cosine"],
                            "lds_best": max(entry["lds"]),
                            "columns": store.manifest["dim"],
                            "build_s": built,
                        }
                        first, lds = entry["cosine"][0], max(entry["lds"])
                        size = "whole" if whole else f"{factors} x {factors}"
                        line = f"{size:<9} {basis:<7} {name:<9} cosine first {first:.3f}  LDS best {lds:.3f}"
                        print(line, flush=True)
    Path(args.out).write_text(json.dumps(found, indent=1))
    labels = found["evals"]["labels"]
    points = report_points(labels)
    print(f"\n{'factors':<8} {'basis':<7} {'method':<9} {'columns':>8} "
          + " ".join(f"{'step ' + str(labels[p]):>8}" for p in points) + "  LDS best")  # fmt: skip
    for label, row in found["rows"].items():
        cells = " ".join(f"{row['cosine'][p]:>8.3f}" for p in points)
        parts = label.split(" ")
        head = f"{parts[0]:<8} {parts[1]:<7} {parts[2]:<9}"
        if row["columns"] is None:
            head = f"{'exact':<8} {'-':<7} {parts[-1]:<9}"
        lds = f"  {row['lds_best']:.3f}" if "lds_best" in row else ""
        print(f"{head} {row['columns'] or '-':>8} {cells}{lds}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
