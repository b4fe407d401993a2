"""Tasks: the model, per-example loss and data that everything downstream works on.

`make_task` finds the task a config names: task.class ("my_module:MyTask", or a name registered in TASKS), else
the built-in text task for Hugging Face models (task.kind causal_lm / sequence_classification, or
model.name_or_path), else the tabular MLP task. A class named by task.class is built as Class(task, model) from
the config's two sections.
"""

from __future__ import annotations

import importlib

from tdastore.config import ModelConfig, TaskConfig
from tdastore.errors import ConfigError
from tdastore.tasks.base import Examples, Task, model_fingerprint
from tdastore.tasks.objects import ModelTask
from tdastore.tasks.tabular import MLP, TabularTask

TEXT_KINDS = ("causal_lm", "sequence_classification")
TASKS: dict[str, str] = {  # registered names -> "module:Class"
    "tabular": "tdastore.tasks.tabular:TabularTask",
    "text": "tdastore.tasks.text:TextTask",
}


def register_task(name: str, path: str) -> None:
    """Make `task.class: name` build the class at "module:Class"."""
    TASKS[name] = path


def task_class(task: TaskConfig, model: ModelConfig | None = None) -> type[Task]:
    """The Task class a config names (module:Class or a registered name), or the built-in one it implies."""
    if task.cls is None:
        text = task.kind in TEXT_KINDS or (model is not None and model.name_or_path)
        return import_class(TASKS["text" if text else "tabular"])
    return import_class(TASKS.get(task.cls, task.cls))


def import_class(path: str) -> type[Task]:
    """The Task subclass at "module:Class", or a clear error naming what is wrong and the fix."""
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise ConfigError(
            f"task.class '{path}' must be 'module:Class' (an importable module and a Task subclass in it) or one of "
            f"the registered names {sorted(TASKS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"task.class '{path}': module '{module_name}' cannot be imported ({err}); "
            "put it on PYTHONPATH or install it"
        ) from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task.class '{path}': '{class_name}' in {module_name} is not a tdastore.tasks.Task subclass")
    return cls


def make_task(task: TaskConfig, model: ModelConfig | None = None) -> Task:
    """The task a config names (see the module docstring)."""
    return task_class(task, model)(task, model or ModelConfig())


def resolve_task(task: TaskConfig, model: ModelConfig | None = None, given: Task | type | None = None) -> Task:
    """A task object handed over (Python API), else one built from the config, by a class handed over (a user's
    task.class shipped to a worker) or the class the config names."""
    if isinstance(given, Task):
        return given
    return (given or task_class(task, model))(task, model or ModelConfig())


__all__ = [
    "Examples",
    "Task",
    "TabularTask",
    "ModelTask",
    "MLP",
    "TASKS",
    "make_task",
    "model_fingerprint",
    "register_task",
    "resolve_task",
    "task_class",
]
