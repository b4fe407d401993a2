"""Tasks: the model, per-example loss and data that everything downstream works on.

`make_task` finds the task a config names: the built-in text task for Hugging Face models
(task.kind causal_lm / sequence_classification, or model.name_or_path), else the tabular MLP task.
"""

from tdastore.config import ModelConfig, TaskConfig
from tdastore.tasks.base import Examples, Task, model_fingerprint
from tdastore.tasks.tabular import MLP, TabularTask

TEXT_KINDS = ("causal_lm", "sequence_classification")


def make_task(task: TaskConfig, model: ModelConfig | None = None) -> Task:
    """The task a config names (see the module docstring)."""
    if task.kind in TEXT_KINDS or (model is not None and model.name_or_path):
        from tdastore.tasks.text import TextTask  # transformers is imported only for text tasks

        return TextTask(task, model or ModelConfig())
    return TabularTask(task, model)


__all__ = ["Examples", "Task", "TabularTask", "MLP", "make_task", "model_fingerprint"]
