"""The metagradient job: units of (seed block x test block) on Ray actors, written beside the ground truth.

GT/metagrad-<coupling>/
  manifest.json   the ground truth it differentiates (fingerprints), coupling, mode, rows, seeds, units, status
  scores.zarr     [evals, n_test, n_rows, n_seeds]  a_i ~ -d g(z_t, theta_{T_e}) / d w_i for seed s
  units/          one .done marker per finished unit
The further-training spec (optimizer, lr, batches, schedule, test points, seeds) is the ground truth's own,
so its scores line up with loo.zarr entry by entry; a unit's region is exactly one Zarr chunk.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import zarr

from tdastore.config import Config, absolute_location, config_to_dict, for_workers, load_config
from tdastore.devices import on_device
from tdastore.distributed.pool import device_options
from tdastore.distributed.shipping import share_task
from tdastore.errors import ConfigError, StoreError
from tdastore.groundtruth.metagrad import MetaGradient
from tdastore.groundtruth.pool import check_fingerprint, finished_groundtruth, read_groundtruth_manifest, run_job_units
from tdastore.store.checksums import JOB_REPAIR, create_array, read_array, written_chunks
from tdastore.store.job_store import mark_done, open_job, read_job_manifest, writing
from tdastore.store.location import absolute, store_path, zarr_store
from tdastore.store.manifest import SCHEMA_VERSION
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Task
from tdastore.training import load_model
from tdastore.version import __version__

METAGRAD_KIND = "metagrad"


@dataclass(frozen=True)
class MetagradUnit:
    seed_block: int
    test_block: int

    @property
    def name(self) -> str:
        return f"{self.seed_block:04d}-{self.test_block:04d}"


def metagrad_root(groundtruth: str | Path, coupling: str) -> Path:
    return store_path(groundtruth) / f"metagrad-{coupling}"


def _plan(n_seeds: int, n_test: int, seed_block: int, test_block: int | None) -> list[MetagradUnit]:
    test_block = test_block or n_test
    return [MetagradUnit(a, b) for a in range(-(-n_seeds // seed_block)) for b in range(-(-n_test // test_block))]


DEFAULT_SEEDS = 5  # metagrad.seeds: null differentiates this many of the ground truth's seeds (fewer if it has fewer)


def prepare_metagrad(config: Config, groundtruth: str | Path, task: Task | None = None) -> tuple[Path, dict, Config]:
    """Create (or reopen, after checking it is the same job) the metagradient store of a ground truth."""
    gt_manifest = read_groundtruth_manifest(store_path(groundtruth))
    mg = config.metagrad
    gt_config = load_config(gt_manifest["config"])  # the further training that was run
    coupling = mg.coupling or gt_config.groundtruth.coupling
    n_train = len(resolve_task(gt_config.task, gt_config.model, task).examples("train"))
    rows = list(gt_manifest["left_out"]) if mg.rows == "left_out" else list(range(n_train))
    available = len(gt_manifest["seeds"])
    if isinstance(mg.seeds, int) and mg.seeds > available:
        raise ConfigError(
            f"metagrad.seeds {mg.seeds} exceeds the {available} seeds of the ground truth at '{groundtruth}' (it "
            f"differentiates the first n of them): set metagrad.seeds <= {available}, or all"
        )
    count = {None: min(DEFAULT_SEEDS, available), "all": available}.get(mg.seeds, mg.seeds)
    seeds = gt_manifest["seeds"][:count]
    n_eval, n_test = len(gt_manifest["evals"]["steps"]), len(gt_manifest["test_rows"])
    identity = {
        "kind": METAGRAD_KIND,
        "task": gt_manifest["task"],
        "model": gt_manifest["model"],
        "groundtruth": str(absolute(store_path(groundtruth))),
        "coupling": coupling,
        "rows": rows,
        "seeds": seeds,
        "evals": gt_manifest["evals"],
        "test_rows": gt_manifest["test_rows"],
        "metagrad": config_to_dict(config)["metagrad"] | {"workers": None},
    }
    root = metagrad_root(groundtruth, coupling)

    def create() -> dict:
        (root / "units").mkdir(exist_ok=True)
        create_array(
            root / "scores.zarr",
            shape=(n_eval, n_test, len(rows), len(seeds)),
            chunks=(n_eval, min(mg.test_block or n_test, n_test), len(rows), min(mg.seed_block, len(seeds))),
            dtype="float32",
            fill_value=np.nan,
        )
        return {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            **identity,
            "tdastore_version": __version__,
            "units": [u.name for u in _plan(len(seeds), n_test, mg.seed_block, mg.test_block)],
        }

    manifest = open_job(
        root,
        identity,
        read_metagrad_manifest,
        create,
        what="metagradient store",
        fix="delete it to recompute with these settings",
        not_ours=not_a_metagrad(root),
    )
    return root, manifest, gt_config


def not_a_metagrad(root: Path) -> str:
    return f"'{root}' exists, is not empty and is not a metagradient store: move it away to recompute"


def read_metagrad_manifest(root: Path) -> dict:
    return read_job_manifest(root, METAGRAD_KIND, "metagradient", "tdastore metagrad")


def run_metagrad_unit(
    config: Config, gt_config: Config, model, task, root: Path, unit: MetagradUnit, manifest: dict
) -> float:
    """Differentiate one unit's seeds for one block of test points and write its chunk of scores.zarr."""
    began = time.perf_counter()
    mg = config.metagrad
    n_test = len(manifest["test_rows"])
    block = mg.test_block or n_test
    test_lo, seed_lo = unit.test_block * block, unit.seed_block * mg.seed_block
    test = task.examples("test").slice(test_lo, min(test_lo + block, n_test))
    spec = dataclasses.replace(gt_config.groundtruth, coupling=manifest["coupling"])
    meta = MetaGradient(
        model,
        task,
        spec,
        task.examples("train"),
        test,
        rows=manifest["rows"],
        checkpoint_every=mg.checkpoint_every,
        memory_budget_mb=mg.memory_mb,
    )
    seeds = manifest["seeds"][seed_lo : seed_lo + mg.seed_block]
    scores = np.stack([(-meta.gradients(s, mg.mode)).cpu().numpy() for s in seeds], axis=-1)  # [E, t, R, s]
    if not np.isfinite(scores).all():
        raise StoreError(f"metagradients are not finite in unit {unit.name}: lower groundtruth.lr")
    out = zarr.open_array(store=zarr_store(root / "scores.zarr"), mode="r+")
    region = (slice(None), slice(test_lo, test_lo + len(test)), slice(None), slice(seed_lo, seed_lo + len(seeds)))
    out[region] = scores
    payload = {
        "unit": unit.name,
        "seconds": time.perf_counter() - began,
        "mode": meta.choose_mode(mg.mode),
        "chunks": written_chunks(root, "scores.zarr", out, region),
    }
    mark_done(root / "units", unit.name, payload)
    return time.perf_counter() - began


@ray.remote
class MetagradWorker:
    """A Ray actor holding the ground truth's task and final model (fingerprint checked); runs units."""

    def __init__(self, config_dict: dict, gt_config_dict: dict, root: str, manifest: dict, task=None):
        torch.set_num_threads(1)
        self.config, self.gt_config = load_config(config_dict), load_config(gt_config_dict)
        self.root, self.manifest = store_path(root), manifest
        self.task = resolve_task(self.gt_config.task, self.gt_config.model, task)
        self.model = load_model(self.gt_config, self.task)
        check_fingerprint(self.model, manifest, self.root)
        self.model = on_device(self.model, self.config.device)

    def run(self, unit: MetagradUnit) -> float:
        args = (self.config, self.gt_config, self.model, self.task, self.root, unit, self.manifest)
        return run_metagrad_unit(*args)


def run_metagrad(
    config: Config,
    groundtruth: str | Path | None = None,
    address: str | None = None,
    progress: bool = True,
    task: Task | None = None,
) -> Path:
    """Run (or resume) the metagradient job for a finished ground truth on Ray; returns its store's path."""
    config = for_workers(config)  # workers run elsewhere: every local path absolute
    groundtruth, gt_config = finished_groundtruth(absolute_location(groundtruth or config.groundtruth.output))
    output = metagrad_root(groundtruth, config.metagrad.coupling or gt_config.groundtruth.coupling)
    with writing(output, "metagradient job", not_a_metagrad(output)):
        root, manifest, gt_config = prepare_metagrad(config, groundtruth, task)
        units = _plan(
            len(manifest["seeds"]), len(manifest["test_rows"]), config.metagrad.seed_block, config.metagrad.test_block
        )

        def actors():  # inside the Ray session: the task object goes to the object store once
            args = (config_to_dict(config), config_to_dict(gt_config), str(root), manifest, share_task(gt_config, task))
            options = device_options(config.device, 1, config.build.gpus_per_worker)
            return lambda: MetagradWorker.options(**options).remote(*args)

        run_job_units(
            root,
            units,
            actors,
            read_metagrad_manifest,
            what="metagrad",
            workers=config.metagrad.workers,
            max_retries=config.build.max_retries,
            address=address or config.build.address,
            num_cpus=max(2, config.metagrad.workers),
            progress=progress,
        )
        return root


def read_metagrad_scores(root: Path) -> tuple[np.ndarray, dict]:
    """Seed-averaged scores [evals, n_test, n_rows] and the manifest of a finished metagradient store."""
    manifest = read_metagrad_manifest(root)
    if manifest.get("status") != "complete":
        raise StoreError(f"metagradient store '{root}' is incomplete: rerun `tdastore metagrad` to finish it")
    scores = read_array(root / "scores.zarr", what=f"metagradient store '{root}'", fix=JOB_REPAIR)
    return scores.astype(np.float64).mean(-1), manifest
