"""Build a gradient store with Ray actors: shard the rows, keep every worker busy, resume what is done."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray

from tdastore.config import Config, config_to_dict, load_config, with_absolute_paths
from tdastore.distributed.gradient_worker import GradientWorker
from tdastore.distributed.pool import device_options, run_pool
from tdastore.distributed.ray_session import check_reachable, ray_session
from tdastore.distributed.shipping import share_task
from tdastore.errors import StoreError
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.normaliser import make_normaliser
from tdastore.store.gradient_store import GradientStore
from tdastore.store.job_store import writing
from tdastore.store.location import absolute, is_local, store_path
from tdastore.store.manifest import read_manifest
from tdastore.store.normalisers import save_normaliser
from tdastore.store.verify import mark_for_rebuild, verify_store
from tdastore.store.writer import (
    done_shards,
    finalize_store,
    not_a_store,
    plan_shards,
    prepare_store,
    update_shard_table,
)
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Task, check_not_empty, model_fingerprint
from tdastore.training import load_model
from tdastore.version import __version__


def store_identity(config: Config, split: str, task: Task | None = None) -> dict:
    """What a store's rows mean: split, task, model, gradient and projection spec, layout."""
    task = resolve_task(config.task, config.model, task)
    model = load_model(config, task)
    loss_fn = task.per_example_loss if split == "train" else task.test_function
    computer = make_gradient_computer(model, loss_fn, config.gradients, config.projection)
    normaliser = make_normaliser(config, model, task, list(computer.param_spec()["params"]))  # None: no normalizer
    if normaliser is not None:  # the same parameters, rows scaled by D^(1/2)
        computer = make_gradient_computer(model, loss_fn, config.gradients, config.projection, normaliser)
    description = task.description()
    if split == "train" and getattr(task, "held_out", None):
        print(f"note: {task.held_out}", file=sys.stderr)  # documents a user may expect in the store are not
    return {
        "_normaliser": normaliser,
        "split": split,
        "task": {
            "name": task.name,
            "kind": description.get("kind"),
            "fingerprint": task.fingerprint(),
            "description": description,
        },
        "model": {"fingerprint": model_fingerprint(model)},
        "gradients": {**computer.param_spec(), "function": "loss" if split == "train" else "test_function"},
        "projection": computer.spec(),
        "layout": {
            "dtype": config.store.dtype,
            "chunk_rows": config.store.chunk_rows,
            "shard_rows": config.store.shard_rows,
            "compressor": config.store.compressor,
        },
        "_n_rows": len(task.examples(split)),
    }


def build_store(
    config: Config,
    output: str | Path,
    split: str = "train",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    fault: dict | None = None,
    task: Task | None = None,
) -> GradientStore:
    """Compute every row of `split` into the store at `output`; done shards of an earlier run are kept.

    `fault` is a testing hook ({"shard": i}): that shard's worker writes half its rows and is SIGKILLed.
    """
    if split not in ("train", "test"):
        raise StoreError(f"unknown split '{split}': use --split train or --split test")
    check_reachable(address or config.build.address or os.environ.get("RAY_ADDRESS", ""))  # before any write
    root = store_path(output)
    config = load_config(with_absolute_paths(config_to_dict(config)))  # workers (and later queries) run elsewhere
    identity = store_identity(config, split, task)
    n_rows = identity.pop("_n_rows")
    normaliser = identity.pop("_normaliser")
    check_not_empty(n_rows, f"the {split} split of '{config.task.dataset}'")
    with writing(root, "build", not_a_store(root)):
        return _build_leased(config, root, split, identity, n_rows, address, workers, progress, fault, task, normaliser)


def worker_options(config: Config, cluster_gpus: float) -> dict:
    """Ray options of a build worker (see `device_options`)."""
    return device_options(config.device, config.build.cpus_per_worker, config.build.gpus_per_worker, cluster_gpus)


def padding_fraction(reports: list[dict]) -> float:
    """Share of the batches' padded tokens that are padding (0 for tabular rows)."""
    real = sum(r.get("tokens", (0, 0))[0] for r in reports)
    padded = sum(r.get("tokens", (0, 0))[1] for r in reports)
    return 1.0 - real / padded if padded else 0.0


def _build_leased(
    config, root, split, identity, n_rows, address, workers, progress, fault, task, normaliser=None
) -> GradientStore:
    extra = {
        "config": config_to_dict(config),  # paths resolved: a store answers from any working directory
        "location": str(absolute(root)) if is_local(root) else None,  # and, copied with its model, from elsewhere
        "tdastore_version": __version__,
        "created": time.time(),
    }
    manifest = prepare_store(root, identity, n_rows, identity["projection"]["out_dim"], config.store.dtype, extra)
    if normaliser is not None:  # the second moments the workers (and every query) scale rows by
        save_normaliser(root, normaliser)
    shards = plan_shards(n_rows, config.store.shard_rows)
    damaged = verify_store(root)  # cheap: markers, metadata files, chunk files at their written sizes
    if damaged:
        found = "; ".join(p.describe() for p in damaged)
        print(f"store '{root}': repairing what is damaged: {found}", file=sys.stderr)
        mark_for_rebuild(root, damaged)
        manifest = read_manifest(root)
    done = done_shards(root)
    pending = [s for s in shards if s.index not in done]
    began = time.perf_counter()
    reports: list[dict] = []
    n_workers = min(workers or config.build.workers, len(pending)) if pending else 0
    if pending:
        with ray_session(address or config.build.address, num_cpus=max(2, n_workers)):
            reports = _run_pool(
                config,
                root,
                split,
                identity["model"]["fingerprint"],
                pending,
                n_workers,
                progress,
                fault,
                initial_rows=sum(s.rows for s in shards if s.index in done),
                total_rows=n_rows,
                manifest=manifest,
                task=task,
            )
    seconds = time.perf_counter() - began
    computed = sum(r["rows"] for r in reports)
    summary = {
        "seconds": seconds,
        "rows_computed": computed,
        "examples_per_s": computed / seconds if computed else 0.0,
        "worker_examples_per_s": computed / sum(r["seconds"] for r in reports) if computed else 0.0,
        "worker_compute_examples_per_s": computed / sum(r["compute_seconds"] for r in reports) if computed else 0.0,
        "workers": n_workers,
        "peak_worker_rss_mb": max((r["peak_rss_mb"] for r in reports), default=0.0),
        "padding_fraction": padding_fraction(reports),
    }
    finalize_store(root, manifest, summary)
    return GradientStore(root)


def _run_pool(
    config, root, split, model_fp, pending, n_workers, progress, fault, initial_rows, total_rows, manifest, task
) -> list[dict]:
    """One GradientWorker actor per worker, one shard at a time (tdastore/distributed/pool.py)."""
    threads = max(1, int(config.build.cpus_per_worker))
    config_dict, shared = config_to_dict(config), share_task(config, task)
    options = worker_options(config, ray.cluster_resources().get("GPU", 0.0))
    return run_pool(
        pending,
        lambda: GradientWorker.options(**options).remote(
            config_dict,
            str(absolute(root)),
            split,
            model_fp,
            threads,
            fault,
            shared,  # workers run elsewhere
        ),
        workers=n_workers,
        max_retries=config.build.max_retries,
        describe=lambda shard: f"shard {shard.index}",
        desc=f"build {split}",
        total=total_rows,
        initial=initial_rows,
        size=lambda shard: shard.rows,
        on_result=lambda shard, report: update_shard_table(root, manifest),
        progress=progress,
        unit_name="ex",
    )
