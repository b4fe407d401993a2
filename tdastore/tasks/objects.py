"""A task made from Python objects (the notebook route): a model whose current weights are the final model, a
per-example loss, and data as a torch Dataset, a `datasets.Dataset`, a Ray Dataset, (inputs, targets) tensors
or Examples. `tdastore.build(model=..., loss=..., data=...)` makes one; a Task subclass of your own is the other
route (task.class in the config)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tdastore.errors import DataError
from tdastore.tasks.base import Examples, Split, Task, check_not_empty

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # outputs [B, ...], targets [B, ...] -> [B]


class ModelTask(Task):
    """Wraps a model, its per-example loss and its train / test data; the weights are taken as they are."""

    pretrained = True

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        train=None,
        test=None,
        *,
        test_function: LossFn | None = None,
        name: str = "model_task",
        columns: tuple[str, str] = ("input", "target"),
    ):
        if not isinstance(model, nn.Module) or not callable(loss):
            raise DataError(
                f"model= must be a torch nn.Module (got {type(model).__name__}) and loss= a per-example loss "
                "(outputs, targets) -> [B]"
            )
        self.model, self.loss, self.name, self.columns = model, loss, name, columns
        self._test_function = test_function
        test = train if test is None else test  # scoring the training data against itself, as the build does
        handed = {"train": train, "test": test}
        self._splits = {split: to_examples(data, columns, split) for split, data in handed.items() if data is not None}

    def make_model(self) -> nn.Module:
        return copy.deepcopy(self.model).eval()

    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs, targets)

    def test_function(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self._test_function or self.loss)(outputs, targets)

    def examples(self, split: Split) -> Examples:
        if split not in ("train", "test"):
            raise DataError(f"unknown split '{split}': use 'train' or 'test'")
        if split not in self._splits:
            raise DataError(
                f"no {split} data was handed over: pass data= (the training data, which operators such as K-FAC "
                f"and the exact path's curvature read) or test inputs to the query itself"
            )
        return self._splits[split]

    def encode(self, inputs) -> Examples:
        """Test points handed to a query: (inputs, targets) tensors or arrays, a list of (input, target) pairs,
        a torch Dataset, a datasets.Dataset or a Ray Dataset."""
        if isinstance(inputs, torch.Tensor | np.ndarray):
            raise DataError(
                f"test inputs of shape {tuple(inputs.shape)} came without targets: the loss needs them, so pass "
                "(inputs, targets)"
            )
        return to_examples(inputs, self.columns, "query")

    def description(self) -> dict:
        return {"name": self.name, "kind": "objects", "model": type(self.model).__name__}


def to_examples(data, columns: tuple[str, str] = ("input", "target"), where: str = "data") -> Examples:
    """Examples from a torch Dataset of (input, target) items, a datasets.Dataset or Ray Dataset with the two
    `columns`, a pair of tensors, or Examples; ids are row numbers."""
    if data is None:
        raise DataError(f"no {where} data: pass {where}= (a torch Dataset, a datasets.Dataset, a Ray Dataset)")
    if isinstance(data, Examples):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        inputs, targets = (torch.as_tensor(np.asarray(d)) for d in data)
    elif _is_table(data):
        rows = data.take_all() if hasattr(data, "take_all") else data.to_list()  # Ray / Hugging Face datasets
        missing = [c for c in columns if rows and c not in rows[0]]
        if missing:
            raise DataError(f"the {where} data has no column(s) {missing}: pass columns=(input, target) names")
        inputs, targets = (torch.as_tensor(np.asarray([r[c] for r in rows])) for c in columns)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):  # a torch map-style Dataset
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(item, tuple | list) and len(item) == 2 for item in items):
            raise DataError(f"each item of the {where} data must be an (input, target) pair")
        inputs = torch.stack([torch.as_tensor(np.asarray(x)) for x, _ in items]) if items else torch.empty(0)
        targets = torch.as_tensor(np.asarray([np.asarray(y) for _, y in items]))
    else:
        raise DataError(
            f"the {where} data is a {type(data).__name__}: pass a torch Dataset, a datasets.Dataset, a Ray Dataset, "
            "(inputs, targets) tensors or Examples"
        )
    check_not_empty(len(inputs), f"the {where} data")
    if inputs.is_floating_point():
        inputs = inputs.float()
    if targets.is_floating_point():
        targets = targets.float()
    ids = np.arange(len(inputs), dtype=np.int64)
    return Examples(inputs.contiguous(), targets.contiguous(), ids, targets.numpy())


def _is_table(data) -> bool:
    module = type(data).__module__
    return module.startswith("datasets.") or module.startswith("ray.data")
