"""The Ray build: rows equal direct computation, crashes resume to an identical store, bad input is refused."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from helpers import check_store_matches, flatten
from test_factored import reference_rows

import tdastore
from tdastore.cli import main as cli_main
from tdastore.distributed.build import build_store
from tdastore.errors import GradientError, StoreError
from tdastore.grads.factored import FactoredLinearGradients
from tdastore.grads.per_example import PerExampleGradients
from tdastore.grads.projection import make_projector
from tdastore.tasks import TabularTask
from tdastore.training import load_model


def direct_rows(config, split="train"):
    """The reference: per-example gradients of the whole split in one call, projected, no Ray, no store."""
    task = TabularTask(config.task, config.model)
    model = load_model(config, task)
    fn = task.per_example_loss if split == "train" else task.test_function
    pe = PerExampleGradients(model, fn, config.gradients.params)
    data = task.examples(split)
    grads, losses = pe(data.inputs, data.targets)
    if config.projection.kind == "factored":  # same side matrices, applied to the dense gradients
        fac = FactoredLinearGradients(model, fn, config.gradients.params, config.projection)
        rows = reference_rows(model, fn, data.inputs, data.targets, fac)[0]
    else:
        rows = make_projector(config.projection, pe.shapes).project(grads)
    return rows.numpy(), losses.numpy(), flatten(pe, grads).norm(dim=1).numpy(), data


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    "projection, dtype, tol",
    [
        ({"kind": "none"}, "float32", 1e-5),
        ({"kind": "sparse", "dim": 256, "nonzeros": 4}, "float16", 2e-3),
        ({"kind": "factored", "factors": [8, 8]}, "float32", 1e-5),
    ],
)
def test_store_round_trip(ray_cluster, tmp_path, trained_config, projection, dtype, tol):
    config = small_config(tmp_path, projection=projection, store={"dtype": dtype})
    store = build_store(config, tmp_path / "store", progress=False)
    expected, losses, norms, data = direct_rows(config)
    assert store.grads.shape == expected.shape and store.grads.dtype == np.dtype(dtype)
    got = store.read_rows()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= tol * scale
    meta = store.meta
    assert meta.column_names[:6] == ["example_id", "row", "label", "loss", "grad_norm", "shard"]
    np.testing.assert_array_equal(meta.column("example_id").to_numpy(), data.ids)
    np.testing.assert_array_equal(meta.column("row").to_numpy(), np.arange(len(data)))
    np.testing.assert_allclose(meta.column("label").to_numpy(), data.labels)
    np.testing.assert_allclose(meta.column("loss").to_numpy(), losses, rtol=1e-5)
    np.testing.assert_allclose(meta.column("grad_norm").to_numpy(), norms, rtol=1e-4)
    assert sorted(set(meta.column("shard").to_pylist())) == list(range(len(store.manifest["shards"])))
    m = tdastore.open_store(tmp_path / "store").manifest
    assert m["status"] == "complete" and m["n_rows"] == len(data) and m["projection"]["kind"] == projection["kind"]
    assert m["model"]["fingerprint"] and m["task"]["fingerprint"] and all(s["done"] for s in m["shards"])
    blocks = list(store.iter_blocks(block_rows=100))
    assert [b[0] for b in blocks] == list(range(0, len(data), 96))  # whole chunks of 32
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), got)


def test_test_split_store(ray_cluster, tmp_path, trained_config):
    store = build_store(trained_config, tmp_path / "test_store", split="test", progress=False)
    expected, _, _, data = direct_rows(trained_config, "test")
    assert store.manifest["split"] == "test" and store.manifest["gradients"]["function"] == "test_function"
    np.testing.assert_allclose(store.read_rows(), expected, atol=1e-6)


def uninterrupted(tmp_path, config):
    return build_store(config, tmp_path / "reference", progress=False)


def assert_same_store(a, b):
    np.testing.assert_array_equal(a.read_rows(), b.read_rows())
    assert a.meta.equals(b.meta)
    assert a.manifest["shards"] == b.manifest["shards"]


def test_killed_worker_then_rerun_resumes_to_identical_store(ray_cluster, tmp_path, trained_config):
    reference = uninterrupted(tmp_path, trained_config)
    target = tmp_path / "store"
    with pytest.raises(StoreError, match="rerun the same command to resume"):
        build_store(trained_config, target, progress=False, fault={"shard": 2})  # max_retries = 0
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["status"] == "building" and not (target / "meta.parquet").exists()
    assert not (target / "shards" / "000002.done").exists()
    with pytest.raises(StoreError, match="incomplete"):
        tdastore.open_store(target)
    partial = tdastore.open_store(target, allow_incomplete=True)
    half = reference.read_rows(128, 160)
    np.testing.assert_array_equal(partial.read_rows(128, 160), half)  # the crash wrote half of shard 2 ...
    done_before = {p.name: p.stat().st_mtime_ns for p in (target / "shards").glob("*.done")}
    resumed = build_store(trained_config, target, progress=False)
    assert_same_store(resumed, reference)
    for name, mtime in done_before.items():  # ... and shards done before the crash were not recomputed
        assert (target / "shards" / name).stat().st_mtime_ns == mtime
    assert resumed.manifest["summary"]["rows_computed"] < resumed.n_rows


def test_killed_worker_is_retried_within_one_build(ray_cluster, tmp_path, trained_config):
    reference = uninterrupted(tmp_path, trained_config)
    config = small_config(tmp_path, build={"max_retries": 1})
    store = build_store(config, tmp_path / "store", progress=False, fault={"shard": 1})
    assert (tmp_path / "store" / ".fault-fired").exists()
    assert_same_store(store, reference)


def test_store_with_other_model_or_projection_is_refused_and_intact(ray_cluster, tmp_path, trained_config):
    root = tmp_path / "store"
    build_store(trained_config, root, progress=False)
    before = tree_digest(root)
    other_projection = small_config(tmp_path, projection={"kind": "gaussian", "dim": 64})
    with pytest.raises(StoreError, match="projection: store has"):
        build_store(other_projection, root, progress=False)
    other_model = small_config(tmp_path, train={"epochs": 6, "output_dir": str(tmp_path / "model2")})
    tdastore.train(other_model, progress=False)
    with pytest.raises(StoreError, match="model: store has"):
        build_store(other_model, root, progress=False)
    with pytest.raises(StoreError, match="split: store has"):
        build_store(trained_config, root, split="test", progress=False)
    assert tree_digest(root) == before
    with pytest.raises(StoreError, match="model"):
        check_store_matches(tdastore.open_store(root), {"model": {"fingerprint": "0000"}})


def test_directories_that_are_not_stores(tmp_path, trained_config):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StoreError, match="is not a tdastore store"):
        tdastore.open_store(folder)
    with pytest.raises(StoreError, match="not empty and is not a tdastore store"):
        build_store(trained_config, folder, progress=False)
    assert (folder / "cat.jpg").read_bytes() == b"meow" and len(list(folder.iterdir())) == 1
    with pytest.raises(StoreError, match="does not exist"):
        tdastore.open_store(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        tdastore.open_store(corrupt)
    (corrupt / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(StoreError, match="schema version 99"):
        tdastore.open_store(corrupt)


def test_nan_weights_give_a_clear_error(ray_cluster, tmp_path, trained_config):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model" / "model.safetensors"
    state = load_file(str(path))
    state["2.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(GradientError, match="NaN/Inf"):
        build_store(trained_config, tmp_path / "store", progress=False)


def test_float16_overflow_is_refused(ray_cluster, tmp_path, trained_config):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model" / "model.safetensors"
    state = load_file(str(path))
    state["4.weight"] *= 1e4  # losses ~1e8 stay finite in fp32, gradients overflow fp16
    save_file(state, str(path))
    config = small_config(tmp_path, store={"dtype": "float16"})
    with pytest.raises(GradientError, match="float32"):
        build_store(config, tmp_path / "store", progress=False)


def test_cli_train_build_info(ray_cluster, tmp_path, capsys):
    import yaml

    config = small_config(tmp_path)
    path = tmp_path / "cfg.yaml"
    tdastore.config.save_config(config, path)
    assert cli_main(["train", "--config", str(path), "--quiet"]) == 0
    assert cli_main(["build", "--config", str(path), "--output", str(tmp_path / "s"), "--quiet", "--workers", "1"]) == 0
    assert cli_main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "status       complete" in out and "[353, 1,441] float32" in out
    assert "modules      0, 2, 4 (3 modules)" in out  # the MLP's three Linear layers
    raw = yaml.safe_load(path.read_text())
    raw["train"]["epoch"] = 3
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["build", "--config", str(path), "--output", str(tmp_path / "s2")]) == 2
    assert "unknown config key(s) ['epoch']" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "build", "info"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: tdastore" in capsys.readouterr().out


def test_one_writer_per_output(tmp_path, trained_config):
    """A second job on a held output is refused with the holder named; a dead holder's lease is taken over."""
    import json as _json
    import subprocess

    from tdastore.store.lease import LEASE_FILE, Lease

    root = tmp_path / "out"
    with Lease(root, "build"):
        with pytest.raises(StoreError, match=r"being written by another build \(.*pid"):
            build_store(trained_config, root, progress=False)
        with pytest.raises(StoreError, match="being written by another build"):
            Lease(root, "ground truth").acquire()
    assert not (root / LEASE_FILE).exists()  # released on exit
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process that has exited: its lease is stale
    lease = Lease(root, "build")
    (root / LEASE_FILE).write_text(_json.dumps({**lease._record(), "pid": dead.pid, "token": "old"}))
    with lease:
        assert _json.loads((root / LEASE_FILE).read_text())["token"] == lease.token
    old = Lease(root, "build", timeout_s=60)
    (root / LEASE_FILE).write_text(_json.dumps({**old._record(), "host": "elsewhere", "heartbeat": 0, "token": "x"}))
    with Lease(root, "build"):  # a holder on another node whose heartbeat stopped
        pass
    future = {**old._record(), "host": "elsewhere", "heartbeat": old._record()["heartbeat"] + 28 * 3600}
    for text, words in (  # the cases: refused with the file's path and the fix, never taken over silently
        (_json.dumps(future), r"heartbeat 1008\d\d s in the future .*delete '.*\.lease' and rerun"),
        ("{not json", r"lease file '.*\.lease' is unreadable \(damaged\).*delete '.*\.lease' and rerun"),
        (_json.dumps({**old._record(), "heartbeat": "soon"}), "is unreadable"),
    ):
        (root / LEASE_FILE).write_text(text)
        with pytest.raises(StoreError, match=words):
            Lease(root, "build").acquire()
        assert (root / LEASE_FILE).read_text() == text
    (root / LEASE_FILE).write_text(_json.dumps({**future, "host": old._record()["host"], "pid": dead.pid}))
    with Lease(root, "build"):  # a future heartbeat of a process that has exited here: stale all the same
        pass
    (tmp_path / "store.txt").write_text("someone's file")
    with pytest.raises(StoreError, match="is a file"):
        build_store(trained_config, tmp_path / "store.txt")
    assert (tmp_path / "store.txt").read_text() == "someone's file"


def store_bytes(root: Path) -> dict[str, bytes]:
    """The gradient chunks and consolidated metadata, byte for byte."""
    files = [p for p in (root / "grads.zarr" / "c").rglob("*") if p.is_file()] + [root / "meta.parquet"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_damage_is_found_by_verify_and_repaired_exactly(ray_cluster, tmp_path, trained_config):
    """Truncated chunk, flipped byte, deleted or flipped shard metadata with a truncated meta.parquet, deleted
    marker, a marker whose chunk key leaves the store, a deleted zarr.json: a read is refused, verify names the
    damage, the next build recomputes exactly the damaged shard (none for the store's own files), and the store
    is byte-identical to a clean build."""
    import json as _json
    import shutil

    from tdastore.cli import main

    clean = store_bytes(uninterrupted(tmp_path, trained_config).root)
    root = tmp_path / "store"
    build_store(trained_config, root, progress=False)
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine)

    def truncate(r):
        path = r / "grads.zarr" / "c" / "2" / "0"
        path.write_bytes(path.read_bytes()[:100])

    def flip(r, path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def metadata(r):  # the case: a corrupt shard metadata file and a truncated meta.parquet
        flip(r, r / "shards" / "000003.parquet")
        (r / "meta.parquet").write_bytes((r / "meta.parquet").read_bytes()[:300])

    def escape(r):  # a marker whose chunk key leaves the store: damage, never a path to open
        marker = _json.loads((r / "shards" / "000005.done").read_text())
        marker["chunks"] = {"../../../../../etc/hostname": [10, 0]}
        (r / "shards" / "000005.done").write_text(_json.dumps(marker))

    cases = [  # (damage, shard, found by the build's cheap check, rows whose read is refused)
        (truncate, 1, True, (64, 96)),
        (lambda r: flip(r, r / "grads.zarr" / "c" / "4" / "0"), 2, False, (128, 160)),
        (lambda r: (r / "shards" / "000003.parquet").unlink(), 3, True, None),
        (metadata, 3, True, None),
        (lambda r: (r / "shards" / "000004.done").unlink(), 4, True, None),
        (escape, 5, True, None),
        (lambda r: (r / "grads.zarr" / "zarr.json").unlink(), None, True, None),
    ]
    for damage, shard, cheap, refused in cases:
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        damage(root)
        if refused:  # every chunk's crc32c is checked on read: never a number from a damaged chunk
            with pytest.raises(StoreError, match=rf"rows {refused[0]}\.\.{refused[1]} cannot be read.*tdastore verify"):
                tdastore.open_store(root).read_rows(*refused)
        if cheap:
            assert main(["verify", str(root)]) == 2
        found_once = cheap and shard is not None  # a shard's damage is marked once; a lost zarr.json stays lost
        assert main(["verify", str(root), "--deep"]) == (0 if found_once else 2)  # until the build restores it
        with pytest.raises(StoreError, match="incomplete"):
            tdastore.open_store(root)
        before = {p.name: p.stat().st_mtime_ns for p in (root / "shards").glob("*.done")}
        store = build_store(trained_config, root, progress=False)
        rows = 0 if shard is None else min(64, store.n_rows - 64 * shard)  # exactly the damaged shard's rows
        assert store.manifest["summary"]["rows_computed"] == rows
        recomputed = {p.name for p in (root / "shards").glob("*.done")} - set(before)
        assert recomputed == (set() if shard is None else {f"{shard:06d}.done"})
        assert store_bytes(root) == clean
        assert main(["verify", str(root), "--deep"]) == 0


def test_damaged_operators_and_indexes_are_found_refused_and_refitted_exactly(ray_cluster, tmp_path, trained_config):
    """A flipped byte in a fitted operator and in an index shard: a read-only reader refuses each, a writable one
    refits it (same answers), verify names both and drops them without touching the rows, and `tdastore index`
    refits them byte for byte."""
    import dataclasses

    from tdastore.cli import main

    config = dataclasses.replace(trained_config, projection=dataclasses.replace(trained_config.projection,
                                 kind="gaussian", dim=32))  # fmt: skip
    store = build_store(config, tmp_path / "store", progress=False)
    root = store.root
    test = tdastore.Attributor(store, "if_gn").task.examples("test").slice(0, 4)
    expected = tdastore.Attributor(store, "if_gn", kind="flat").top_k(test, 5)
    operator = next((root / "precond").glob("*.npz"))
    shard = root / "indexes" / "if_gn-flat" / "shard-0000.faiss"
    originals = {operator: operator.read_bytes(), shard: shard.read_bytes()}
    read_only = {"store": {"read_only": True}}

    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    flip(shard)
    with pytest.raises(StoreError, match="index shard .* does not match the hash its index.json records"):
        tdastore.Attributor(tdastore.open_store(root), "if_gn", read_only, kind="flat").top_k(test, 5)  # on load
    flip(operator)
    with pytest.raises(StoreError, match="operator .* does not match its checksum"):
        tdastore.Attributor(tdastore.open_store(root), "if_gn", read_only)
    assert operator.read_bytes() != originals[operator]  # a read-only reader leaves them as it found them
    repaired = tdastore.Attributor(tdastore.open_store(root), "if_gn", kind="flat").top_k(test, 5)  # refits both
    assert repaired.equals(expected)
    assert all(path.read_bytes() == data for path, data in originals.items())
    flip(operator)
    flip(shard)
    chunks = store_bytes(root)
    assert main(["verify", str(root)]) == 2
    assert main(["verify", str(root)]) == 0  # both dropped from the manifest, the store still complete
    assert not operator.exists() and not shard.exists() and store_bytes(root) == chunks
    assert main(["index", str(root), "--method", "if_gn", "--quiet"]) == 0
    assert all(path.read_bytes() == data for path, data in originals.items())
    assert main(["verify", str(root), "--deep"]) == 0


def test_two_builds_into_one_output_at_once(ray_cluster, tmp_path, trained_config):
    """The second build is refused with the first's lease holder named; the first finishes untouched."""
    import threading
    import time

    root = tmp_path / "store"
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(store=build_store(trained_config, root, progress=False)))
    thread.start()
    while not (root / ".lease").exists() and thread.is_alive():
        time.sleep(0.01)
    with pytest.raises(StoreError, match=r"being written by another build \(.* pid \d+"):
        build_store(trained_config, root, progress=False)
    thread.join()
    assert_same_store(first["store"], uninterrupted(tmp_path, trained_config))
    assert not (root / ".lease").exists()


def test_plan_predicts_the_store_and_measures_the_rest(ray_cluster, tmp_path, trained_config, capsys):
    from tdastore.plan import plan_build

    plan = plan_build(trained_config)
    store = build_store(trained_config, tmp_path / "store", progress=False)
    assert (plan.rows, plan.row_columns) == (store.n_rows, store.dim) == (353, 1441)
    assert plan.row_bytes == 1441 * 4 and plan.store_bytes == 353 * 1441 * 4
    assert plan.shard_buffer_bytes == trained_config.store.shard_rows * 1441 * 4
    assert plan.examples_per_s > 0 and plan.worker_bytes > plan.process_bytes > 0
    assert plan.build_seconds == pytest.approx(353 / (plan.examples_per_s * trained_config.build.workers))
    assert plan.ray_seconds > 0 and plan.model_seconds > 0  # a worker started and the model loaded, measured
    assert plan.total_seconds == pytest.approx(plan.ray_seconds + plan.model_seconds + plan.build_seconds)
    path = tmp_path / "cfg.yaml"
    tdastore.config.save_config(trained_config, path)
    assert cli_main(["plan", "--config", str(path), "--workers", "4"]) == 0
    out = capsys.readouterr().out
    assert "353 x 1,441 columns" in out and "on 4 worker(s)" in out and "fixed costs" in out

    from tdastore.plan import plan_queries

    queries = plan_queries(trained_config, store.n_rows, store.dim, index_shards=2)
    for kind in ("flat", "ivf", "pq", "hnsw", "sq8"):  # the sizes FAISS writes, within 10%
        tdastore.Attributor(store, "grad_dot", kind=kind)
        written = sum(p.stat().st_size for p in (store.root / "indexes" / f"grad_dot-{kind}").glob("*.faiss"))
        assert queries.index_bytes[kind] == pytest.approx(written, rel=0.1), kind
    assert queries.replica_bytes("ivf") == queries.process_bytes + queries.index_bytes["ivf"] // 2
    assert queries.pass_bytes == 353 * 1441 * 4 and queries.stream_bytes_per_s > 0
    assert cli_main(["plan", "--config", str(path), "--rows", "10000000", "--index-shards", "2"]) == 0
    assert "10,000,000 rows x 1,441 columns" in capsys.readouterr().out


def test_devices_and_gpu_requests(ray_cluster, tmp_path, trained_config):
    """`device` resolves here (CPU only) or is refused clearly; GPU workers are requested from Ray exactly
    when the device is CUDA (checked on the actor options, without a GPU); device cpu builds as before."""
    import torch

    from tdastore.config import load_config
    from tdastore.devices import resolve_device
    from tdastore.distributed.build import worker_options
    from tdastore.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad, words in (("tpu", "not one of"), ("cuda:x", "not one of"), ("cpu:1", "not one of")):
        with pytest.raises(ConfigError, match=words):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device here"):
            resolve_device("cuda:0")

    def config(device, gpus=1.0):
        raw = tdastore.config.config_to_dict(trained_config)
        return load_config({**raw, "device": device, "build": {**raw["build"], "gpus_per_worker": gpus}})

    assert worker_options(config("cuda"), 4)["num_gpus"] == 1.0
    assert worker_options(config("cuda:1", 0.25), 4)["num_gpus"] == 0.25
    assert worker_options(config("auto"), 2)["num_gpus"] == 1.0
    assert "num_gpus" not in worker_options(config("auto"), 0)
    assert "num_gpus" not in worker_options(config("cpu"), 8)
    with pytest.raises(ConfigError, match="the Ray cluster has no GPUs"):
        worker_options(config("cuda"), 0)
    with pytest.raises(ConfigError, match="device"):
        config("gpu")
    cpu = build_store(config("cpu"), tmp_path / "cpu", progress=False)
    np.testing.assert_array_equal(cpu.read_rows(), uninterrupted(tmp_path, trained_config).read_rows())


def test_builds_under_one_and_two_threads_are_byte_identical(ray_cluster, tmp_path):
    """The bitwise claim on any CPU: workers of 1 thread and of 2 (and this process, with 1) write the same
    bytes. Without MKL's strict reproducible mode the Gaussian projection's product differed in its last bits
    between 1 and 2 threads on CPUs with AVX-512 (tdastore.devices.reproducible_cpu_products)."""
    import torch

    from tdastore.distributed.gradient_worker import ShardComputer
    from tdastore.store.writer import Shard

    spec = {"projection": {"kind": "gaussian", "dim": 96}, "gradients": {"batch_size": 353}}
    config = small_config(tmp_path, **spec)
    tdastore.train(config, progress=False)
    one = build_store(config, tmp_path / "one", progress=False)  # 2 workers x 1 thread
    two_config = small_config(tmp_path, **spec, build={"workers": 1, "cpus_per_worker": 2})
    two = build_store(two_config, tmp_path / "two", progress=False)  # 1 worker x 2 threads
    assert store_bytes(one.root) == store_bytes(two.root)  # chunks and consolidated metadata
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rows, _ = ShardComputer(config, "train").compute(Shard(0, 0, one.n_rows))
    finally:
        torch.set_num_threads(threads)
    assert rows.tobytes() == one.read_rows().tobytes()


def test_strict_reproducible_products_are_on():
    """tdastore's import set MKL's strict mode (and the environment Ray workers inherit): a product whose last
    bits depend on the thread count on AVX-512 CPUs without it gives the same bytes under 1 and 2 threads."""
    import os

    import torch

    from tdastore.devices import STRICT_PRODUCTS, reproducible_cpu_products

    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    assert reproducible_cpu_products() and os.environ["MKL_CBWR"] == STRICT_PRODUCTS
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 1024, generator=generator), torch.randn(1024, 256, generator=generator)
    threads = torch.get_num_threads()
    products = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            products.append((a @ b).numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert products[0] == products[1]


def test_a_product_before_import_is_warned_about():
    """MKL fixes its mode at its first product: one run before tdastore's import is named, with the fix."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = "import torch; torch.ones(4, 4) @ torch.ones(4, 4); import tdastore"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MKL_CBWR=AUTO,STRICT" in done.stderr
    clean = subprocess.run([sys.executable, "-c", "import tdastore"], env=env, capture_output=True, text=True)
    assert clean.returncode == 0 and "MKL_CBWR" not in clean.stderr


def test_a_local_cluster_runs_its_workers_at_the_drivers_priority():
    """Ray's default starts workers at nice 15, behind every other process on the machine."""
    import os
    import subprocess
    import sys

    code = (
        "import os, ray\nfrom tdastore.distributed.ray_session import ray_session\n"
        "with ray_session(num_cpus=1):\n    print('worker nice', ray.get(ray.remote(lambda: os.nice(0)).remote()))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"worker nice {os.nice(0)}" in done.stdout


def test_sigterm_stops_a_job_between_units_with_a_resume_hint(tmp_path):
    """SIGTERM to a running `tdastore ground-truth` (a scheduler's stop): exit 143, one line naming how far it
    got and how to resume, no traceback and no Ray stack lines."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    settings = {
        "task": {"dataset": "diabetes"}, "model": {"hidden": [16]},
        "train": {"epochs": 2, "output_dir": str(tmp_path / "model")},
        "groundtruth": {"lr": 0.01, "batch_size": 32, "epochs": 30, "eval_every": 10, "seeds": 20, "seed_block": 1,
                        "left_out_count": 20, "left_out_block": 2, "test_points": 8, "workers": 1,
                        "output": str(tmp_path / "gt")},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    cli = [sys.executable, "-m", "tdastore"]
    subprocess.run([*cli, "train", "--config", str(tmp_path / "c.yaml"), "--quiet"], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    err = tmp_path / "err.txt"
    with err.open("w") as stderr:
        job = subprocess.Popen([*cli, "ground-truth", "--config", str(tmp_path / "c.yaml")], stderr=stderr, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and "units done" not in err.read_text() and "/200 [" not in err.read_text():
            time.sleep(0.5)
        time.sleep(1.0)
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=60)
    text = err.read_text()
    assert code == 143, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted at 'ground truth' with ") and "rerun the same command to resume" in last
    assert "Traceback" not in text and "logging.cc" not in text
