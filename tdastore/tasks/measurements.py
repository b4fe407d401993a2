"""What a query measures: the function g(outputs, targets) -> [B] whose sensitivity to each training row is
attributed, chosen at query time (`attribution.measurement`, flag `--measurement`) without rebuilding the store:
the training rows do not depend on it, only the test side does.

- `loss`: the task's test function (a causal LM's mean next-token loss over its target tokens);
- `completion`: the same loss over the completion only (the prompt's tokens masked: prompt/completion pairs,
  chat messages, or a store with task.prompt_column);
- `logprob`: the negative log-probability of the targets, summed over the target tokens (a loss: top-k rows are
  the ones whose removal lowers the completion's probability the most);
- `margin`: the negative log-odds of the targets, sum of logsumexp_{c != y} z_c - z_y over target tokens (TRAK's
  classification measurement, as a loss);
- `module:function`: a function of yours, f(outputs, targets) -> [B], imported by name.

Scores keep one meaning throughout: a positive score says removing the row raises the measurement.
"""

from __future__ import annotations

import importlib

import torch

from tdastore.errors import ConfigError
from tdastore.tasks.base import Task
from tdastore.tasks.text import IGNORE

BUILT_IN = ("loss", "completion", "logprob", "margin")


def measurement_function(task: Task, name: str):
    """The measurement `name` of `task` as a per-example function (outputs, targets) -> [B]."""
    if name in ("loss", "completion"):
        return task.test_function
    if name == "logprob":
        return target_nll_sum
    if name == "margin":
        return negative_margin
    if ":" in name:
        module, _, attribute = name.partition(":")
        try:
            function = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"measurement '{name}' cannot be imported ({err}): give module:function") from None
        if not callable(function):
            raise ConfigError(f"measurement '{name}' is not a function of (outputs, targets) -> [B]")
        return function
    raise ConfigError(f"unknown measurement '{name}': use one of {list(BUILT_IN)} or module:function")


def sums_over_tokens(task: Task, name: str) -> bool | None:
    """Whether the measurement is a sum over target tokens (True), their mean (False), or neither (None: a
    function of yours), which token-level shares need to know."""
    if name in ("logprob", "margin"):
        return True
    if name in ("loss", "completion"):
        return getattr(getattr(task, "task_config", None), "loss_reduction", "mean") == "sum"
    return None


def _per_target(outputs: torch.Tensor, targets: torch.Tensor, value) -> torch.Tensor:
    """sum over counted targets of value(logits [..., V], target ids [...]): a causal LM's next tokens (position t
    predicts t + 1, IGNORE left out) or a classifier's label. Written without data-dependent shapes (vmap)."""
    outputs = outputs if outputs.dtype == torch.float64 else outputs.float()
    if outputs.dim() == 3 and targets.dim() == 2:  # [B, L, V], [B, L]
        logits, labels = outputs[:, :-1], targets[:, 1:]
        counted = labels != IGNORE
        return (value(logits, labels.clamp(min=0)) * counted).sum(1)  # [B]
    if outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point():  # [B, C], [B]
        return value(outputs, targets)
    raise ConfigError(
        "logprob and margin measure classifiers and language models (class or token targets), not regression: "
        "use measurement loss or a module:function of yours"
    )


def target_nll_sum(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(targets), summed over the target tokens: [B]."""

    def nll(logits, labels):
        return logits.logsumexp(-1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    return _per_target(outputs, targets, nll)


def negative_margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log(p / (1 - p)) of the targets, summed over the target tokens: [B]."""

    def margin(logits, labels):
        chosen = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
        others = torch.where(chosen, torch.full_like(logits, float("-inf")), logits).logsumexp(-1)
        return others - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    return _per_target(outputs, targets, margin)
