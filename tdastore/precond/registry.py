"""Operators as registered classes: one class per operator and path, found by name from a method's row.

A method row (tdastore/methods.py) names an operator for each path; `operator_class(path, name)` finds the
class that implements it. A class declares the attribution settings it depends on (`settings`: field names of
AttributionConfig, the cache key of a fitted operator) and implements its path's contract:

    projected   fit(FitInputs) -> SpectralOperator, fitted from the store's rows (and the model, for Kronecker
                factors); applied as transform (K^1/2, for FAISS) and solve (K)
    exact       apply(scorer, vectors [m, p]) -> K vectors [m, p], on the model in full parameter space

Adding a method is one class (if its operator is new) and one row. The built-in classes register when
tdastore.precond is imported (its __init__ imports their modules).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from tdastore.config import AttributionConfig, Config
from tdastore.errors import ConfigError

PATHS = ("projected", "exact")


@dataclass
class FitInputs:
    """Everything a projected operator may be fitted from, passed explicitly (never read from a query)."""

    store: Any  # a GradientStore
    config: Config  # the store's config with the query's attribution settings
    model: nn.Module | None = None  # the final model (Kronecker operators need its activations)
    task: Any = None  # its Task
    progress: bool = False
    # map_blocks(fn) -> [fn(rows [b, k]) for each store block, in order]: passes over the store's rows, e.g. as
    # Ray tasks (tdastore.distributed.blocks); None: in this process
    map_blocks: Callable[[Callable], list] | None = None

    def over_blocks(self, fn: Callable) -> list:
        if self.map_blocks is not None:
            return self.map_blocks(fn)
        return [fn(block) for _, block in self.store.iter_blocks()]


class Operator:
    """Base of every operator class: a registered name and the settings that key a fitted instance."""

    name: ClassVar[str]
    path: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()  # AttributionConfig fields the result depends on
    dense: ClassVar[bool] = True  # needs a k x k matrix (refused above attribution.max_dense_dim)

    @classmethod
    def params(cls, config: AttributionConfig) -> dict:
        """The settings this operator depends on, by name (its cache key in the store)."""
        return {field: getattr(config, field) for field in cls.settings}

    @classmethod
    def key(cls, config: AttributionConfig) -> str:
        params = json.dumps(cls.params(config), sort_keys=True)
        return f"{cls.name}-{hashlib.sha256(params.encode()).hexdigest()[:8]}"


_REGISTRY: dict[tuple[str, str], type[Operator]] = {}


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: make `cls` the operator `cls.name` on `cls.path`."""
    if cls.path not in PATHS:
        raise ValueError(f"operator {cls.__name__}: path must be one of {PATHS}")
    if (cls.path, cls.name) in _REGISTRY:
        raise ValueError(f"operator '{cls.name}' is registered twice on the {cls.path} path")
    _REGISTRY[(cls.path, cls.name)] = cls
    return cls


def operator_class(path: str, name: str) -> type[Operator]:
    if (path, name) not in _REGISTRY:
        known = sorted(n for p, n in _REGISTRY if p == path)
        raise ConfigError(f"no {path} operator '{name}': registered ones are {known}")
    return _REGISTRY[(path, name)]


def registered(path: str) -> list[str]:
    return sorted(n for p, n in _REGISTRY if p == path)
