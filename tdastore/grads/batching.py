"""How a shard's examples are cut into batches: a fixed count in order, or, for token sequences, a token budget
(as bergson's token_batch_size): documents sorted by length and packed so that a batch's padded size
(count x longest) stays within `max_tokens`. Rows always land at their examples' positions."""

from __future__ import annotations

import numpy as np


def plan_batches(n: int, batch_size: int, lengths: np.ndarray | None = None, max_tokens: int | None = None):
    """Index arrays into [0, n): contiguous batches of `batch_size`, or with `max_tokens` and per-example
    `lengths` [n], length-sorted batches of at most max_tokens padded tokens (a longer document alone)."""
    if max_tokens is None or lengths is None:
        return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    batches, current = [], []
    for index in np.argsort(lengths, kind="stable"):  # ascending: the newest document is the longest
        if current and int(lengths[index]) * (len(current) + 1) > max_tokens:
            batches.append(np.asarray(current))
            current = []
        current.append(int(index))
    if current:
        batches.append(np.asarray(current))
    return batches


def padded_tokens(batches: list[np.ndarray], lengths: np.ndarray) -> int:
    """Tokens the batches hold, padding included (each batch is as wide as its longest document)."""
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
