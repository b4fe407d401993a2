"""Token-level scores as a person reads them: each token coloured by its share of the score (HTML and PNG).

Red tokens raise the score (removing their document would raise the query's loss), blue ones lower it; the
colour's strength is the share over the largest absolute share of that side of that hit, so every hit reads on
its own scale.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pyarrow as pa

from tdastore.errors import ConfigError


def _hits(table: pa.Table):
    """[(test_id, rank, train_id, document_score, {side: (tokens, scores)})] in the table's order."""
    data = table.to_pydict()
    hits: dict = {}
    for i in range(table.num_rows):
        key = (data["test_id"][i], data["rank"][i])
        entry = hits.setdefault(key, {"train_id": data["train_id"][i], "score": data["document_score"][i], "sides": {}})
        tokens, scores = entry["sides"].setdefault(data["side"][i], ([], []))
        tokens.append(data["token"][i])
        scores.append(data["score"][i])
    return [(test_id, rank, e["train_id"], e["score"], e["sides"]) for (test_id, rank), e in hits.items()]


def _colour(share: float) -> tuple[float, float, float]:
    """share in [-1, 1] -> RGB: white at 0, red for positive, blue for negative."""
    strength = min(1.0, abs(share))
    return (1.0, 1 - 0.75 * strength, 1 - 0.75 * strength) if share >= 0 else (1 - 0.75 * strength,) * 2 + (1.0,)


def _shares(scores: list[float]) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    top = np.abs(values).max() if len(values) else 0.0
    return values / top if top > 0 else values


def render_html(table: pa.Table, path: str | Path) -> Path:
    """Write an HTML page: per hit, the query's target tokens and the training document's tokens, coloured."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>tdastore token scores</title>",
        "<style>body{font-family:sans-serif;max-width:60em}span.t{font-family:monospace;white-space:pre;"
        "border-radius:2px}h3{margin-bottom:.2em}</style>",
        "<p>Red tokens raise the score, blue ones lower it; hover a token for its share.</p>",
    ]
    for test_id, rank, train_id, score, sides in _hits(table):
        parts.append(f"<h3>test {test_id}, rank {rank}: training document {train_id} (score {score:.4g})</h3>")
        for side, label in (("test", "query target tokens"), ("train", "training document tokens")):
            if side not in sides:
                continue
            tokens, scores = sides[side]
            spans = []
            for token, value, share in zip(tokens, scores, _shares(scores)):
                r, g, b = (int(255 * c) for c in _colour(share))
                style = f"background:rgb({r},{g},{b})"
                spans.append(f"<span class='t' style='{style}' title='{value:.4g}'>{html.escape(token)}</span>")
            parts.append(f"<p><b>{label}</b> (sum {sum(scores):.4g}):<br>{''.join(spans)}</p>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path


def render_png(table: pa.Table, path: str | Path, width: int = 100) -> Path:
    """Write a PNG: the same colouring, tokens wrapped at `width` characters of a monospace font."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []  # (kind, payload): a heading or a row of (x, token, colour)
    for test_id, rank, train_id, score, sides in _hits(table):
        lines.append(("head", f"test {test_id}, rank {rank}: training document {train_id} (score {score:.4g})"))
        for side, label in (("test", "query"), ("train", "document")):
            if side not in sides:
                continue
            tokens, scores = sides[side]
            row, x = [], len(label) + 2
            lines.append(("row", [(0, label + ":", (1, 1, 1))]))
            for token, share in zip(tokens, _shares(scores)):
                text = token.replace("\n", "\\n")
                if x + len(text) > width and x > len(label) + 2:
                    lines[-1][1].extend(row)
                    row, x = [], len(label) + 2
                    lines.append(("row", []))
                row.append((x, text, _colour(share)))
                x += len(text)
            lines[-1][1].extend(row)
    height = 0.22 * len(lines) + 0.3
    figure = plt.figure(figsize=(width * 0.085, height))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_xlim(0, width)
    axis.set_ylim(len(lines), -0.5)
    axis.axis("off")
    for y, (kind, payload) in enumerate(lines):
        if kind == "head":
            axis.text(0, y, payload, fontsize=8, fontweight="bold", va="center")
            continue
        for x, text, colour in payload:
            axis.text(x, y, text, fontsize=8, family="monospace", va="center",
                      bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.5})  # fmt: skip
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_token_scores(tokens, out: str) -> None:
    """OUT.parquet, OUT.html or OUT.png by suffix; a path without one is a folder that gets all three."""
    import pyarrow.parquet as pq

    path = Path(out)
    writers = {".parquet": lambda p: pq.write_table(tokens, p), ".html": lambda p: render_html(tokens, p),
               ".png": lambda p: render_png(tokens, p)}  # fmt: skip
    if path.suffix in writers:
        path.parent.mkdir(parents=True, exist_ok=True)
        writers[path.suffix](path)
        return
    if path.suffix:
        raise ConfigError(f"--tokens {out}: write .parquet, .html or .png (or name a folder for all three)")
    path.mkdir(parents=True, exist_ok=True)
    for suffix, write in writers.items():
        write(path / f"tokens{suffix}")


def strongest_tokens(tokens, per_hit: int = 10) -> str:
    """The `per_hit` highest-scoring tokens of each hit's training document, as lines of text."""
    data = tokens.to_pydict()
    hits: dict = {}
    for i, side in enumerate(data["side"]):
        key = (data["test_id"][i], data["rank"][i], data["train_id"][i])
        if side == "train":
            hits.setdefault(key, []).append((data["score"][i], data["token"][i]))
    lines = []
    for (test_id, rank, train_id), found in hits.items():
        shown = ", ".join(f"{t!r} {s:.3g}" for s, t in sorted(found, key=lambda x: -x[0])[:per_hit])
        lines.append(f"test {test_id} rank {rank} (train {train_id}): {shown}")
    return "\n".join(lines)
