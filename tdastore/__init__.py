"""tdastore: training data attribution at scale.

Python API (notebooks):
    config = tdastore.load_config("configs/diabetes.yaml")
    tdastore.train(config)
    store = tdastore.build(config, "runs/diabetes/store")
    store = tdastore.open_store("runs/diabetes/store"); store.grads, store.meta, store.manifest
    top = store.query("if_gn", split="test", top_k=10)        # a pyarrow Table: test_id, rank, train_id, score
    from tdastore.evaluate.run import evaluate                 # methods vs the further-training gold standard
"""

__version__ = "0.1.0"

from tdastore.config import Config, load_config
from tdastore.store.gradient_store import GradientStore, open_store


def train(config: Config, progress: bool = True):
    """Train the final model of `config` and save it to config.train.output_dir."""
    from tdastore.tasks.tabular import make_task
    from tdastore.training import train_final_model

    return train_final_model(config, make_task(config.task, config.model), progress=progress)


def build(
    config: Config, output, split: str = "train", address=None, workers=None, progress: bool = True
) -> GradientStore:
    """Build (or resume) the gradient store of `split` at `output` with Ray actors."""
    from tdastore.distributed.build import build_store

    return build_store(config, output, split=split, address=address, workers=workers, progress=progress)


__all__ = ["Config", "load_config", "GradientStore", "open_store", "train", "build", "__version__"]
