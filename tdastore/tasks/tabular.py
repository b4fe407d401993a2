"""Built-in tabular tasks: an MLP on scikit-learn's bundled data sets or on a user's CSV/Parquet file."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tdastore.config import ModelConfig, TaskConfig
from tdastore.errors import ConfigError, DataError
from tdastore.tasks.base import Examples, Split, Task, check_finite_features, check_not_empty

BUNDLED = {
    "diabetes": ("load_diabetes", "regression"),
    "breast_cancer": ("load_breast_cancer", "classification"),
    "digits": ("load_digits", "classification"),
    "wine": ("load_wine", "classification"),
    "iris": ("load_iris", "classification"),
}


class MLP(nn.Sequential):
    """d -> hidden... -> out with ReLU, the architecture of PAPER.md's tabular experiments."""

    def __init__(self, n_inputs: int, hidden: list[int], n_outputs: int):
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, n_outputs))
        super().__init__(*layers)


class TabularTask(Task):
    """Regression (squared error) or classification (cross-entropy) with an MLP."""

    def __init__(self, task: TaskConfig, model: ModelConfig | None = None):
        self.task_config = task
        self.model_config = model or ModelConfig()
        if self.model_config.dtype != "float32":
            raise ConfigError(
                f"model.dtype {self.model_config.dtype} applies to Hugging Face models; the tabular MLP trains and "
                "is attributed in float32 (leave model.dtype unset)"
            )
        self.name = Path(task.dataset).stem if _is_file(task.dataset) else task.dataset
        raw = _load_table(task)
        self.kind = raw.kind
        self.columns = raw.columns
        self.n_classes = raw.n_classes
        self.classes = raw.classes
        self._splits, self._scaling = _split_and_standardise(raw, task)

    @property
    def n_features(self) -> int:
        return len(self.columns)

    @property
    def n_outputs(self) -> int:
        return 1 if self.kind == "regression" else self.n_classes

    def describe_inputs(self) -> dict:
        classes = [c.item() if isinstance(c, np.generic) else c for c in self.classes]
        target = self.task_config.target or "target"
        return {"kind": self.kind, "features": list(self.columns), "target": target, "classes": classes}

    def encode_request(self, inputs: list, targets: list | None) -> Examples:
        """Rows of feature values (in the order of `columns`) and their targets."""
        import pyarrow as pa

        rows = np.asarray(inputs, dtype=np.float64)  # [m, features]
        columns = {name: rows[:, i] for i, name in enumerate(self.columns)}
        columns[self.task_config.target or "target"] = np.asarray(targets)
        return self.encode(pa.table(columns))

    def check_examples(self, examples: Examples) -> None:
        if tuple(examples.inputs.shape[1:]) != (self.n_features,):
            raise DataError(
                f"test inputs have {tuple(examples.inputs.shape[1:])} features per row, the task has {self.n_features}"
            )

    def make_model(self) -> nn.Module:
        torch.manual_seed(self.model_config.seed)
        return MLP(self.n_features, self.model_config.hidden, self.n_outputs)

    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            return (outputs.squeeze(-1) - targets) ** 2  # [B]
        return F.cross_entropy(outputs, targets, reduction="none")  # [B]

    def examples(self, split: Split) -> Examples:
        if split not in self._splits:
            raise DataError(f"unknown split '{split}': use 'train' or 'test'")
        return self._splits[split]

    def encode(self, table) -> Examples:
        """New inputs (a pyarrow Table or a .csv/.parquet path with the task's feature columns and its target
        column) standardised with the training statistics, e.g. test points for a query."""
        import pyarrow as pa

        if not isinstance(table, pa.Table):
            table = _read_any(Path(table))
        target = self.task_config.target or "target"
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"test inputs lack {len(missing)} of the task's {self.n_features} feature columns "
                f"(first: {missing[:3]}); the task's features are {self.columns}"
            )
        if target not in table.column_names:
            raise DataError(f"test inputs need the target column '{target}' (the test function is the loss)")
        check_not_empty(table.num_rows, "the test inputs")
        text = [c for c in self.columns if not pa_is_numeric(table.column(c).type)]
        if text:
            raise DataError(f"test input column '{text[0]}' is {table.column(text[0]).type}, not numeric")
        x = np.stack(
            [np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in self.columns], 1
        )
        check_finite_features(x, self.columns, "test inputs")
        y_raw = table.column(target).to_numpy(zero_copy_only=False)
        if self.kind == "classification":
            position = np.searchsorted(self.classes, y_raw)
            unknown = (position >= len(self.classes)) | (
                self.classes[np.minimum(position, len(self.classes) - 1)] != y_raw
            )
            if unknown.any():
                raise DataError(
                    f"test inputs hold label(s) {sorted(set(y_raw[unknown].tolist()))[:5]} unseen in training"
                )
            targets, labels = torch.tensor(position, dtype=torch.int64), position
        else:
            labels = np.asarray(y_raw, dtype=np.float64)
            targets = torch.tensor((labels - self._scaling[2]) / self._scaling[3], dtype=torch.float32)
        inputs = torch.tensor((x - self._scaling[0]) / self._scaling[1], dtype=torch.float32)
        id_column = self.task_config.id_column or "id"
        if id_column in table.column_names:
            ids = read_ids(table, id_column, "the test inputs")
        else:
            ids = np.arange(table.num_rows, dtype=np.int64)
        return Examples(inputs, targets, ids, labels)

    def description(self) -> dict:
        cfg = self.task_config
        return {
            "name": self.name,
            "dataset": cfg.dataset,
            "kind": self.kind,
            "target": cfg.target,
            "features": list(self.columns),
            "test_fraction": cfg.test_fraction,
            "split_seed": cfg.split_seed,
            "standardize_target": cfg.standardize_target,
            "hidden": list(self.model_config.hidden),
        }


class _RawTable:
    def __init__(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, columns: list[str], kind: str, classes: np.ndarray
    ):
        self.x, self.y, self.ids, self.columns, self.kind, self.classes = x, y, ids, columns, kind, classes
        self.n_classes = len(classes)


def _is_file(dataset: str) -> bool:
    return dataset.endswith((".csv", ".parquet", ".pq")) or "/" in dataset


@functools.lru_cache(maxsize=8)
def _load_bundled(name: str):
    from sklearn import datasets

    return getattr(datasets, BUNDLED[name][0])()


def _load_table(cfg: TaskConfig) -> _RawTable:
    if cfg.dataset in BUNDLED:
        bunch = _load_bundled(cfg.dataset)
        kind = cfg.kind or BUNDLED[cfg.dataset][1]
        x = np.asarray(bunch.data, dtype=np.float64)
        columns = [str(c) for c in getattr(bunch, "feature_names", [f"x{i}" for i in range(x.shape[1])])]
        y_raw = np.asarray(bunch.target)
        ids = np.arange(len(x), dtype=np.int64)
    elif _is_file(cfg.dataset):
        x, y_raw, ids, columns = _read_file(cfg)
        kind = cfg.kind
        if kind is None:
            raise DataError(
                f"task.kind is required for a file data set ('{cfg.dataset}'): set it to regression or classification"
            )
    else:
        raise DataError(
            f"unknown data set '{cfg.dataset}': use one of {sorted(BUNDLED)} or a path to a .csv/.parquet file"
        )
    check_not_empty(len(x), f"data set '{cfg.dataset}'")
    check_finite_features(x, columns, f"data set '{cfg.dataset}'")
    if kind == "classification":
        classes, y = np.unique(y_raw, return_inverse=True)
        if len(classes) < 2:
            raise DataError(f"data set '{cfg.dataset}' has a single class: classification needs at least two")
    else:
        y = np.asarray(y_raw, dtype=np.float64)
        if not np.isfinite(y).all():
            raise DataError(f"data set '{cfg.dataset}': the regression target holds NaN/Inf; drop those rows")
        classes = np.array([])
    return _RawTable(x, y, ids, columns, kind, classes)


def _read_any(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.is_dir():
        raise DataError(f"'{path}' is a directory: point at a .csv or .parquet file")
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    if path.suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"'{path}' is neither .csv nor .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"data file '{path}' is empty (0 bytes): point at a file with a header and rows")
    try:
        table = pacsv.read_csv(path) if path.suffix == ".csv" else pq.read_table(path)
    except pa.ArrowException as err:  # malformed CSV or Parquet
        raise DataError(f"'{path}' cannot be read as {path.suffix[1:]} ({err}): fix or re-export the file") from err
    twice = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if twice:
        raise DataError(f"'{path}' has column(s) {twice} more than once: rename or drop the copies")
    return table


def _read_file(cfg: TaskConfig):
    import pyarrow.compute as pc

    path = Path(cfg.dataset)
    table = _read_any(path)
    if cfg.target is None or cfg.target not in table.column_names:
        raise DataError(
            f"task.target must name a column of '{path}' (columns: {table.column_names}), got {cfg.target!r}"
        )
    excluded = {cfg.target, cfg.id_column}
    columns = cfg.features or [c for c in table.column_names if c not in excluded]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"task.features names column(s) {missing} that '{path}' does not have")
    arrays = []
    for name in columns:
        col = table.column(name)
        if not pa_is_numeric(col.type):
            raise DataError(f"feature column '{name}' of '{path}' is {col.type}, not numeric: encode it or drop it")
        arrays.append(pc.cast(col, "float64").to_numpy(zero_copy_only=False))
    x = np.stack(arrays, axis=1) if arrays else np.zeros((table.num_rows, 0))
    if x.shape[1] == 0 and table.num_rows > 0:
        raise DataError(f"'{path}' has no feature columns besides the target")
    y = table.column(cfg.target).to_numpy(zero_copy_only=False)
    if cfg.kind == "classification" and table.column(cfg.target).null_count + int(
        np.sum([v is None or (isinstance(v, str) and not v.strip()) for v in y])
    ):
        raise DataError(f"the label column '{cfg.target}' of '{path}' has empty values: label every row or drop it")
    ids = read_ids(table, cfg.id_column, str(path)) if cfg.id_column else np.arange(table.num_rows, dtype=np.int64)
    return x, y, ids, columns


def read_ids(table, column: str, where: str) -> np.ndarray:
    """Example ids: integers, one per row, unique (a store row is found by its id)."""
    if column not in table.column_names:
        raise DataError(f"task.id_column '{column}' is not a column of '{where}' (columns: {table.column_names})")
    values = table.column(column)
    if not pa_is_numeric(values.type) or values.null_count:
        raise DataError(f"the id column '{column}' of '{where}' must hold integers for every row, it is {values.type}")
    ids = values.to_numpy(zero_copy_only=False)
    if not np.all(np.equal(np.mod(ids, 1), 0)):
        raise DataError(f"the id column '{column}' of '{where}' holds non-integer values")
    ids = ids.astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise DataError(
            f"the id column '{column}' of '{where}' repeats ids (e.g. {int(unique[counts > 1][0])} appears "
            f"{int(counts.max())} times): ids must be unique"
        )
    return ids


def pa_is_numeric(arrow_type) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(arrow_type) or pat.is_floating(arrow_type) or pat.is_boolean(arrow_type)


def _split_and_standardise(raw: _RawTable, cfg: TaskConfig) -> tuple[dict[str, Examples], tuple]:
    """A deterministic split (seeded, stratified for classification) and z-scores from the train split."""
    from sklearn.model_selection import train_test_split

    order = np.arange(len(raw.x))
    stratify = raw.y if raw.kind == "classification" else None
    if len(order) < 2:
        raise DataError(f"data set '{cfg.dataset}' has {len(order)} row(s): a train/test split needs at least two")
    train_idx, test_idx = train_test_split(
        order, test_size=cfg.test_fraction, random_state=cfg.split_seed, stratify=stratify
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    mean = raw.x[train_idx].mean(axis=0)
    std = raw.x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = (raw.x - mean) / std
    if raw.kind == "regression":
        y_mean, y_std = (
            (raw.y[train_idx].mean(), raw.y[train_idx].std() or 1.0) if cfg.standardize_target else (0.0, 1.0)
        )
        targets = torch.tensor((raw.y - y_mean) / y_std, dtype=torch.float32)
    else:
        y_mean, y_std = 0.0, 1.0
        targets = torch.tensor(raw.y, dtype=torch.int64)
    inputs = torch.tensor(x, dtype=torch.float32)
    splits = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        splits[split] = Examples(
            inputs[idx].contiguous(), targets[idx].contiguous(), raw.ids[idx], np.asarray(raw.y)[idx]
        )
    return splits, (mean, std, y_mean, y_std)
