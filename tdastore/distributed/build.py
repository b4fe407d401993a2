"""Build a gradient store with Ray actors: shard the rows, keep every worker busy, resume what is done."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from tdastore.config import Config, config_to_dict, load_config, with_absolute_paths
from tdastore.distributed.gradient_worker import GradientWorker, source_examples
from tdastore.distributed.pool import device_options, run_pool
from tdastore.distributed.ray_session import check_reachable, ray_session
from tdastore.distributed.shipping import share_task
from tdastore.errors import StoreError
from tdastore.grads.basis import Basis, fit_pca_basis
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.normaliser import make_normaliser
from tdastore.store.fitted import BASIS_FILE, save_basis, save_normaliser, store_basis
from tdastore.store.gradient_store import GradientStore
from tdastore.store.job_store import writing
from tdastore.store.location import absolute, is_local, store_path
from tdastore.store.manifest import (
    IDENTITY_FIELDS,
    MANIFEST_FILE,
    identity_mismatches,
    read_manifest,
)
from tdastore.store.verify import mark_for_rebuild, verify_store
from tdastore.store.writer import (
    add_segment,
    done_shards,
    finalize_store,
    not_a_store,
    prepare_store,
    restore_array_metadata,
    segments,
    store_shards,
    update_shard_table,
)
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Task, check_not_empty, model_fingerprint
from tdastore.training import load_model
from tdastore.version import __version__


def store_identity(
    config: Config, split: str, task: Task | None = None, basis: Basis | None = None, keep_basis: bool = False
) -> dict:
    """What a store's rows mean: split, task, model, gradient and projection spec, layout. basis: the fitted
    sides of the store being resumed (kept if fitted on as many examples as the config asks) or grown
    (`keep_basis`: new data never refits them), else (projection.basis pca) they are fitted here."""
    task = resolve_task(config.task, config.model, task)
    model = load_model(config, task)
    loss_fn = task.per_example_loss if split == "train" else task.test_function
    computer = make_gradient_computer(model, loss_fn, config.gradients, config.projection)
    normaliser = make_normaliser(config, model, task, list(computer.param_spec()["params"]))  # None: no normalizer
    if config.projection.basis != "pca":
        basis = None
    else:  # fitted on the training loss, for either split
        train = task.examples("train")
        if basis is None or not keep_basis and basis.examples != min(config.projection.basis_examples, len(train)):
            basis = fit_pca_basis(
                make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection, normaliser),
                train,
                config.gradients.batch_size,
                config.projection.basis_examples,
                config.projection.basis_max_dim,
            )
    if normaliser is not None or basis is not None:  # the same parameters, rows scaled by D^(1/2), fitted sides
        computer = make_gradient_computer(model, loss_fn, config.gradients, config.projection, normaliser, basis)
    description = task.description()
    if split == "train" and getattr(task, "held_out", None):
        print(f"note: {task.held_out}", file=sys.stderr)  # documents a user may expect in the store are not
    return {
        "_normaliser": normaliser,
        "_basis": basis,
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
    append: bool = False,
    keep_operators: bool = False,
) -> GradientStore:
    """Compute every row of `split` into the store at `output`; done shards of an earlier run are kept.

    With `append`, the rows of new data are added to an existing store as new shards (see `append_rows`).
    `fault` is a testing hook ({"shard": i}): that shard's worker writes half its rows and is SIGKILLed.
    """
    if append and (store_path(output) / MANIFEST_FILE).exists():
        return append_rows(config, output, address, workers, progress, task, keep_operators, fault)
    if split not in ("train", "test"):
        raise StoreError(f"unknown split '{split}': use --split train or --split test")
    check_reachable(address or config.build.address or os.environ.get("RAY_ADDRESS", ""))  # before any write
    root = store_path(output)
    config = load_config(with_absolute_paths(config_to_dict(config)))  # workers (and later queries) run elsewhere
    identity = store_identity(config, split, task, resumed_basis(root))
    n_rows = identity.pop("_n_rows")
    sides = identity.pop("_normaliser"), identity.pop("_basis")
    check_not_empty(n_rows, f"the {split} split of '{config.task.dataset}'")
    with writing(root, "build", not_a_store(root)):
        return _build_leased(config, root, split, identity, n_rows, address, workers, progress, fault, task, *sides)


def resumed_basis(root) -> Basis | None:
    """The fitted projection sides of an earlier, unfinished or finished build at `root` (a resume continues with
    them rather than refitting: a refit on other hardware could differ in the last bits), else None."""
    if not (root / MANIFEST_FILE).exists() or not (root / BASIS_FILE).exists():
        return None
    try:
        return store_basis(root)
    except StoreError:  # damaged or unreadable: the build fits afresh and prepare_store compares the spec
        return None


def worker_options(config: Config, cluster_gpus: float) -> dict:
    """Ray options of a build worker (see `device_options`)."""
    return device_options(config.device, config.build.cpus_per_worker, config.build.gpus_per_worker, cluster_gpus)


def padding_fraction(reports: list[dict]) -> float:
    """Share of the batches' padded tokens that are padding (0 for tabular rows)."""
    real = sum(r.get("tokens", (0, 0))[0] for r in reports)
    padded = sum(r.get("tokens", (0, 0))[1] for r in reports)
    return 1.0 - real / padded if padded else 0.0


def _build_leased(
    config, root, split, identity, n_rows, address, workers, progress, fault, task, normaliser=None, basis=None
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
    if basis is not None:  # the sides the workers (and every query) project with
        save_basis(root, basis)
    return _compute_and_finalise(
        config, root, split, manifest, identity["model"]["fingerprint"], address, workers, progress, fault, task
    )


def _compute_and_finalise(
    config, root, split, manifest, model_fp, address, workers, progress, fault, task, source=None
) -> GradientStore:
    """Repair what verify finds, compute every shard without a marker on the worker pool, consolidate."""
    damaged = verify_store(root)  # cheap: markers, metadata files, chunk files at their written sizes
    if damaged:
        found = "; ".join(p.describe() for p in damaged)
        print(f"store '{root}': repairing what is damaged: {found}", file=sys.stderr)
        mark_for_rebuild(root, damaged)
        manifest = read_manifest(root)
    restore_array_metadata(root, manifest)  # every rows array's zarr.json, from the manifest's copies
    shards = store_shards(manifest)
    n_rows = manifest["n_rows"]
    done = done_shards(root)
    pending = [s for s in shards if s.index not in done]
    check_this_runs_data(root, manifest, pending, source)
    began = time.perf_counter()
    reports: list[dict] = []
    n_workers = min(workers or config.build.workers, len(pending)) if pending else 0
    if pending:
        with ray_session(address or config.build.address, num_cpus=max(2, n_workers)):
            reports = _run_pool(
                config,
                root,
                split,
                model_fp,
                pending,
                n_workers,
                progress,
                fault,
                initial_rows=sum(s.rows for s in shards if s.index in done),
                total_rows=n_rows,
                manifest=manifest,
                task=task,
                source=source,
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
    config, root, split, model_fp, pending, n_workers, progress, fault, initial_rows, total_rows, manifest, task, source
) -> list[dict]:
    """One GradientWorker actor per worker, one shard at a time (tdastore/distributed/pool.py)."""
    threads = max(1, int(config.build.cpus_per_worker))
    config_dict, shared = config_to_dict(config), share_task(config, task)
    options = worker_options(config, ray.cluster_resources().get("GPU", 0.0))
    table = ShardTable(root, manifest)
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
            source,
        ),
        workers=n_workers,
        max_retries=config.build.max_retries,
        describe=lambda shard: f"shard {shard.index}",
        desc=f"{'append' if source else 'build'} {split}",
        total=total_rows,
        initial=initial_rows,
        size=lambda shard: shard.rows,
        on_result=lambda shard, report: table.update(),
        progress=progress,
        unit_name="ex",
    )


def check_this_runs_data(root, manifest: dict, pending: list, source: dict | None) -> None:
    """A grown store holds rows of several data sets: refuse to recompute a shard (damaged, or never written) from
    data other than its own, naming the command whose data it is."""
    owners = {s["array"]: s.get("source") for s in segments(manifest)}
    foreign = [
        s for s in pending if not (owners[s.array] is None if source is None else same_data(owners[s.array], source))
    ]
    if foreign:
        owner = owners[foreign[0].array]
        whose = (
            "the store's own build (`tdastore build` with the store's config)"
            if owner is None
            else f"the append of {owner.get('dataset', '?')} (`tdastore build --append` with it)"
        )
        raise StoreError(
            f"store '{root}': shard(s) {[s.index for s in foreign][:10]} need recomputing but hold rows of other data "
            f"than this run's; rerun {whose} to recompute them, then this command"
        )


class ShardTable:
    """The manifest's done flags, rewritten as shards finish but at most every `every_s` seconds: markers are the
    truth (resume reads them), the table is for people, and rewriting a 10,000-shard manifest after every shard
    made a ten-million-row build quadratic in its shard count. finalize_store writes the final table."""

    def __init__(self, root, manifest: dict, every_s: float = 10.0):
        self.root, self.manifest, self.every_s, self.last = root, manifest, every_s, time.perf_counter()

    def update(self) -> None:
        if time.perf_counter() - self.last >= self.every_s:
            update_shard_table(self.root, self.manifest)
            self.last = time.perf_counter()


def append_rows(
    config: Config,
    output: str | Path,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    task: Task | None = None,
    keep_operators: bool = False,
    fault: dict | None = None,
) -> GradientStore:
    """Grow the complete store at `output` by the rows of new data, as new shards of the same spec.

    The new data is `config.task.dataset` encoded by the store's own task (the tabular task's training z-scores,
    the text task's tokeniser: exactly as the store's rows were), or, with `task=` (the Python API's objects),
    that task's examples of the store's split, whose row-number ids continue the store's. The model, gradient,
    projection and layout must be the store's (refused with the differences otherwise), and no new example id
    may already be in the store. Fitted operators are marked stale (refit on next use) unless `keep_operators`;
    indexes add the new rows on their next use. An interrupted append resumes when rerun."""
    root = store_path(output)
    check_reachable(address or config.build.address or os.environ.get("RAY_ADDRESS", ""))
    config = load_config(with_absolute_paths(config_to_dict(config)))
    with writing(root, "append", not_a_store(root)):
        manifest = read_manifest(root)
        if manifest.get("kind") is not None:
            raise StoreError(f"'{root}' is a {manifest['kind']} store: only a store from `tdastore build` grows")
        split = manifest["split"]
        new_dataset = config.task.dataset  # the config route's new data; the store's own task encodes it
        as_built = replace(config, task=load_config(manifest["config"]).task) if task is None else config
        store_task = resolve_task(as_built.task, as_built.model, task)  # built once: identity and rows share it
        identity = store_identity(as_built, split, store_task, store_basis(root), keep_basis=True)
        identity.pop("_n_rows"), identity.pop("_normaliser"), identity.pop("_basis")  # the store keeps its own
        fields = [f for f in IDENTITY_FIELDS if f != "task"]
        problems = identity_mismatches({k: manifest.get(k) for k in fields}, {k: identity[k] for k in fields})
        for key in ("name", "kind"):
            had, has = manifest["task"].get(key), identity["task"].get(key)
            problems += [f"task {key}: store has {had}, this build has {has}"] if had != has else []
        if problems:
            raise StoreError(
                f"cannot append to store '{root}': the new rows would mean something else ("
                + "; ".join(problems)
                + "); it was left unchanged. Append with the store's own config (`tdastore info` shows it) and a new "
                "--task.dataset, or build a new store"
            )
        pending = segments(manifest)[-1] if manifest["status"] != "complete" else None
        first_row = pending["start"] if pending is not None and "source" in pending else manifest["n_rows"]
        source = {"dataset": new_dataset} if task is None else {"objects": type(task).__name__, "id_offset": first_row}
        examples = source_examples(store_task, split, source)
        check_not_empty(len(examples), f"the data appended to '{root}'")
        source = {**source, "rows": len(examples), **data_digest(examples, ids=task is None)}
        if pending is not None and pending.get("source") != source:
            raise StoreError(
                f"store '{root}' is incomplete: an earlier build or append of other data did not finish; rerun that "
                "command to finish it before appending"
            )
        if pending is None:
            if any(same_data(s.get("source"), source) for s in segments(manifest)):  # e.g. a cell run twice
                print(f"store '{root}' already holds these {len(examples):,} rows: nothing appended", file=sys.stderr)
                return GradientStore(root)
            check_new_ids(GradientStore(root), examples.ids)
            stale = with_operators_stale(manifest, keep_operators)  # written with the segment, in one manifest write
            manifest = add_segment(root, stale, len(examples), identity["task"], source)
        return _compute_and_finalise(
            as_built, root, split, manifest, identity["model"]["fingerprint"], address, workers, progress, fault,
            task, source,
        )  # fmt: skip


def data_digest(examples, ids: bool) -> dict:
    """What identifies appended data: its example ids (a dataset's), or its tensors (objects, whose ids are row
    numbers and depend on where they land)."""
    if ids:
        return {"ids_sha256": hashlib.sha256(np.ascontiguousarray(examples.ids, dtype=np.int64).tobytes()).hexdigest()}
    digest = hashlib.sha256()
    for tensor in (examples.inputs, examples.targets):
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    return {"data_sha256": digest.hexdigest()}


def same_data(stored: dict | None, source: dict) -> bool:
    """Whether an appended segment's source is this data (wherever its row-number ids would start)."""
    return stored is not None and {**stored, "id_offset": 0} == {**source, "id_offset": 0}


def check_new_ids(store: GradientStore, ids: np.ndarray) -> None:
    """Refuse appended rows whose example ids repeat, or are already in the store (a row is found by its id)."""
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise StoreError(
            f"the appended data repeats example id {int(unique[counts > 1][0])}: ids must be unique; nothing was "
            "appended"
        )
    stored = store.train_ids
    clash = np.intersect1d(stored, unique)
    if len(clash):
        raise StoreError(
            f"{len(clash):,} example id(s) of the appended data are already in store '{store.root}' (e.g. "
            f"{clash[:5].tolist()}; the store's ids span {int(stored.min())}..{int(stored.max())}): give the new rows "
            "ids of their own (an `id` column, or task.id_column for tables); nothing was appended"
        )


def with_operators_stale(manifest: dict, keep: bool) -> dict:
    """Fitted operators were fitted on the old rows: marked stale (refit on next use), or kept with `keep` (the
    curvature of the old rows stands for the grown store's: an approximation the manifest records)."""
    for entry in manifest.get("preconditioners", {}).values():
        entry["stale" if not keep else "kept_over_append"] = True
    return manifest
