"""How much the quickstart's tables move when the final model changes: the spread behind the README's tables.

The experiment trains a final model and then thousands of float32 further-training replicas; another CPU's
kernels (AVX2, AVX-512, AMX) change the last bits of every product, training carries them into the weights,
and every table cell moves. This runs `tdastore quickstart` once per variant, each in its own process and
output folder, and reports every cell's range over the variants:

- `seed0`: the README's run (training seed 0, 2 threads, MKL's strict reproducible mode);
- `threads1`: the same with one thread (under the strict mode the same bits: a check of that claim);
- `loose`: MKL_CBWR=AUTO, MKL free to split products by thread count and pick kernels, as without tdastore's
  strict mode (another machine's kernels differ more than this, but in the same way: last bits);
- `seed1`, `seed2`: other final models (initialisation and batch order), an upper bound on what any CPU's
  kernels do to one seed's final model.

    python benchmarks/spread.py --output runs/spread [--datasets diabetes,text-demo] [--variants seed0,...]

Writes OUTPUT/spread.json ({label: {method: {point: [min, max, per variant...]}}}) and prints one table per
evaluation with each cell as "min-max". Each variant resumes like the quickstart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "seed0": ({}, 0),
    "threads1": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 0),
    "loose": ({"MKL_CBWR": "AUTO"}, 0),
    "seed1": ({}, 1),
    "seed2": ({}, 2),
}


def run_variant(name: str, output: Path, datasets: str) -> float:
    env_extra, seed = VARIANTS[name]
    env = {**os.environ, **env_extra}
    began = time.perf_counter()
    command = [sys.executable, "-m", "tdastore", "quickstart", "--quiet", "--output", str(output / name)]
    subprocess.run([*command, "--datasets", datasets, "--seed", str(seed)], env=env, check=True)
    return time.perf_counter() - began


def evaluations(root: Path) -> dict[str, dict]:
    """{label: results.json} of every evaluation under a variant's output."""
    found = {}
    for path in sorted(root.glob("*/evaluation*/results.json")):
        found[f"{path.parent.parent.name}/{path.parent.name}"] = json.loads(path.read_text())
    return found


def spread(output: Path, variants: list[str]) -> dict:
    from tdastore.evaluate.report import report_points

    runs = {name: evaluations(output / name) for name in variants}
    table = {}
    for label in sorted(set.intersection(*(set(r) for r in runs.values()))):
        first = runs[variants[0]][label]
        labels = first["evals"]["labels"]
        points = report_points(labels)
        table[label] = {"unit": first["evals"]["unit"], "points": [labels[i] for i in points], "methods": {}}
        for method, entry in first["methods"].items():
            if "cosine" not in entry:
                continue
            cells = []
            for i in points:
                values = [float(runs[v][label]["methods"][method]["cosine"][i]) for v in variants]
                cells.append({"min": min(values), "max": max(values), "values": dict(zip(variants, values))})
            if "lds" in entry:
                values = [float(max(runs[v][label]["methods"][method]["lds"])) for v in variants]
                cells.append({"min": min(values), "max": max(values), "values": dict(zip(variants, values)),
                              "lds": True})  # fmt: skip
            table[label]["methods"][method] = cells
    return table


def print_table(table: dict) -> None:
    for label, entry in table.items():
        print(f"\n{label}: cosine to the gold standard (min-max over the variants; last: LDS best)")
        print(f"{'method':<13}" + "".join(f"{entry['unit'] + ' ' + str(p):>14}" for p in entry["points"]))
        for method, cells in entry["methods"].items():
            print(f"{method:<13}" + "".join(f"{c['min']:>8.3f}-{c['max']:.3f}"[-14:].rjust(14) for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/spread")
    parser.add_argument("--datasets", default="diabetes,text-demo")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--report-only", action="store_true", help="tabulate finished variants, run nothing")
    args = parser.parse_args()
    output, variants = Path(args.output), args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    if not args.report_only:
        for name in variants:
            seconds = run_variant(name, output, args.datasets)
            print(f"variant {name}: {seconds:.0f} s", flush=True)
    table = spread(output, variants)
    (output / "spread.json").write_text(json.dumps(table, indent=1))
    print_table(table)
    same = [v for v in variants[1:] if all(
        np.isclose(c["values"][v], c["values"][variants[0]], rtol=0, atol=0)
        for entry in table.values() for cells in entry["methods"].values() for c in cells
    )]  # fmt: skip
    print(f"\nvariants whose every cell equals {variants[0]}'s: {same or 'none'}")


if __name__ == "__main__":
    main()
