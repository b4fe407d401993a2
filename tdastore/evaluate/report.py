"""report.md and PNG plots in the style of the paper's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def report_points(labels: list[int]) -> list[int]:
    """Indices of evaluation points shown in tables: first, ~10%, ~25%, ~50%, last."""
    n = len(labels)
    return sorted({0, max(0, n // 10 - 1), max(0, n // 4 - 1), max(0, n // 2 - 1), n - 1})


def cosine_table(results: dict) -> str:
    labels = results["evals"]["labels"]
    unit = results["evals"]["unit"]
    points = report_points(labels)
    head = "| method | path | " + " | ".join(f"{unit} {labels[i]}" for i in points) + " | best |"
    lines = [head, "|" + "---|" * (len(points) + 3)]
    for name, entry in results["methods"].items():
        if "error" in entry:
            lines.append(
                f"| {name} | {entry['path']} | "
                + " | ".join("-" for _ in points)
                + f" | skipped: {entry['error'][:60]} |"
            )
            continue
        cos, err = np.asarray(entry["cosine"]), np.asarray(entry["stderr"])
        cells = " | ".join(f"{cos[i]:.3f} ± {err[i]:.3f}" for i in points)
        lines.append(f"| {name} | {entry['path']} | {cells} | {cos.max():.3f} |")
    if results.get("gold_ceiling"):  # what a perfect method would reach against these seeds
        ceiling = np.asarray(results["gold_ceiling"])
        cells = " | ".join(f"{ceiling[i]:.3f}" for i in points)
        lines.append(f"| *ceiling* | seeds | {cells} | {ceiling.max():.3f} |")
    return "\n".join(lines)


def ceiling_note(results: dict) -> str:
    if not results.get("gold_ceiling"):
        return ""
    return (
        f"\n*ceiling*: the cosine a perfect method would reach against this gold vector of {results['n_seeds']} "
        "seeds (its seed noise estimated from the seeds' spread); differences between methods near it are noise, "
        "and more seeds raise it.\n"
    )


def write_report(results: dict, out: Path) -> None:
    seeds = sorted({int(k) for e in results["methods"].values() for k in e.get("seed_curve", {})})
    seed_lines = [
        "| method | " + " | ".join(f"{k} seed{'s' if k > 1 else ''}" for k in seeds) + " |",
        "|" + "---|" * (len(seeds) + 1),
    ]
    for name, entry in results["methods"].items():
        if "seed_curve" in entry:
            seed_lines.append(
                f"| {name} | " + " | ".join(f"{entry['seed_curve'][str(k)]['cosine']:.3f}" for k in seeds) + " |"
            )
    text = f"""# Agreement with the further-training gold standard

Ground truth: `{results["groundtruth"]}` ({results["n_seeds"]} seeds, {results["n_left_out"]} left-out rows,
{results["n_test"]} test points, {len(results["evals"]["labels"])} evaluation points).
Store: `{results["store"]}`.

Mean cosine (± standard error over test points) between each method's scores and the gold vector
(leave-one-out minus full run, mean-centred over the left-out rows, averaged over seeds):

{cosine_table(results)}
{ceiling_note(results)}
![cosine vs further training](cosine.png)

## Seed curves

Seeds split into groups of k; each group's gold vector; the cosine averaged over groups and test points at
each amount of further training, then the best amount:

{chr(10).join(seed_lines)}

![seed curves](seed_curves.png)
"""
    if "lds" in results:
        text += lds_section(results)
    if results.get("damping_sweep"):
        text += damping_section(results)
    (out / "report.md").write_text(text)


def damping_section(results: dict) -> str:
    """Best cosine over further training (and at the first / last point) per damping factor."""
    labels, unit = results["evals"]["labels"], results["evals"]["unit"]
    lines = [f"| method | damping factor | lambda | cosine at {unit} {labels[0]} | at {unit} {labels[-1]} | best |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, by_factor in results["damping_sweep"].items():
        for factor, entry in by_factor.items():
            if "error" in entry:
                lines.append(f"| {name} | {factor} | - | - | - | skipped: {entry['error'][:50]} |")
                continue
            cos = np.asarray(entry["cosine"])
            lam = entry.get("damping")
            lam_text = f"{lam:.3g}" if isinstance(lam, (int, float)) else "-"
            lines.append(f"| {name} | {factor} | {lam_text} | {cos[0]:.3f} | {cos[-1]:.3f} | {cos.max():.3f} |")
    return f"""
## Damping

Each damped method scored at a grid of damping factors (lambda = factor x lambda_0; auto: the smallest lambda
giving the damped curvature a condition number <= 1e4):

{chr(10).join(lines)}

![cosine vs damping](damping.png)
"""


def lds_section(results: dict) -> str:
    """The linear datamodeling score table (when evaluated with --metric lds)."""
    info, labels, unit = results["lds"], results["evals"]["labels"], results["evals"]["unit"]
    points = report_points(labels)
    lines = ["| method | " + " | ".join(f"{unit} {labels[i]}" for i in points) + " | best |",
             "|" + "---|" * (len(points) + 2)]  # fmt: skip
    for name, entry in results["methods"].items():
        if "lds" in entry:
            lds, err = np.asarray(entry["lds"]), np.asarray(entry["lds_stderr"])
            lines.append(f"| {name} | " + " | ".join(f"{lds[i]:.3f} ± {err[i]:.3f}" for i in points)
                         + f" | {lds.max():.3f} |")  # fmt: skip
    return f"""
## Linear datamodeling score

{info["subsets"]} random subsets of {info["fraction"]:.0%} of the training rows left out of further training
({info["coupling"]}, {info["seeds"]} seeds each, `{info["store"]}`); per test point, the Spearman correlation over
subsets between a method's summed scores and the actual change of the test loss, averaged over test points:

{chr(10).join(lines)}
"""


def write_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(results["evals"]["labels"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for number, (name, entry) in enumerate(results["methods"].items()):
        if "cosine" not in entry:
            continue
        cos, err = np.asarray(entry["cosine"]), np.asarray(entry["stderr"])
        style = "-" if number < 10 else "--"  # matplotlib's cycle has ten colours
        (line,) = ax.plot(labels, cos, style if name != "tracin_final" else ":", label=name, lw=1.6)
        ax.fill_between(labels, cos - err, cos + err, color=line.get_color(), alpha=0.18, lw=0)
    if results.get("gold_ceiling"):
        ax.plot(labels, results["gold_ceiling"], color="0.4", ls="-.", lw=1.2, label="ceiling (seed noise)")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel(f"further training ({results['evals']['unit']}s)")
    ax.set_ylabel("cosine similarity to gold standard")
    ax.set_title(f"{results['n_seeds']} seeds, {results['n_left_out']} left out, {results['n_test']} test points")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "cosine.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, entry in results["methods"].items():
        curve = entry.get("seed_curve")
        if not curve:
            continue
        ks = sorted(int(k) for k in curve)
        ax.errorbar(
            ks,
            [curve[str(k)]["cosine"] for k in ks],
            yerr=[curve[str(k)]["stderr"] for k in ks],
            marker="o",
            ms=3,
            lw=1.4,
            capsize=2,
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xlabel("seeds averaged")
    ax.set_ylabel("best cosine over further training")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "seed_curves.png", dpi=120)
    plt.close(fig)
    if results.get("damping_sweep"):
        damping_plot(results, out)


def damping_plot(results: dict, out: Path) -> None:
    """Cosine (and LDS) against the damping factor, one line per reported amount of further training."""
    import matplotlib.pyplot as plt

    sweep, labels, unit = results["damping_sweep"], results["evals"]["labels"], results["evals"]["unit"]
    points = report_points(labels)
    metrics = ["cosine"] + (["lds"] if any("lds" in e for m in sweep.values() for e in m.values()) else [])
    fig, axes = plt.subplots(len(metrics), len(sweep), figsize=(3.2 * len(sweep), 3 * len(metrics)), squeeze=False)
    for column, (name, by_factor) in enumerate(sweep.items()):
        numeric = sorted((float(f), e) for f, e in by_factor.items() if f != "auto" and "error" not in e)
        for row, metric in enumerate(metrics):
            ax = axes[row][column]
            for i in points:
                xs = [f for f, e in numeric if metric in e]
                (line,) = ax.plot(xs, [e[metric][i] for f, e in numeric if metric in e], marker="o", ms=3,
                                  label=f"{unit} {labels[i]}")  # fmt: skip
                auto = by_factor.get("auto", {})
                if metric in auto and auto.get("damping") is not None and numeric:
                    ax.axhline(auto[metric][i], color=line.get_color(), ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("damping factor (dotted: auto)", fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "damping.png", dpi=110)
    plt.close(fig)
