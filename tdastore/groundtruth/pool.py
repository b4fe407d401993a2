"""The ground-truth job: units of (seed block x left-out block) on Ray actors, written to a resumable store.

GT/
  manifest.json   task and model fingerprints, resolved config, left-out rows, test rows, seeds, schedule,
                  unit table, status
  loo.zarr        [evals, n_test, n_left_out, n_seeds]  g after further training without row i (seed s)
  full.zarr       [evals, n_test, n_seeds]              g after further training on all rows (seed s)
  units/          one .done marker per finished unit
A unit's region is exactly one Zarr chunk of each array, so concurrent units never share a chunk; a unit
is marked done only after its chunks are written. Rerunning skips done units.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import zarr

from tdastore.config import Config, config_to_dict, for_workers, load_config
from tdastore.devices import on_device
from tdastore.distributed.pool import device_options, run_pool
from tdastore.distributed.ray_session import ray_session
from tdastore.distributed.shipping import share_task
from tdastore.errors import ConfigError, StoreError
from tdastore.groundtruth.engine import ReplicaTrainer, Schedule
from tdastore.groundtruth.sequential import SequentialTrainer, make_trainer
from tdastore.store.checksums import create_array, written_chunks
from tdastore.store.job_store import (
    done_markers,
    mark_done,
    mark_units_for_rerun,
    open_job,
    read_job_manifest,
    unit_problems,
    writing,
)
from tdastore.store.location import store_path, zarr_store
from tdastore.store.manifest import SCHEMA_VERSION, write_json_atomic
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Task, model_fingerprint
from tdastore.training import load_model
from tdastore.version import __version__

GT_KIND = "groundtruth"


@dataclass(frozen=True)
class Unit:
    seed_block: int
    left_block: int

    @property
    def name(self) -> str:
        return f"{self.seed_block:04d}-{self.left_block:04d}"


def left_out_rows(config: Config, n_train: int) -> list[int]:
    """The training rows whose removal is measured, validated."""
    gt = config.groundtruth
    if gt.left_out_indices is not None:
        rows = list(gt.left_out_indices)
        bad = [i for i in rows if not 0 <= i < n_train]
        if bad:
            raise ConfigError(f"groundtruth.left_out_indices {bad[:5]} are out of range 0..{n_train - 1}")
        if len(set(rows)) != len(rows):
            dup = sorted({i for i in rows if rows.count(i) > 1})
            raise ConfigError(f"groundtruth.left_out_indices holds duplicates {dup[:5]}: list each row once")
    elif gt.left_out_every is not None:
        if gt.left_out_every <= 0:
            raise ConfigError("groundtruth.left_out_every must be positive")
        rows = list(range(0, n_train, gt.left_out_every))
    else:
        if not 0 < gt.left_out_count <= n_train:
            raise ConfigError(f"groundtruth.left_out_count must lie in 1..{n_train} (the training rows)")
        generator = torch.Generator().manual_seed(gt.left_out_seed)
        rows = sorted(torch.randperm(n_train, generator=generator)[: gt.left_out_count].tolist())
    if len(rows) < 2:
        raise ConfigError("the left-out set needs at least two rows (the gold vector is mean-centred over it)")
    return rows


def plan_units(n_seeds: int, n_left: int, seed_block: int, left_block: int) -> list[Unit]:
    return [Unit(a, b) for a in range(-(-n_seeds // seed_block)) for b in range(-(-n_left // left_block))]


def prepare_groundtruth(config: Config, task: Task | None = None) -> tuple[Path, dict]:
    """Create the ground-truth store, or reopen it after checking it is the same job."""
    gt = config.groundtruth
    root = store_path(gt.output)
    task = resolve_task(config.task, config.model, task)
    model = load_model(config, task)
    train, test = task.examples("train"), task.examples("test")
    n_test = len(test) if gt.test_points is None else min(gt.test_points, len(test))
    schedule = Schedule.from_config(gt, len(train))
    left = left_out_rows(config, len(train))
    identity = {
        "kind": GT_KIND,
        "task": {"name": task.name, "fingerprint": task.fingerprint()},
        "model": {"fingerprint": model_fingerprint(model)},
        "groundtruth": {  # how it runs is not what it is: both executions give the same arrays
            key: value
            for key, value in config_to_dict(config)["groundtruth"].items()
            if key not in ("output", "workers", "threads_per_worker", "execution")
        }
        | {"output": None, "workers": None, "threads_per_worker": None},
        "left_out": left,
        "test_rows": list(range(n_test)),
        "test_ids": [int(i) for i in test.ids[:n_test]],
        "seeds": list(range(gt.seeds)),
        "evals": {
            "unit": "epoch" if gt.epochs is not None else "step",
            "labels": schedule.eval_labels,
            "steps": schedule.eval_steps,
        },
    }

    def create() -> dict:
        (root / "units").mkdir()
        evals, seeds = len(schedule.eval_steps), gt.seeds
        create_array(
            root / "loo.zarr",
            shape=(evals, n_test, len(left), seeds),
            chunks=(evals, n_test, min(gt.left_out_block, len(left)), min(gt.seed_block, seeds)),
            dtype="float32",
            fill_value=np.nan,
        )
        create_array(
            root / "full.zarr",
            shape=(evals, n_test, seeds),
            chunks=(evals, n_test, min(gt.seed_block, seeds)),
            dtype="float32",
            fill_value=np.nan,
        )
        return {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            **identity,
            "config": config_to_dict(config),
            "tdastore_version": __version__,
            "units": [u.name for u in plan_units(seeds, len(left), gt.seed_block, gt.left_out_block)],
        }

    manifest = open_job(
        root,
        identity,
        read_groundtruth_manifest,
        create,
        what="ground-truth store",
        fix="choose a new groundtruth.output",
        not_ours=not_a_groundtruth(root),
    )
    return root, manifest


def finished_groundtruth(groundtruth: str | Path) -> tuple[Path, Config]:
    """A complete ground truth and the config it ran (its further training), for the jobs built on it
    (metagradients, LDS); an unfinished one is a clear error."""
    root = store_path(groundtruth)
    manifest = read_groundtruth_manifest(root)
    if manifest.get("status") != "complete":
        raise StoreError(f"ground truth '{root}' is incomplete: finish `tdastore ground-truth` first")
    return root, load_config(manifest["config"])


def not_a_groundtruth(root: Path) -> str:
    return f"'{root}' exists, is not empty and is not a ground-truth store: choose a new groundtruth.output"


def read_groundtruth_manifest(root: Path) -> dict:
    return read_job_manifest(root, GT_KIND, "ground-truth", "tdastore ground-truth")


def run_unit(
    config: Config, trainer: ReplicaTrainer | SequentialTrainer, root: Path, unit: Unit, manifest: dict
) -> float:
    """Train one unit's replicas and write its chunk of loo.zarr (and of full.zarr for left block 0)."""
    began = time.perf_counter()
    gt = config.groundtruth
    seed_lo, left_lo = unit.seed_block * gt.seed_block, unit.left_block * gt.left_out_block
    seeds = manifest["seeds"][seed_lo : seed_lo + gt.seed_block]
    left = manifest["left_out"][left_lo : left_lo + gt.left_out_block]
    values = trainer.run(seeds, left).numpy()  # [E, T, s, 1 + l]
    return store_unit(root, "loo.zarr", unit, values, seed_lo, left_lo, began, "unit")


def store_unit(root, name: str, unit: Unit, values: np.ndarray, seed_lo: int, row_lo: int, began: float, what: str):
    """Write one unit's replicas, values [E, T, s, 1 + r] (the full run, then each left-out row or set): the
    left-out ones into `name` [E, T, row_lo:+r, seed_lo:+s], the full runs into full.zarr (by the unit of the
    first row block), then the unit's .done marker. Returns the unit's seconds."""
    if not np.isfinite(values).all():
        raise StoreError(f"further training diverged (NaN/Inf test losses) in {what} {unit.name}: lower groundtruth.lr")
    seeds, rows = values.shape[2], values.shape[3] - 1
    out = zarr.open_array(store=zarr_store(root / name), mode="r+")
    region = (slice(None), slice(None), slice(row_lo, row_lo + rows), slice(seed_lo, seed_lo + seeds))
    out[region] = values[:, :, :, 1:].transpose(0, 1, 3, 2)
    chunks = written_chunks(root, name, out, region)
    if unit.left_block == 0:
        full = zarr.open_array(store=zarr_store(root / "full.zarr"), mode="r+")
        full[:, :, seed_lo : seed_lo + seeds] = values[:, :, :, 0]
        chunks |= written_chunks(root, "full.zarr", full, region[:2] + region[3:])
    payload = {"unit": unit.name, "seconds": time.perf_counter() - began, "chunks": chunks}
    mark_done(root / "units", unit.name, payload)
    return time.perf_counter() - began


@ray.remote
class UnitWorker:
    """A Ray actor holding the task, the final model (checked against the job's fingerprint) and a replica
    trainer; runs ground-truth units one at a time."""

    def __init__(self, config_dict: dict, root: str, manifest: dict, threads: int, fault: dict | None, task=None):
        torch.set_num_threads(threads)
        self.config, self.root, self.manifest, self.fault = load_config(config_dict), store_path(root), manifest, fault
        task = resolve_task(self.config.task, self.config.model, task)
        model = load_model(self.config, task)
        check_fingerprint(model, manifest, self.root)
        test = task.examples("test").slice(0, len(manifest["test_rows"]))
        model = on_device(model, self.config.device)
        self.trainer = make_trainer(model, task, self.config.groundtruth, task.examples("train"), test)

    def run(self, unit: Unit) -> float:
        if self.fault and self.fault.get("unit") == unit.name and not (self.root / ".fault-fired").exists():
            (self.root / ".fault-fired").touch()
            os.kill(os.getpid(), signal.SIGKILL)  # testing hook: this worker dies part way through the job
        return run_unit(self.config, self.trainer, self.root, unit, self.manifest)


def check_fingerprint(model, manifest: dict, root: Path) -> None:
    """Refuse to compute a unit on other weights than the job's (a replaced weights file)."""
    if model_fingerprint(model) != manifest["model"]["fingerprint"]:
        raise StoreError(
            f"the final model's weights changed since job '{root}' began (fingerprint "
            f"{model_fingerprint(model)}, the job's {manifest['model']['fingerprint']}): restore them, or run "
            "the job into a new output"
        )


def done_units(root: Path) -> set[str]:
    return done_markers(store_path(root) / "units")


def run_groundtruth(
    config: Config,
    address: str | None = None,
    progress: bool = True,
    fault: dict | None = None,
    max_retries: int | None = None,
    task: Task | None = None,
) -> Path:
    """Run (or resume) the ground-truth job on Ray; returns the store's path. task: a task object (Python API)
    instead of the one the config names."""
    config = for_workers(config)
    output = store_path(config.groundtruth.output)
    with writing(output, "ground truth", not_a_groundtruth(output)):
        root, manifest = prepare_groundtruth(config, task)
        gt = config.groundtruth
        units = plan_units(gt.seeds, len(manifest["left_out"]), gt.seed_block, gt.left_out_block)
        threads = gt.threads_per_worker

        def actors():  # inside the Ray session: the task object goes to the object store once
            config_dict, shared = config_to_dict(config), share_task(config, task)
            options = device_options(config.device, threads, config.build.gpus_per_worker)
            return lambda: UnitWorker.options(**options).remote(
                config_dict, str(root), manifest, threads, fault, shared
            )

        run_job_units(
            root,
            units,
            actors,
            read_groundtruth_manifest,
            what="ground truth",
            workers=gt.workers,
            max_retries=config.build.max_retries if max_retries is None else max_retries,
            address=address or config.build.address,
            num_cpus=max(2, gt.workers * threads),
            progress=progress,
        )
        return root


def run_job_units(
    root: Path,
    units: list,
    actors,
    read_manifest,
    *,
    what: str,
    workers: int,
    max_retries: int,
    address,
    num_cpus: int,
    progress: bool,
) -> None:
    """The units of a job store that are not done, on Ray actors (`actors()` -> a maker of one, called inside
    the session); the store is marked complete once every unit is. Done units whose chunks no longer match
    their markers' checksums are recomputed first (deep: a job's arrays are small)."""
    damaged = unit_problems(root, deep=True)
    if damaged:
        found = "; ".join(f"unit {name}: {reason}" for name, reason in damaged.items())
        print(f"{what} '{root}': recomputing damaged unit(s): {found}", file=sys.stderr)
        mark_units_for_rerun(root, list(damaged))
    pending = [u for u in units if u.name not in done_units(root)]
    if pending:
        with ray_session(address, num_cpus=num_cpus):
            run_pool(
                pending,
                actors(),
                workers=workers,
                max_retries=max_retries,
                describe=lambda unit: f"{what} unit {unit.name}",
                desc=what,
                total=len(units),
                initial=len(units) - len(pending),
                progress=progress,
            )
    if done_units(root) >= {u.name for u in units}:
        manifest = read_manifest(root)
        manifest["status"] = "complete"
        write_json_atomic(root / "manifest.json", manifest)
