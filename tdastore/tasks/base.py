"""The contract a user implements: a model, a per-example loss, and the data.

Everything downstream (gradients, store, queries, ground truth) only talks to a Task, so a new problem
is one small class, not a fork of the pipeline.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from tdastore.errors import DataError

Split = Literal["train", "test"]


@dataclass
class Examples:
    """One split of a data set, as tensors ready for the model."""

    inputs: torch.Tensor  # [N, ...] float32
    targets: torch.Tensor  # [N] (float32 regression / int64 classification)
    ids: np.ndarray  # [N] int64 example ids (row r of the store holds ids[r])
    labels: np.ndarray  # [N] the label in the user's units (written to the store's metadata)
    texts: np.ndarray | None = None  # [N] str: the document of each row (text tasks; stored in the metadata)
    padded: bool = False  # inputs [N, 2, L] (token ids, attention mask) right-padded: slices drop all-pad columns

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def slice(self, start: int, stop: int) -> Examples:
        return self.take(slice(start, stop))

    def take(self, rows) -> Examples:
        """Rows by slice or index tensor; padded token batches keep only the columns some row uses, so a
        batch costs its longest member, not the data set's."""
        inputs, targets = self.inputs[rows], self.targets[rows]
        if self.padded and len(inputs):
            width = max(1, int(inputs[:, 1].sum(1).max()))
            inputs = inputs[..., :width]
            targets = targets[..., :width] if targets.dim() == 2 else targets
        texts = None if self.texts is None else self.texts[np.asarray(rows) if not isinstance(rows, slice) else rows]
        index = rows if isinstance(rows, slice) else np.asarray(rows)
        return Examples(inputs, targets, self.ids[index], self.labels[index], texts, self.padded)

    def to(self, device: torch.device | str) -> Examples:
        """The same rows with their tensors on `device` (ids, labels and texts stay on the host)."""
        return Examples(self.inputs.to(device), self.targets.to(device), self.ids, self.labels, self.texts, self.padded)


class Task(abc.ABC):
    """Implement `make_model`, `per_example_loss` and `examples`; `test_function` defaults to the loss."""

    name: str = "task"

    @abc.abstractmethod
    def make_model(self) -> nn.Module:
        """A freshly initialised model (weights are loaded on top of it)."""

    @abc.abstractmethod
    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """outputs [B, ...], targets [B, ...] -> losses [B]."""

    def test_function(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The function g whose sensitivity is attributed (PAPER.md: the per-example test loss)."""
        return self.per_example_loss(outputs, targets)

    @abc.abstractmethod
    def examples(self, split: Split) -> Examples:
        """The training or test split."""

    # -- optional members, with the defaults a plain tensor task needs --------------------------------
    pretrained: bool = False  # the model's weights come with make_model (no train.output_dir weights)

    def encode(self, inputs) -> Examples:
        """New test inputs in the user's format (a file path, a table, texts) as Examples."""
        raise DataError(
            f"task '{self.name}' does not parse raw inputs ({type(inputs).__name__}): pass its own Examples, "
            "or implement Task.encode"
        )

    def describe_inputs(self) -> dict:
        """What a raw test input of this task looks like (the query service publishes and validates it):
        {"kind", and "features"/"target"/"classes" for tables, "text": True for documents}."""
        return {"kind": self.name}

    def encode_request(self, inputs: list, targets: list | None) -> Examples:
        """Test inputs as sent to the query service (rows of values, or texts) with their targets."""
        raise DataError(f"task '{self.name}' does not answer raw requests: implement Task.encode_request")

    def is_examples(self, inputs) -> bool:
        """Whether `inputs` are already this task's examples (not something to encode)."""
        return isinstance(inputs, Examples)

    def check_examples(self, examples: Examples) -> None:
        """Refuse examples that cannot be this task's (e.g. a wrong feature count), naming the problem."""
        return None

    def token_mask(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """[B, T] 1 for positions whose activations count in K-FAC statistics; None: every position counts."""
        return None

    def description(self) -> dict:
        """What identifies this task in a store's manifest (overridden by built-in tasks)."""
        return {"name": self.name}

    def fingerprint(self) -> str:
        """A hash of the task description and of both splits' data: a store built on other data is refused."""
        digest = hashlib.sha256(repr(sorted(self.description().items())).encode())
        for split in ("train", "test"):
            data = self.examples(split)
            digest.update(np.ascontiguousarray(data.inputs.numpy()).tobytes())
            digest.update(np.ascontiguousarray(data.targets.numpy()).tobytes())
            digest.update(np.ascontiguousarray(data.ids).tobytes())
        return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every weight, so a store cannot be extended or queried with a different model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_finite_features(inputs: np.ndarray, columns: list[str], where: str) -> None:
    """NaN/Inf in features poisons every gradient: refuse them, naming a column and a row."""
    bad = ~np.isfinite(inputs)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise DataError(
            f"{where}: {int(bad.sum())} NaN/Inf value(s) in the features, first at row {int(rows[0])}, "
            f"column '{columns[int(cols[0])]}'; clean or impute them before building"
        )


def check_not_empty(n_rows: int, where: str) -> None:
    if n_rows == 0:
        raise DataError(f"{where} has no rows: point task.dataset at a non-empty data set")
