"""tdastore: training data attribution at scale.

Python API (notebooks):
    config = tdastore.load_config("configs/diabetes.yaml")
    tdastore.train(config)
    store = tdastore.build(config, "runs/diabetes/store")
    store = tdastore.build(config, "runs/mine", task=MyTask())   # or model=net, loss=per_example_loss, data=dataset
    store.attributor("grad_dot").top_k((X_new, y_new), k=5)     # a built store queries with the same objects
    store = tdastore.open_store("runs/diabetes/store"); store.grads, store.meta, store.manifest
    attributor = tdastore.Attributor(store, "if_gn")           # task, model, fitted operator (and index) held once
    top = attributor.top_k(split="test", k=10)                 # a pyarrow Table: test_id, rank, train_id, score
    opponents = attributor.bottom_k(split="test", k=10)        # the most negative scores
    for first_row, block in attributor.scores(split="test"): ...   # full score rows [m, b], streamed
    tdastore.query(store, "if_gn", split="test", top_k=10)     # the same top-k in one call
    from tdastore.evaluate.run import evaluate                 # methods vs the further-training gold standard
"""

from tdastore.attribution import Attributor
from tdastore.config import Config, load_config
from tdastore.devices import reproducible_cpu_products
from tdastore.store.gradient_store import GradientStore, open_store
from tdastore.tasks import ModelTask, Task
from tdastore.tasks.objects import to_examples
from tdastore.training import train
from tdastore.version import __version__

reproducible_cpu_products()  # before any product runs in this process: bitwise-equal rows at any thread count


def build(
    config: Config | None = None,
    output=None,
    split: str = "train",
    address=None,
    workers=None,
    progress: bool = True,
    *,
    task: Task | None = None,
    model=None,
    loss=None,
    data=None,
    test_data=None,
    append: bool = False,
    keep_operators: bool = False,
) -> GradientStore:
    """Build (or resume) the gradient store of `split` at `output` (default store.path) with Ray actors.

    Bring your own model and data either as a Task (task=MyTask(...), or task.class in the config) or as
    objects: model= an nn.Module whose current weights are final, loss= a per-example loss (outputs, targets)
    -> [B], data= / test_data= a torch Dataset, a datasets.Dataset, a Ray Dataset or (inputs, targets).

    append=True grows an existing store by new rows of the same spec instead: config.task.dataset encoded by the
    store's own task, or the objects' data= (row-number ids continue the store's); fitted operators are refit on
    next use unless keep_operators=True (see tdastore.distributed.build.append_rows)."""
    from tdastore.distributed.build import build_store
    from tdastore.errors import ConfigError

    config = config if config is not None else load_config()
    if model is not None:
        if task is not None or loss is None:
            raise ConfigError("pass either task= or model= with loss= (and data=), not both")
        task = ModelTask(model, loss, data, test_data if test_data is not None else data)
    output = output if output is not None else config.store.path
    if output is None:
        raise ConfigError("say where the store goes: output=, or store.path in the config")
    store = build_store(
        config,
        output,
        split=split,
        address=address,
        workers=workers,
        progress=progress,
        task=task,
        append=append,
        keep_operators=keep_operators,
    )
    store.task = task  # store.attributor(method) and Attributor(store, ...) score with the same objects
    return store


def query(
    store,
    method: str = "grad_dot",
    *,
    split: str | None = None,
    inputs=None,
    top_k: int = 10,
    kind: str | None = None,
    out=None,
    scores_out=None,
    overrides=None,
    progress: bool = False,
    workers: int = 0,
):
    """Top-k training rows per test input as a table (test_id, rank, train_id, score, train_row); see
    `Attributor` for the arguments. inputs None: the task's `split` (default test)."""
    attributor = Attributor(store, method, overrides, kind=kind, progress=progress, workers=workers)
    return attributor.top_k(inputs, top_k, split=split, out=out, scores_out=scores_out)


__all__ = [
    "Attributor",
    "Config",
    "load_config",
    "GradientStore",
    "open_store",
    "train",
    "build",
    "query",
    "ModelTask",
    "Task",
    "to_examples",
    "__version__",
]
