"""Synthetic tabular data for benchmarks and scale tests (written as Parquet, read back as a file task)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_synthetic_regression(path: Path, rows: int, features: int, seed: int = 0) -> Path:
    """Columns x0..x{features-1} ~ N(0, 1) and a non-linear target y with noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = np.sin(x[:, 0]) + x[:, 1 % features] * x[:, 2 % features] - x[:, 3 % features] + 0.1 * rng.normal(size=rows)
    pq.write_table(pa.table({**{f"x{i}": x[:, i] for i in range(features)}, "y": y}), path)
    return path
