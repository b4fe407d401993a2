"""Getting a user's task to Ray workers, wherever they run, through the object store.

A task object from the Python API (tdastore.build(task=...) or model=/loss=/data=) is put in the object store
once and handed to every actor; a task.class of the user's ("my_module:MyTask") is handed over as the class,
which the actor builds from the config. The modules of the user's classes and functions (files that are not
installed packages) are pickled by value, so no worker needs them on its path. (A runtime_env's py_modules
could carry them too, but Ray uploads local modules only when a job starts, not for the actors of a session
that is already running, as in notebooks and tests.)
"""

from __future__ import annotations

import importlib
import sys
import sysconfig
from pathlib import Path

import ray

from tdastore.config import Config
from tdastore.tasks import task_class
from tdastore.tasks.base import Task

INSTALLED = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib", "stdlib")}


def is_user_module(module_name: str) -> bool:
    """Whether workers may lack the module: neither tdastore's nor an installed package's."""
    if module_name.split(".")[0] in ("tdastore", "torch", "numpy", "builtins"):
        return False
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        return module_name == "__main__"
    path = Path(origin).resolve()
    return not any(root in path.parents for root in INSTALLED)


def share_task(config: Config, task: Task | None = None):
    """An object-store reference the actors build their task from: the task object, else a user's task.class
    (None: the workers build the config's built-in task themselves)."""
    if task is None:
        cls = task_class(config.task, config.model)
        if not is_user_module(cls.__module__):
            return None
        ray.cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
        return ray.put(cls)
    for value in (task, *vars(task).values()):
        name = getattr(value, "__module__", None) or type(value).__module__
        if name and name in sys.modules and is_user_module(name):
            ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    return ray.put(task)
