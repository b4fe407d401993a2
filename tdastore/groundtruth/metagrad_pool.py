"""The metagradient job: units of (seed block x test block) as Ray tasks, written beside the ground truth.

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

from tdastore.config import Config, config_to_dict, load_config
from tdastore.distributed.ray_session import ray_session
from tdastore.errors import StoreError
from tdastore.groundtruth.metagrad import MetaGradient
from tdastore.groundtruth.pool import done_units, drive_units, read_groundtruth_manifest, read_job_manifest
from tdastore.store.manifest import SCHEMA_VERSION, write_json_atomic
from tdastore.tasks import make_task
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
    return Path(groundtruth) / f"metagrad-{coupling}"


def _plan(n_seeds: int, n_test: int, seed_block: int, test_block: int | None) -> list[MetagradUnit]:
    test_block = test_block or n_test
    return [MetagradUnit(a, b) for a in range(-(-n_seeds // seed_block)) for b in range(-(-n_test // test_block))]


def prepare_metagrad(config: Config, groundtruth: str | Path) -> tuple[Path, dict, Config]:
    """Create (or reopen, after checking it is the same job) the metagradient store of a ground truth."""
    gt_manifest = read_groundtruth_manifest(Path(groundtruth))
    mg = config.metagrad
    gt_config = load_config(gt_manifest["config"])  # the further training that was run
    coupling = mg.coupling or gt_config.groundtruth.coupling
    n_train = len(make_task(gt_config.task, gt_config.model).examples("train"))
    rows = list(gt_manifest["left_out"]) if mg.rows == "left_out" else list(range(n_train))
    seeds = gt_manifest["seeds"][: mg.seeds] if mg.seeds is not None else gt_manifest["seeds"]
    n_eval, n_test = len(gt_manifest["evals"]["steps"]), len(gt_manifest["test_rows"])
    identity = {
        "kind": METAGRAD_KIND,
        "task": gt_manifest["task"],
        "model": gt_manifest["model"],
        "groundtruth": str(Path(groundtruth).resolve()),
        "coupling": coupling,
        "rows": rows,
        "seeds": seeds,
        "evals": gt_manifest["evals"],
        "test_rows": gt_manifest["test_rows"],
        "metagrad": config_to_dict(config)["metagrad"] | {"workers": None},
    }
    root = metagrad_root(groundtruth, coupling)
    if (root / "manifest.json").exists():
        manifest = read_metagrad_manifest(root)
        different = [k for k in identity if manifest.get(k) != identity[k]]
        if different:
            raise StoreError(
                f"metagradient store '{root}' holds another job (differs in {different}) and was left "
                f"unchanged: delete it to recompute with these settings"
            )
        return root, manifest, gt_config
    root.mkdir(parents=True, exist_ok=True)
    (root / "units").mkdir(exist_ok=True)
    zarr.create_array(
        store=str(root / "scores.zarr"),
        shape=(n_eval, n_test, len(rows), len(seeds)),
        chunks=(n_eval, min(mg.test_block or n_test, n_test), len(rows), min(mg.seed_block, len(seeds))),
        dtype="float32",
        fill_value=np.nan,
        overwrite=True,
    )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        **identity,
        "tdastore_version": __version__,
        "units": [u.name for u in _plan(len(seeds), n_test, mg.seed_block, mg.test_block)],
    }
    write_json_atomic(root / "manifest.json", manifest)
    return root, manifest, gt_config


def read_metagrad_manifest(root: Path) -> dict:
    return read_job_manifest(root, METAGRAD_KIND, "metagradient", "tdastore metagrad")


def run_metagrad_unit(config: Config, gt_config: Config, root: Path, unit: MetagradUnit, manifest: dict) -> float:
    """Differentiate one unit's seeds for one block of test points and write its chunk of scores.zarr."""
    began = time.perf_counter()
    mg = config.metagrad
    task = make_task(gt_config.task, gt_config.model)
    model = load_model(gt_config, task)
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
    scores = np.stack([(-meta.gradients(s, mg.mode)).numpy() for s in seeds], axis=-1)  # [E, t, R, s]
    if not np.isfinite(scores).all():
        raise StoreError(f"metagradients are not finite in unit {unit.name}: lower groundtruth.lr")
    out = zarr.open_array(str(root / "scores.zarr"), mode="r+")
    out[:, test_lo : test_lo + len(test), :, seed_lo : seed_lo + len(seeds)] = scores
    write_json_atomic(
        root / "units" / f"{unit.name}.done",
        {"unit": unit.name, "seconds": time.perf_counter() - began, "mode": meta.choose_mode(mg.mode)},
    )
    return time.perf_counter() - began


@ray.remote
def _metagrad_task(config_dict: dict, gt_config_dict: dict, root: str, unit: MetagradUnit, manifest: dict) -> float:
    torch.set_num_threads(1)
    return run_metagrad_unit(load_config(config_dict), load_config(gt_config_dict), Path(root), unit, manifest)


def run_metagrad(
    config: Config, groundtruth: str | Path | None = None, address: str | None = None, progress: bool = True
) -> Path:
    """Run (or resume) the metagradient job for a finished ground truth on Ray; returns its store's path."""
    groundtruth = Path(groundtruth or config.groundtruth.output)
    gt_manifest = read_groundtruth_manifest(groundtruth)
    if gt_manifest.get("status") != "complete":
        raise StoreError(f"ground truth '{groundtruth}' is incomplete: finish `tdastore ground-truth` first")
    root, manifest, gt_config = prepare_metagrad(config, groundtruth)
    units = _plan(
        len(manifest["seeds"]), len(manifest["test_rows"]), config.metagrad.seed_block, config.metagrad.test_block
    )
    pending = [u for u in units if u.name not in done_units(root)]
    if pending:
        with ray_session(address or config.build.address, num_cpus=max(2, config.metagrad.workers)):
            remote = _metagrad_task.options(num_cpus=1, max_retries=config.build.max_retries)
            args = (config_to_dict(config), config_to_dict(gt_config), str(root))
            drive_units(
                lambda unit: remote.remote(*args, unit, manifest),
                pending,
                len(units),
                config.metagrad.workers,
                "metagrad",
                progress,
            )
    if done_units(root) >= {u.name for u in units}:
        manifest = read_metagrad_manifest(root)
        manifest["status"] = "complete"
        write_json_atomic(root / "manifest.json", manifest)
    return root


def read_metagrad_scores(root: Path) -> tuple[np.ndarray, dict]:
    """Seed-averaged scores [evals, n_test, n_rows] and the manifest of a finished metagradient store."""
    manifest = read_metagrad_manifest(root)
    if manifest.get("status") != "complete":
        raise StoreError(f"metagradient store '{root}' is incomplete: rerun `tdastore metagrad` to finish it")
    return zarr.open_array(str(root / "scores.zarr"), mode="r")[:].astype(np.float64).mean(-1), manifest
