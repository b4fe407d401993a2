"""Tasks: the model, per-example loss and data that everything downstream works on."""

from tdastore.tasks.base import Examples, Task, model_fingerprint
from tdastore.tasks.tabular import MLP, TabularTask, make_task

__all__ = ["Examples", "Task", "TabularTask", "MLP", "make_task", "model_fingerprint"]
