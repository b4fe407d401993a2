"""`tdastore quickstart`: the whole method on embedded data sets, end to end, in a few minutes.

For scikit-learn's diabetes (regression, the analogue of PAPER.md's Energy set, MLP d-128-128-1) and
breast_cancer (classification, MLP d-128-128-2): train the final model, build a gradient store with Ray
actors, run every method, run the further-training gold standard (20 seeds x 50 left-out rows, 50
evaluation points) as a Ray job pool, differentiate that further training (metagrad, 4 seeds), run the
linear datamodeling score's further training (50 random halves of the training rows left out, 4 seeds),
evaluate both metrics, and write a report with plots. For diabetes a second, subtract-coupling gold standard
(4 seeds) checks the metagradient where it is exact to first order. Every step resumes.

Then the same measurement on the offline demo LM (`text-demo`: GPT-2 2 x 64 trained here on 400 of Python's
docstrings) in the paper's text setting (text_demo_config), about 8 minutes on 2 cores. Further training runs
at a tenth of the training rate everywhere, as the paper's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tdastore.config import Config, config_to_dict, load_config, save_config
from tdastore.errors import ConfigError
from tdastore.evaluate.report import report_points

QUICKSTART = {
    "diabetes": {
        "task": {"dataset": "diabetes"},
        "train": {"lr": 0.01, "batch_size": 32, "epochs": 300},
        "groundtruth": {"lr": 0.001, "epochs": 200, "eval_every": 4},  # a tenth of the training rate (PAPER.md)
    },
    "breast_cancer": {
        "task": {"dataset": "breast_cancer"},
        "train": {"lr": 0.03, "batch_size": 32, "epochs": 100},
        "groundtruth": {"lr": 0.003, "epochs": 100, "eval_every": 2},
    },
}


def quickstart_config(name: str, output: Path, seed: int = 0) -> Config:
    """seed: the final model's initialisation and batch order."""
    spec = QUICKSTART[name]
    root = output / name
    return load_config(
        {
            "task": spec["task"],
            "model": {"hidden": [128, 128], "seed": seed},
            "train": {**spec["train"], "output_dir": str(root / "model"), "seed": seed},
            "gradients": {"batch_size": 128},
            "projection": {"kind": "gaussian", "dim": 256, "seed": 0},  # the projected space trak1 needs (k < N)
            "store": {"chunk_rows": 64, "shard_rows": 64},
            "build": {"workers": 2},
            "attribution": {"lissa_depth": 300, "lissa_batch_size": 128},
            "groundtruth": {
                **spec["groundtruth"],
                "batch_size": 128,
                "coupling": "delete",
                "optimizer": "sgd",
                "seeds": 20,
                "seed_block": 5,
                "left_out_count": 50,
                "left_out_block": 50,
                "workers": 2,
                "output": str(root / "groundtruth"),
            },
            "metagrad": {"seeds": 4, "seed_block": 1, "workers": 2},
            "lds": {"subsets": 50, "fraction": 0.5, "seeds": 4, "subset_block": 25, "workers": 2},
        }
    )


def subtract_config(config: Config, root: Path) -> Config:
    """The subtract-coupling gold standard (shared batches, minus L(z_i)/N): the metagradient's exact setting."""
    as_dict = config_to_dict(config)
    as_dict["groundtruth"] |= {
        "coupling": "subtract",
        "seeds": 4,
        "seed_block": 2,
        "output": str(root / "groundtruth-subtract"),
    }
    return load_config(as_dict)


TEXT_DEMO = "text-demo"
TEXT_METHODS = ["grad_dot", "grad_cos", "if_gn", "lissa", "datainf", "trak1", "kfac", "ekfac", "metagrad"]
# the demo LM (about 137k parameters) is small enough for the exact path over all of them; the CG and LiSSA solves
# (if_gn, lissa, if_h) are left out there (a thousand Gauss-Newton products over every document per query block),
# and so is ekfac, whose exact path covers Linear / Conv1D layers only, not the embeddings and norm layers
TEXT_EXACT_METHODS = ["grad_dot", "grad_cos", "if_diag", "adam_dot", "adam_cos", "adam_replay", "datainf"]
TEXT_LM_STEPS = 4000  # AdamW steps of the demo LM on the training documents: its loss has flattened (README)


def text_demo_config(output: Path, n_train: int | None = None) -> Config:
    """The paper's text setting (PAPER.md, SST-2) on the offline demo LM: subtract coupling, AdamW at a tenth of
    the demo LM's training rate (3e-3), clipping 1.0, one epoch in batches of 8, an evaluation every 5 steps,
    8 seeds, 50 left-out documents, 50 test documents; a factored 16 x 16 store over every matrix of the model
    (modules: all: embeddings, the tied head and every block Linear) with PCA sides (projection.basis: pca, fitted
    on every training document: 1.5-2.3x the cosine of random sides at these 2,560 columns)."""
    root = output / TEXT_DEMO
    steps = -(-n_train // 8) if n_train else 1  # one epoch
    return load_config(
        {
            "device": "auto",
            "task": {
                "dataset": str(root / "corpus.jsonl"),
                "kind": "causal_lm",
                "max_length": 32,
                "id_column": "id",
                "test_fraction": 0.15,
            },  # fmt: skip
            "model": {"name_or_path": str(root / "model")},
            "gradients": {"modules": "all", "batch_size": 32},
            "projection": {"kind": "factored", "factors": [16, 16], "basis": "pca"},
            "store": {"chunk_rows": 128, "shard_rows": 128, "path": str(root / "store")},
            "build": {"workers": 2},
            "attribution": {"lissa_depth": 100},
            "groundtruth": {
                "coupling": "subtract",
                "optimizer": "adamw",
                "lr": 3e-4,
                "clip_norm": 1.0,
                "batch_size": 8,
                "epochs": None,
                "steps": steps,
                "eval_every": 5 if steps >= 5 else 1,
                "seeds": 8,
                "seed_block": 4,
                "left_out_count": 50,
                "left_out_block": 50,
                "test_points": 50,
                "workers": 2,
                "output": str(root / "groundtruth"),
            },
            "metagrad": {"seeds": 4, "seed_block": 1, "workers": 2},
            # LDS as TRAK and datamodels define it: each subset's rows dropped from further training
            "lds": {"subsets": 50, "fraction": 0.5, "seeds": 4, "subset_block": 10, "workers": 2, "coupling": "delete"},
        }
    )


def run_text_demo(out: Path, progress: bool, seed: int = 0) -> dict:
    """The demo LM (trained here, offline, on the training documents only), its store, the text gold standard,
    and three evaluations by cosine and LDS: every method with a projected path and the metagradient on the
    factored store; the same store built with the Adafactor normaliser for adam_dot / adam_cos; and the exact
    path over all parameters. Returns {label: evaluation results}. The LDS subsets are dropped from further
    training (lds.coupling: delete): in the gold standard's subtract coupling each subset's N/2 rows would join
    every step, about 20x its cost."""
    from tdastore.distributed.build import build_store
    from tdastore.evaluate.run import evaluate
    from tdastore.groundtruth.pool import run_groundtruth
    from tdastore.tasks import make_task
    from tdastore.tasks.text import quiet_hugging_face

    quiet_hugging_face()
    root = out / TEXT_DEMO
    draft = text_demo_config(out)
    if not (root / "model" / "config.json").is_file():
        make_demo_lm(out, progress, seed)
    n_train = len(make_task(draft.task, draft.model).examples("train"))
    config = text_demo_config(out, n_train)
    save_config(config, root / "config.yaml")
    store = build_store(config, config.store.path, progress=progress)
    gt_root = run_groundtruth(config, progress=progress)
    metrics = ("cosine", "lds")
    found = {}
    found[TEXT_DEMO] = evaluate(store, gt_root, methods=TEXT_METHODS, out=root / "evaluation", path="projected",
                                progress=progress, metrics=metrics)  # fmt: skip
    normalised = load_config({**config_to_dict(config), "gradients": {**config_to_dict(config)["gradients"],
                              "normalizer": "adafactor"}})  # fmt: skip
    adam_store = build_store(normalised, root / "store-adafactor", progress=progress)
    found[f"{TEXT_DEMO} (adafactor store)"] = evaluate(
        adam_store, gt_root, methods=["adam_dot", "adam_cos"], out=root / "evaluation-adafactor", path="projected",
        progress=progress, metrics=metrics,
    )  # fmt: skip
    found[f"{TEXT_DEMO} (exact, all parameters)"] = evaluate(
        store, gt_root, methods=TEXT_EXACT_METHODS, out=root / "evaluation-exact", path="exact", progress=progress,
        metrics=metrics,
    )  # fmt: skip
    explain_prompts(store, found[TEXT_DEMO], root)
    return found


def make_demo_lm(out: Path, progress: bool, seed: int = 0, steps: int = TEXT_LM_STEPS, all_documents: bool = False):
    """OUT/text-demo's LM, corpus and prompts (tdastore.demo_text.make_tiny_lm): `steps` AdamW steps on the
    training documents, the test documents left unseen; all_documents trains on those too (the demo LM of
    before issue 22, benchmarks/text_demo_lm.py)."""
    from tdastore.demo_text import make_tiny_lm
    from tdastore.tasks.text import split_rows

    draft = text_demo_config(out)
    train_rows = None
    if not all_documents:
        train_rows = split_rows(400, draft.task.test_fraction, draft.task.split_seed)[0].tolist()
    make_tiny_lm(out / TEXT_DEMO, vocab_size=512, n_positions=64, train_steps=steps, documents=400, max_length=32,
                 progress=progress, train_rows=train_rows, seed=seed)  # fmt: skip


def explain_prompts(store, results: dict, root: Path, prompts: int = 2, k: int = 3) -> None:
    """Token-level attribution of the demo's first prompts by the projected method that agreed best with the gold
    standard: the top-k documents with their ten highest-scoring tokens printed, every share written to
    ROOT/tokens/ (Parquet, HTML, PNG)."""
    import json

    from tdastore.attribution import Attributor
    from tdastore.attribution.render import strongest_tokens, write_token_scores

    ranked = [(max(e["cosine"]), name) for name, e in results["methods"].items()
              if "cosine" in e and e["path"] == "projected"]  # fmt: skip
    method = max(ranked)[1]
    texts = [json.loads(line)["text"] for line in (root / "prompts.jsonl").read_text().splitlines()[:prompts]]
    tokens = Attributor(store, method).token_scores(texts, k=k)
    write_token_scores(tokens, str(root / "tokens"))
    print(f"-- token-level attribution ({method}) of {texts}:\n{strongest_tokens(tokens)}")
    print(f"token shares: {root / 'tokens'}/tokens.html, tokens.png, tokens.parquet")


def run_quickstart(
    output: str = "runs/quickstart",
    datasets: list[str] | None = None,
    address: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """seed: the final models' (and the demo LM's) initialisation and batch order; the gold standard's own seeds
    are the config's."""
    from tdastore.distributed.build import build_store
    from tdastore.distributed.ray_session import ray_session
    from tdastore.evaluate.run import evaluate
    from tdastore.groundtruth.pool import run_groundtruth
    from tdastore.training import WEIGHTS_FILE, train

    out = Path(output)
    summaries = {}
    began = time.perf_counter()
    with ray_session(address, num_cpus=2):
        unknown = sorted(set(datasets or []) - set(QUICKSTART) - {TEXT_DEMO})
        if unknown:
            raise ConfigError(f"unknown quickstart data set(s) {unknown}: choose from {[*QUICKSTART, TEXT_DEMO]}")
        for name in datasets or [*QUICKSTART, TEXT_DEMO]:
            if name == TEXT_DEMO:
                print(f"\n== {name}: demo LM, factored store, text gold standard (subtract, AdamW), evaluation ==")
                for label, results in run_text_demo(out, progress, seed).items():
                    summaries[label] = results
                    print(f"-- {label}\n{_table(results)}")
                print(f"reports: {out / TEXT_DEMO}/evaluation*/report.md")
                continue
            config = quickstart_config(name, out, seed)
            root = out / name
            root.mkdir(parents=True, exist_ok=True)
            save_config(config, root / "config.yaml")
            print(f"\n== {name}: final model, gradient store, gold standard, evaluation ==")
            if not (Path(config.train.output_dir) / WEIGHTS_FILE).is_file():
                train(config, progress=progress)
            store = build_store(config, root / "store", progress=progress)
            gt_root = run_groundtruth(config, progress=progress)
            results = evaluate(store, gt_root, out=root / "evaluation", progress=progress, metrics=("cosine", "lds"))
            summaries[name] = results
            print(_table(results))
            print(f"report: {root / 'evaluation' / 'report.md'}")
            if name == "diabetes":
                print(f"\n== {name}: subtract-coupling gold standard (the metagradient's exact setting) ==")
                sub_root = run_groundtruth(subtract_config(config, root), progress=progress)
                results = evaluate(store, sub_root, out=root / "evaluation-subtract", progress=progress)
                summaries[f"{name}-subtract"] = results
                print(_table(results))
                print(f"report: {root / 'evaluation-subtract' / 'report.md'}")
    print(f"\nquickstart finished in {time.perf_counter() - began:.0f} s; outputs in {out}/")
    return summaries


def _table(results: dict) -> str:
    labels = results["evals"]["labels"]
    points = report_points(labels)
    unit = results["evals"]["unit"]
    lines = [f"{'method':<13}{'path':<10}" + "".join(f"{unit + ' ' + str(labels[i]):>11}" for i in points)]
    for name, entry in results["methods"].items():
        if "cosine" not in entry:
            lines.append(f"{name:<13}{entry['path']:<10}skipped: {entry['error'][:70]}")
            continue
        cos = np.asarray(entry["cosine"])
        lds = f"{max(entry['lds']):>10.3f}" if "lds" in entry else ""
        lines.append(f"{name:<13}{entry['path']:<10}" + "".join(f"{cos[i]:>11.3f}" for i in points) + lds)
    if results.get("gold_ceiling"):  # a perfect method against these seeds: differences near it are noise
        ceiling = results["gold_ceiling"]
        lines.append(f"{'(ceiling)':<13}{'seeds':<10}" + "".join(f"{ceiling[i]:>11.3f}" for i in points))
    if "lds" in results:
        lines[0] += f"{'LDS best':>10}"
    return "\n".join(lines)
