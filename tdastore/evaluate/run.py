"""`tdastore evaluate`: every method's scores against the gold standard, with a report and plots."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tdastore.attribution import Attributor, store_config
from tdastore.config import load_config
from tdastore.errors import ConfigError, StoreError, TdaStoreError
from tdastore.evaluate.metrics import agreement, gold_ceiling, gold_vectors, linear_datamodeling_score, seed_curve
from tdastore.evaluate.report import write_plots, write_report
from tdastore.groundtruth.lds import lds_coupling, lds_root, read_lds, read_lds_manifest, run_lds
from tdastore.groundtruth.pool import read_groundtruth_manifest
from tdastore.methods import get_method
from tdastore.store.checksums import JOB_REPAIR, read_array
from tdastore.store.lease import Lease
from tdastore.store.location import store_path
from tdastore.store.manifest import write_bytes_atomic

DEFAULT_METHODS = [
    "grad_dot",
    "grad_cos",
    "tracin_final",
    "if_gn",
    "lissa",
    "trak1",
    "datainf",
    "ekfac",
    "if_gen",
    "if_h",
    "if_diag",
    "adam_dot",
    "adam_cos",
    "metagrad",
]


def choose_path(store, method_name: str, requested: str | None) -> str:
    """The exact path where the method has one and the model is small enough (as the paper ran them)."""
    method = get_method(method_name)
    if method.further_training:
        return "exact"
    if requested:
        return requested
    if method.exact is None:
        return "projected"
    if method.projected is None:
        return "exact"
    limit = store_config(store).attribution.max_exact_params
    return "exact" if store.manifest["gradients"]["numel"] <= limit else "projected"


@dataclass
class GoldStandard:
    """A finished ground truth: its manifest, raw losses and the gold vectors of PAPER.md."""

    root: Path
    manifest: dict
    loo: np.ndarray  # [E, T, L, S] g after further training without row i
    full: np.ndarray  # [E, T, S] g after further training on all rows
    vectors: np.ndarray  # [E, T, L] adjusted, seed-averaged, mean-centred
    left: np.ndarray  # [L] the left-out training rows


def load_gold(store, groundtruth: str | Path) -> GoldStandard:
    """Read a complete ground truth of the same task and model as `store`."""
    gt_root = store_path(groundtruth)
    manifest = read_groundtruth_manifest(gt_root)
    for key in ("task", "model"):
        if manifest[key]["fingerprint"] != store.manifest[key]["fingerprint"]:
            raise StoreError(
                f"ground truth '{gt_root}' was computed for another {key} ({manifest[key]['fingerprint']}) than store "
                f"'{store.root}' ({store.manifest[key]['fingerprint']}): "
                "evaluate a store and ground truth of the same run"
            )
    if manifest.get("status") != "complete":
        raise StoreError(f"ground truth '{gt_root}' is incomplete: rerun `tdastore ground-truth` to finish it")
    loo = read_array(gt_root / "loo.zarr", what=f"ground truth '{gt_root}'", fix=JOB_REPAIR)
    full = read_array(gt_root / "full.zarr", what=f"ground truth '{gt_root}'", fix=JOB_REPAIR)
    return GoldStandard(gt_root, manifest, loo, full, gold_vectors(loo, full), np.asarray(manifest["left_out"]))


def evaluate(
    store,
    groundtruth: str | Path,
    methods: list[str] | None = None,
    out: str | Path | None = None,
    path: str | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    task=None,
    metrics: tuple[str, ...] = ("cosine",),
    damping_grid: tuple | None = None,
) -> dict:
    """Cosine / Spearman of each method against the gold standard at every evaluation point, and seed curves;
    with "lds" in `metrics` also the linear datamodeling score (its job is run beside the ground truth when
    missing). task: the task object the store and ground truth were made from with the Python API.
    damping_grid: also score every damped method at each of these damping factors (numbers or "auto")."""
    unknown = sorted(set(metrics) - {"cosine", "lds"})
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}: choose from cosine, lds")
    gold = load_gold(store, groundtruth)
    lds = load_lds(store, gold, overrides, progress, task) if "lds" in metrics else None
    methods = methods or DEFAULT_METHODS

    def run() -> dict:
        for name in methods:
            get_method(name)  # unknown names fail before any work
        first = "adam_dot" if "normaliser" in store.manifest["projection"] else "grad_dot"  # what the store answers
        base = Attributor(store, first, {"attribution": {"path": "projected"}}, task=task)  # loaded once
        results = score_methods(store, gold, base, methods, path, overrides, progress, task, lds)
        if damping_grid:
            results["damping_sweep"] = damping_sweep(store, gold, base, methods, path, overrides, damping_grid, lds)
        return results

    if out is None:
        return run()
    with Lease(store_path(out), "evaluation"):  # one evaluation writes into `out` at a time
        results = run()
        write_results(results, out)
    return results


DAMPING_GRID = (100.0, 10.0, 1.0, 0.1, 0.01, 0.001, "auto")


def damping_sweep(store, gold: GoldStandard, base: Attributor, methods, path, overrides, grid, lds=None) -> dict:
    """{method: {factor: {"damping": lambda, "cosine": [E], (+ "lds": [E])}}} for every method whose operator
    depends on attribution.damping_factor, as the paper sweeps DataInf's c and the solvers' lambda."""
    from tdastore.precond.registry import operator_class

    test = base.task.examples("test").slice(0, len(gold.manifest["test_rows"]))
    sweep: dict = {}
    for name in methods:
        method = get_method(name)
        if method.further_training:
            continue
        chosen = choose_path(store, name, path)
        settings = operator_class(chosen, method.operator(chosen)).settings
        if "adam_eps" in settings:  # adam_dot / adam_cos: eps = factor x mean sqrt(v), as lambda = factor x lambda_0
            sweep[name] = eps_sweep(store, gold, base, name, chosen, overrides, grid, test, lds)
            continue
        if "damping_factor" not in settings:
            continue
        shared = base
        for factor in grid:
            attribution = {**((overrides or {}).get("attribution", {})), "path": chosen, "damping_factor": factor}
            try:
                attributor = Attributor(store, name, {"attribution": attribution}, share=shared)
                every_row = attributor.score_matrix(test)  # [T, N]
            except TdaStoreError as err:
                sweep.setdefault(name, {})[str(factor)] = {"error": str(err)}
                continue
            if chosen == "exact":
                shared = attributor  # lambda_0 and the curvature's extreme eigenvalues once per method
            entry = {"damping": attributor.info.get("damping"), "path": chosen}
            entry["cosine"] = agreement(gold.vectors, every_row[:, gold.left])["cosine"].tolist()
            if lds is not None:
                entry["lds"] = linear_datamodeling_score(lds[0], every_row, lds[1]["subsets"])["lds"].tolist()
            sweep.setdefault(name, {})[str(factor)] = entry
    return sweep


def eps_sweep(store, gold: GoldStandard, base: Attributor, name, path, overrides, grid, test, lds) -> dict:
    """Adam's eps swept like a damping: eps = factor x eps_0, eps_0 = the mean of sqrt(v) (exact path; "auto"
    has no spectral rule here and is skipped)."""
    attribution = {**((overrides or {}).get("attribution", {})), "path": path}
    first = Attributor(store, name, {"attribution": attribution}, share=base)
    first.score_matrix(test.slice(0, 1))  # computes v
    eps_0 = first.info.get("sqrt_v_mean")
    found: dict = {}
    for factor in (f for f in grid if f != "auto"):
        if eps_0 is None:
            found[str(factor)] = {"error": "the projected path takes eps from the store's normaliser"}
            continue
        eps = float(factor) * eps_0
        attributor = Attributor(store, name, {"attribution": {**attribution, "adam_eps": eps}}, share=base)
        every_row = attributor.score_matrix(test)  # [T, N]
        entry = {"damping": eps, "eps": eps, "path": path}
        entry["cosine"] = agreement(gold.vectors, every_row[:, gold.left])["cosine"].tolist()
        if lds is not None:
            entry["lds"] = linear_datamodeling_score(lds[0], every_row, lds[1]["subsets"])["lds"].tolist()
        found[str(factor)] = entry
    return found


def load_lds(store, gold: GoldStandard, overrides: dict | None, progress: bool, task=None) -> tuple:
    """The LDS job's seed-averaged actual changes [E, T, M] and manifest, run first when not finished."""
    config = store_config(store, overrides)
    root = lds_root(gold.root, lds_coupling(config, gold.manifest["groundtruth"]["coupling"]))
    if not ((root / "manifest.json").is_file() and read_lds_manifest(root).get("status") == "complete"):
        run_lds(config, gold.root, progress=progress, task=task)
    return read_lds(root)


def score_methods(
    store,
    gold: GoldStandard,
    base: Attributor,
    methods: list[str],
    path: str | None,
    overrides: dict | None,
    progress: bool,
    task=None,
    lds: tuple | None = None,
) -> dict:
    """Every method's [T, L] scores through the attribution façade, compared with the gold vectors (and, with
    `lds` = (actual changes [E, T, M], LDS manifest), the linear datamodeling score of the full [T, N] rows).
    base: an Attributor of the store whose task and model every method's attributor shares."""
    test = base.task.examples("test").slice(0, len(gold.manifest["test_rows"]))
    results = {
        "groundtruth": str(gold.root),
        "store": str(store.root),
        "evals": gold.manifest["evals"],
        "n_test": len(test),
        "n_left_out": len(gold.left),
        "n_seeds": len(gold.manifest["seeds"]),
        "methods": {},
    }
    ceiling = gold_ceiling(gold.loo, gold.full)  # [E]: what a perfect method would reach against these seeds
    if ceiling is not None:
        results["gold_ceiling"] = ceiling.tolist()
    if lds is not None:
        actual, lds_manifest = lds
        results["lds"] = {
            "subsets": len(lds_manifest["subsets"]),
            "fraction": lds_manifest["fraction"],
            "seeds": len(lds_manifest["seeds"]),
            "coupling": lds_manifest["coupling"],
            "store": str(lds_root(gold.root, lds_manifest["coupling"])),
        }
    shared = base  # the first exact-path attributor: lambda_0 and the Hessian's lowest eigenvalue once
    for name in methods:
        chosen = choose_path(store, name, path)
        settings = {"attribution": {**((overrides or {}).get("attribution", {})), "path": chosen}}
        try:
            if get_method(name).further_training:
                scores, info, every = metagrad_scores(store, gold.root, gold.manifest, overrides, progress, task)
                if lds is not None and every is not None:  # metagrad.rows: all -> a prediction for every subset
                    info.update(lds_each_point(lds, every))
            elif replays_each_point(name, chosen, overrides):
                attributor = Attributor(store, name, settings, share=shared)
                if shared.exact is None:
                    shared = attributor
                every = replay_at_evaluations(attributor, test, gold, every_row=lds is not None)  # [E, T, N or L]
                scores = every[:, :, gold.left] if lds is not None else every  # [E, T, L]
                info = {k: v for k, v in attributor.info.items() if k != "method"}
                info["replay_steps"] = "each evaluation point"
                if lds is not None:
                    info.update(lds_each_point(lds, every))
            else:
                attributor = Attributor(store, name, settings, share=shared)
                if chosen == "exact" and shared.exact is None:
                    shared = attributor
                every_row = attributor.score_matrix(test)  # [T, N]
                scores = every_row[:, gold.left]  # [T, L]
                info = {k: v for k, v in attributor.info.items() if k != "method"}
                if lds is not None:
                    found = linear_datamodeling_score(lds[0], every_row, lds[1]["subsets"])
                    info.update(lds=found["lds"].tolist(), lds_stderr=found["stderr"].tolist())
        except TdaStoreError as err:
            results["methods"][name] = {"path": chosen, "error": str(err)}
            if progress:
                print(f"  {name:<13} skipped: {err}")
            continue
        stats = agreement(gold.vectors, scores)
        results["methods"][name] = {
            **info,
            "cosine": stats["cosine"].tolist(),
            "stderr": stats["stderr"].tolist(),
            "spearman": stats["spearman"].tolist(),
            "seed_curve": {str(k): v for k, v in seed_curve(gold.loo, gold.full, scores).items()},
        }
        if progress:
            c = stats["cosine"]
            line = f"  {name:<13} {info['path']:<9} cosine first {c[0]:+.3f}  best {c.max():+.3f}  last {c[-1]:+.3f}"
            print(line + (f"  LDS best {max(info['lds']):+.3f}" if "lds" in info else ""))
    return results


def replays_each_point(name: str, path: str, overrides: dict | None) -> bool:
    """adam_replay on the exact path without a fixed attribution.replay_steps: scored at every evaluation point
    with that point's own number of replayed steps, as the metagradient is."""
    fixed = ((overrides or {}).get("attribution") or {}).get("replay_steps")
    return path == "exact" and get_method(name).exact == "adam_replay" and fixed is None


def replay_at_evaluations(attributor: Attributor, test, gold: GoldStandard, every_row: bool = False) -> np.ndarray:
    """[E, T, L]: adam_replay's scores of the left-out rows, replayed to each evaluation point's step (one pass)
    of the gold standard's own further training (its manifest's optimizer, lr, batch size, clipping, decay);
    every_row: [E, T, N], every training row's (for the LDS), a block of rows at a time. A row's replay does not
    depend on the others replayed beside it, so the left-out rows' scores are the same either way."""
    from tdastore.precond.exact.replay import replay

    further = load_config(gold.manifest["config"]).groundtruth  # as the LDS and metagradient jobs read it
    scorer = attributor.exact
    x = scorer.test_vectors(get_method("adam_replay"), test)  # [T, p]
    rows = scorer.space.train
    if not every_row:
        rows = rows.take(torch.as_tensor(gold.left, dtype=torch.long))
    steps = [int(s) for s in gold.manifest["evals"]["steps"]]
    out = np.empty((len(steps), x.shape[0], len(rows)))
    for start, block in scorer.space.example_grads(rows):  # block [b, p]
        for e, delta in enumerate(replay(scorer, block, steps, further)):  # delta [b, p]
            out[e, :, start : start + len(block)] = (x @ delta.T).double().cpu().numpy()
    return out


def lds_each_point(lds: tuple, every: np.ndarray) -> dict:
    """The LDS at each evaluation point of scores that differ by point ([E, T, N]: the metagradient's, the replay's),
    each against that point's actual changes (lds = (actual [E, T, M], LDS manifest))."""
    per_eval = [linear_datamodeling_score(lds[0][e : e + 1], every[e], lds[1]["subsets"]) for e in range(len(every))]
    return {"lds": [float(f["lds"][0]) for f in per_eval], "lds_stderr": [float(f["stderr"][0]) for f in per_eval]}


def write_results(results: dict, out) -> None:
    """results.json, the PNG plots and report.md in `out` (a directory or an object-store URI: written locally
    first, then one put per file)."""
    target = store_path(out)
    if not isinstance(target, Path):
        with tempfile.TemporaryDirectory() as tmp:
            write_results(results, Path(tmp))
            target.mkdir(parents=True, exist_ok=True)
            for file in sorted(Path(tmp).iterdir()):
                write_bytes_atomic(target / file.name, file.read_bytes())
        return
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(results, indent=1))
    write_plots(results, target)
    write_report(results, target)


def metagrad_scores(
    store, gt_root: Path, manifest: dict, overrides: dict | None, progress: bool, task=None
) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """The metagradient scores of the ground truth's left-out rows, [E, T, L], its info and, when the job scored
    every training row (metagrad.rows: all), all of them [E, T, N] (else None): read from GT/metagrad-<coupling>
    when finished, else computed there by the metagradient job (Ray)."""
    from tdastore.groundtruth.metagrad_pool import (
        metagrad_root,
        read_metagrad_manifest,
        read_metagrad_scores,
        run_metagrad,
    )

    config = store_config(store, overrides)
    coupling = config.metagrad.coupling or manifest["groundtruth"]["coupling"]
    root = metagrad_root(gt_root, coupling)
    finished = (root / "manifest.json").is_file() and read_metagrad_manifest(root).get("status") == "complete"
    if not finished:
        run_metagrad(config, gt_root, progress=progress, task=task)
    scores, mg_manifest = read_metagrad_scores(root)  # [E, T, R]
    position = {row: k for k, row in enumerate(mg_manifest["rows"])}
    columns = [position[row] for row in manifest["left_out"]]
    info = {
        "path": "exact",
        "operator": "metagrad",
        "coupling": coupling,
        "seeds": len(mg_manifest["seeds"]),
        "store": str(root),
    }
    every = scores if mg_manifest["rows"] == list(range(store.n_rows)) else None  # metagrad.rows: all
    return scores[:, :, columns], info, every
