"""The linear datamodeling score (LDS) in the final-model-only setting: further training with random subsets
left out, beside a finished ground truth and in its setting (optimizer, schedule, test points; its coupling
unless `lds.coupling` names another, e.g. delete, as TRAK and datamodels train on subsets).

GT/lds-<coupling>/
  manifest.json   the ground truth it belongs to (fingerprints), the subsets, seeds, evals, units, status
  subsets.zarr    [evals, n_test, M, seeds]  g after further training without the rows of subset j (seed s)
  full.zarr       [evals, n_test, seeds]     g after further training on all rows (seed s)
  units/          one .done marker per finished unit (a seed block x a subset block: one chunk of each array)
Subset j leaves out a fraction alpha of the training rows (subtract: each batch loss minus the subset's summed
loss / N; delete: its rows removed from every permutation). Per test point and evaluation point,
LDS = Spearman over j between a method's predicted sum_{i in S_j} score_i and the actual change of g,
g(without S_j) - g(full), averaged over seeds (tdastore/evaluate/metrics.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import ray
import torch

from tdastore.config import Config, absolute_location, config_to_dict, for_workers, load_config
from tdastore.devices import on_device
from tdastore.distributed.pool import device_options
from tdastore.errors import StoreError
from tdastore.groundtruth.engine import ReplicaTrainer
from tdastore.groundtruth.pool import (
    Unit,
    check_fingerprint,
    finished_groundtruth,
    read_groundtruth_manifest,
    run_job_units,
    store_unit,
)
from tdastore.groundtruth.sequential import SequentialTrainer, make_trainer
from tdastore.store.checksums import JOB_REPAIR, create_array, read_array
from tdastore.store.job_store import open_job, read_job_manifest, writing
from tdastore.store.location import store_path
from tdastore.store.manifest import SCHEMA_VERSION
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Task
from tdastore.training import load_model
from tdastore.version import __version__

LDS_KIND = "lds"


def lds_root(groundtruth: str | Path, coupling: str) -> Path:
    return store_path(groundtruth) / f"lds-{coupling}"


def draw_subsets(n_train: int, count: int, fraction: float, seed: int) -> list[list[int]]:
    """M random subsets of round(fraction x N) rows each, sorted, from a seeded generator."""
    size = max(1, round(fraction * n_train))
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n_train, generator=generator)[:size].tolist()) for _ in range(count)]


def lds_coupling(config: Config, gt_coupling: str) -> str:
    """The LDS job's coupling: `lds.coupling`, else the ground truth's."""
    return config.lds.coupling or gt_coupling


def prepare_lds(config: Config, groundtruth: Path, task: Task | None = None) -> tuple[Path, dict, Config]:
    """Create (or reopen, after checking it is the same job) the LDS store of a finished ground truth; returns
    it, its manifest and the further-training config its replicas use (the ground truth's, in its coupling)."""
    gt_manifest = read_groundtruth_manifest(groundtruth)
    gt_config = load_config(gt_manifest["config"])  # the further training of the gold standard
    coupling = lds_coupling(config, gt_config.groundtruth.coupling)
    further = dataclasses.replace(gt_config.groundtruth, coupling=coupling)
    gt_config = dataclasses.replace(gt_config, groundtruth=further)
    lds = config.lds
    n_train = len(resolve_task(gt_config.task, gt_config.model, task).examples("train"))
    identity = {
        "kind": LDS_KIND,
        "task": gt_manifest["task"],
        "model": gt_manifest["model"],
        "groundtruth": str(groundtruth.resolve()),
        "coupling": gt_config.groundtruth.coupling,
        "subsets": draw_subsets(n_train, lds.subsets, lds.fraction, lds.subset_seed),
        "fraction": lds.fraction,
        "seeds": list(range(lds.seeds)),
        "evals": gt_manifest["evals"],
        "test_rows": gt_manifest["test_rows"],
    }
    root = lds_root(groundtruth, gt_config.groundtruth.coupling)
    n_eval, n_test, m, seeds = len(gt_manifest["evals"]["steps"]), len(gt_manifest["test_rows"]), lds.subsets, lds.seeds
    seed_block = min(gt_config.groundtruth.seed_block, seeds)

    def create() -> dict:
        (root / "units").mkdir(exist_ok=True)
        for name, shape, chunks in (
            ("subsets.zarr", (n_eval, n_test, m, seeds), (n_eval, n_test, min(lds.subset_block, m), seed_block)),
            ("full.zarr", (n_eval, n_test, seeds), (n_eval, n_test, seed_block)),
        ):
            create_array(root / name, shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan)
        return {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            **identity,
            "config": config_to_dict(config),
            "tdastore_version": __version__,
            "blocks": {"seeds": seed_block, "subsets": lds.subset_block},
            "units": [u.name for u in plan(seeds, m, seed_block, lds.subset_block)],
        }

    manifest = open_job(
        root,
        identity,
        read_lds_manifest,
        create,
        what="LDS store",
        fix="delete it to recompute with these settings",
        not_ours=not_an_lds_store(root),
    )
    return root, manifest, gt_config


def plan(n_seeds: int, n_subsets: int, seed_block: int, subset_block: int) -> list[Unit]:
    return [Unit(a, b) for a in range(-(-n_seeds // seed_block)) for b in range(-(-n_subsets // subset_block))]


def not_an_lds_store(root: Path) -> str:
    return f"'{root}' exists, is not empty and is not an LDS store: move it away to recompute"


def read_lds_manifest(root: Path) -> dict:
    return read_job_manifest(root, LDS_KIND, "LDS", "tdastore lds")


def run_lds_unit(trainer: ReplicaTrainer | SequentialTrainer, root: Path, unit: Unit, manifest: dict) -> float:
    """Train one unit's replicas (full run + its subsets, per seed) and write its chunks."""
    began = time.perf_counter()
    seed_block, block = manifest["blocks"]["seeds"], manifest["blocks"]["subsets"]
    seed_lo, subset_lo = unit.seed_block * seed_block, unit.left_block * block
    seeds = manifest["seeds"][seed_lo : seed_lo + seed_block]
    subsets = manifest["subsets"][subset_lo : subset_lo + block]
    values = trainer.run(seeds, subsets).numpy()  # [E, T, s, 1 + m]
    return store_unit(root, "subsets.zarr", unit, values, seed_lo, subset_lo, began, "LDS unit")


@ray.remote
class LdsWorker:
    """A Ray actor holding the ground truth's task, final model (fingerprint checked) and replica trainer."""

    def __init__(self, gt_config_dict: dict, root: str, manifest: dict, threads: int, task=None):
        torch.set_num_threads(threads)
        gt_config = load_config(gt_config_dict)
        self.root, self.manifest = store_path(root), manifest
        task = resolve_task(gt_config.task, gt_config.model, task)
        model = load_model(gt_config, task)
        check_fingerprint(model, manifest, self.root)
        test = task.examples("test").slice(0, len(manifest["test_rows"]))
        model = on_device(model, gt_config.device)
        self.trainer = make_trainer(model, task, gt_config.groundtruth, task.examples("train"), test)

    def run(self, unit: Unit) -> float:
        return run_lds_unit(self.trainer, self.root, unit, self.manifest)


def run_lds(
    config: Config,
    groundtruth: str | Path | None = None,
    address: str | None = None,
    progress: bool = True,
    task: Task | None = None,
) -> Path:
    """Run (or resume) the LDS job for a finished ground truth on Ray; returns its store's path."""
    from tdastore.distributed.shipping import share_task

    config = for_workers(config)  # workers run elsewhere: every local path absolute
    groundtruth, gt_config = finished_groundtruth(absolute_location(groundtruth or config.groundtruth.output))
    output = lds_root(groundtruth, lds_coupling(config, gt_config.groundtruth.coupling))
    with writing(output, "LDS job", not_an_lds_store(output)):
        root, manifest, gt_config = prepare_lds(config, groundtruth, task)
        blocks = manifest["blocks"]
        units = plan(len(manifest["seeds"]), len(manifest["subsets"]), blocks["seeds"], blocks["subsets"])
        threads = gt_config.groundtruth.threads_per_worker

        def actors():  # inside the Ray session: the task object goes to the object store once
            args = (config_to_dict(gt_config), str(root), manifest, threads)
            shared = share_task(gt_config, task)
            options = device_options(gt_config.device, threads, gt_config.build.gpus_per_worker)
            return lambda: LdsWorker.options(**options).remote(*args, shared)

        run_job_units(
            root,
            units,
            actors,
            read_lds_manifest,
            what="LDS",
            workers=config.lds.workers,
            max_retries=config.build.max_retries,
            address=address or config.build.address,
            num_cpus=max(2, config.lds.workers * threads),
            progress=progress,
        )
        return root


def read_lds(root: Path) -> tuple[np.ndarray, dict]:
    """The seed-averaged actual change of g per subset, [evals, n_test, M], and the manifest."""
    manifest = read_lds_manifest(root)
    if manifest.get("status") != "complete":
        raise StoreError(f"LDS store '{root}' is incomplete: rerun `tdastore lds` to finish it")
    read = lambda name: read_array(root / name, what=f"LDS store '{root}'", fix=JOB_REPAIR).astype(np.float64)  # noqa: E731
    subsets, full = read("subsets.zarr"), read("full.zarr")  # [E, T, M, S], [E, T, S]
    return (subsets - full[:, :, None, :]).mean(-1), manifest
