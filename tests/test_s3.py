"""Stores on a real S3 API: moto's server on 127.0.0.1, reached by s3fs (the client users have) through
AWS_ENDPOINT_URL (set in conftest before Ray starts, so every worker reaches the same endpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import S3_PORT, small_config

import tdastore
from tdastore.distributed.build import build_store
from tdastore.errors import StoreError
from tdastore.store.lease import Lease
from tdastore.store.location import store_path


@pytest.fixture(scope="module")
def s3():
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT)
    server.start()
    boto3.client("s3").create_bucket(Bucket="tdastore")
    yield "s3://tdastore"
    server.stop()


def entry_key(store) -> str:
    (key,) = store.manifest["preconditioners"]
    return key


def test_build_query_resume_and_lease_on_s3(ray_cluster, s3, tmp_path):
    """A Ray build straight into s3:// equals a local build byte for byte and answers the same queries (streamed,
    and from a FAISS index saved on S3 with the fitted operator); a build killed half-way on S3 resumes to the
    same store; a second writer on the same URI is refused, nothing lost."""
    config = small_config(tmp_path, projection={"kind": "gaussian", "dim": 32})
    tdastore.train(config, progress=False)
    local = build_store(config, tmp_path / "local", progress=False)
    uri = f"{s3}/store"
    built = build_store(config, uri, progress=False)
    remote = tdastore.open_store(uri)
    assert built.manifest["status"] == "complete" and str(remote.root) == uri
    np.testing.assert_array_equal(remote.read_rows(), local.read_rows())
    assert remote.meta.equals(local.meta)
    np.testing.assert_array_equal(  # the same answers, streamed from S3
        tdastore.query(remote, "if_gn", split="test", top_k=5).column("train_row").to_numpy(),
        tdastore.query(local, "if_gn", split="test", top_k=5).column("train_row").to_numpy(),
    )

    # the fitted operator and a FAISS index live beside the store on S3, and are loaded from there next time
    on_s3 = tdastore.query(remote, "if_gn", split="test", top_k=5, kind="flat")
    on_disk = tdastore.query(local, "if_gn", split="test", top_k=5, kind="flat")
    np.testing.assert_array_equal(on_s3.column("train_row").to_numpy(), on_disk.column("train_row").to_numpy())
    np.testing.assert_allclose(on_s3.column("score").to_numpy(), on_disk.column("score").to_numpy(), rtol=1e-5)
    reopened = tdastore.open_store(uri)
    (entry,) = reopened.manifest["preconditioners"].values()
    assert (reopened.root / entry["file"]).is_file() and (
        reopened.root / "indexes" / "if_gn-flat" / "index.json"
    ).is_file()
    assert "index        if_gn-flat" in reopened.summary()
    again = tdastore.Attributor(reopened, "if_gn", kind="flat")  # loaded, not refitted or rebuilt
    assert again.index.description["operator"] == entry_key(reopened)
    np.testing.assert_array_equal(again.top_k(split="test", k=5).column("train_row").to_numpy(),
                                  on_disk.column("train_row").to_numpy())  # fmt: skip

    # index shards are cached on this node under their content hash; a shard changed on S3 is refused
    import hashlib
    import os
    from pathlib import Path

    directory = reopened.root / "indexes" / "if_gn-flat"
    digests = json.loads((directory / "index.json").read_text())["shard_sha256"]
    cache = Path(os.environ["TDASTORE_CACHE"]) / "indexes"
    for name, digest in digests.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
        assert (cache / f"{digest}.faiss").is_file()
        (cache / f"{digest}.faiss").unlink()
    first = sorted(digests)[0]
    (directory / first).write_bytes((directory / first).read_bytes()[:-8])
    read_only = tdastore.Attributor(tdastore.open_store(uri), "if_gn", {"store": {"read_only": True}}, kind="flat")
    with pytest.raises(StoreError, match="does not match the hash its index.json records"):  # refused on load
        read_only.top_k(split="test", k=5)
    rebuilt = tdastore.Attributor(tdastore.open_store(uri), "if_gn", kind="flat").top_k(split="test", k=5)
    assert hashlib.sha256((directory / first).read_bytes()).hexdigest() == digests[first]  # rebuilt: the same bytes
    np.testing.assert_array_equal(rebuilt.column("train_row").to_numpy(), on_disk.column("train_row").to_numpy())

    killed = f"{s3}/killed"
    with pytest.raises(StoreError):
        build_store(config, killed, progress=False, fault={"shard": 1})
    assert tdastore.open_store(killed, allow_incomplete=True).manifest["status"] != "complete"
    resumed = build_store(config, killed, progress=False)
    np.testing.assert_array_equal(resumed.read_rows(), local.read_rows())

    # two writers started at once on a fresh URI: exactly one gets the lease (a conditional put), every time
    import threading

    for round_ in range(6):
        start, outcomes = threading.Barrier(2), []

        def contend(root=store_path(f"{s3}/race-{round_}")):
            start.wait()
            try:
                outcomes.append(Lease(root, "build").acquire())
            except StoreError as err:
                outcomes.append(err)

        threads = [threading.Thread(target=contend) for _ in range(2)]
        [t.start() for t in threads], [t.join() for t in threads]
        assert sorted(type(o).__name__ for o in outcomes) == ["Lease", "StoreError"], outcomes
        [o.release() for o in outcomes if isinstance(o, Lease)]

    holder = Lease(store_path(uri), "build").acquire()  # another build holds the URI
    try:
        with pytest.raises(StoreError, match="being written by another build"):
            build_store(config, uri, progress=False)
    finally:
        holder.release()
    np.testing.assert_array_equal(tdastore.open_store(uri).read_rows(), local.read_rows())


def test_gold_standard_and_evaluation_on_s3(ray_cluster, s3, tmp_path):
    """The gold standard's, LDS's and metagradients' job stores and the evaluation's outputs at s3:// URIs: the
    arrays equal a local run's byte for byte, a unit killed part way resumes, and the report lands on S3."""
    import zarr

    from tdastore.evaluate.run import evaluate
    from tdastore.groundtruth.lds import run_lds
    from tdastore.groundtruth.metagrad_pool import run_metagrad
    from tdastore.groundtruth.pool import run_groundtruth
    from tdastore.store.location import zarr_store

    gt = {"epochs": 2, "eval_every": 1, "lr": 0.01, "batch_size": 64, "seeds": 2, "seed_block": 1,
          "left_out_count": 4, "left_out_block": 4, "test_points": 5, "output": str(tmp_path / "gt")}  # fmt: skip
    lds, metagrad = {"subsets": 4, "fraction": 0.5, "seeds": 2, "subset_block": 2}, {"seeds": 1, "test_block": 3}
    config = small_config(tmp_path, model={"hidden": [16]}, groundtruth=gt, lds=lds, metagrad=metagrad)
    tdastore.train(config, progress=False)
    local = run_groundtruth(config, progress=False)
    raw = tdastore.config.config_to_dict(config)
    remote_config = tdastore.load_config({**raw, "groundtruth": {**raw["groundtruth"], "output": f"{s3}/gt"}})
    with pytest.raises(StoreError, match="rerun the same command to resume"):
        run_groundtruth(remote_config, progress=False, fault={"unit": "0001-0000"}, max_retries=0)
    remote = run_groundtruth(remote_config, progress=False)
    assert str(remote) == f"{s3}/gt"
    for name in ("loo.zarr", "full.zarr"):
        here = zarr.open_array(str(local / name), mode="r")[:]
        there = zarr.open_array(store=zarr_store(remote / name, read_only=True), mode="r")[:]
        np.testing.assert_array_equal(there, here)
    # the LDS and metagradient job stores beside the ground truth on S3: the same arrays as beside a local one
    for run, names in ((run_lds, ("subsets.zarr", "full.zarr")), (run_metagrad, ("scores.zarr",))):
        here, there = run(config, local, progress=False), run(remote_config, remote, progress=False)
        assert str(there).startswith(f"{s3}/gt/")
        for name in names:
            np.testing.assert_array_equal(
                zarr.open_array(store=zarr_store(there / name, read_only=True), mode="r")[:],
                zarr.open_array(str(here / name), mode="r")[:],
            )
    store = build_store(config, tmp_path / "store", progress=False)
    results = evaluate(store, f"{s3}/gt", methods=["grad_dot"], out=f"{s3}/evaluation", progress=False)
    expected = evaluate(store, local, methods=["grad_dot"], progress=False)
    assert results["methods"]["grad_dot"]["cosine"] == expected["methods"]["grad_dot"]["cosine"]
    for name in ("report.md", "results.json", "cosine.png"):
        assert (store_path(f"{s3}/evaluation") / name).is_file()


TWO_NODES = """
import json, sys
import ray

import tdastore
from tdastore.distributed.build import build_store
from tdastore.groundtruth.pool import run_groundtruth

config_path, uri, address = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address=address, log_to_driver=False)
config = tdastore.load_config(config_path)
store = build_store(config, uri, progress=False)
gt = run_groundtruth(config, progress=False)  # its job store on S3 too (groundtruth.output)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"nodes": len(nodes), "status": store.manifest["status"], "gt": str(gt)}))
"""


def start_node(temp_dir: str, head: str | None = None) -> str:
    """`ray start` on 127.0.0.1 with one CPU, its own temp dir and its own ports (a head when `head` is None,
    else a node joining it); returns the head's address."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_ports

    ports = free_ports(8)
    low = 20000 + (ports[7] % 200) * 100  # a worker-port range of its own
    args = [str(Path(sys.executable).parent / "ray"), "start", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}", f"--metrics-export-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}", f"--min-worker-port={low}",
            f"--max-worker-port={low + 99}"]  # fmt: skip
    if head is None:
        args += ["--head", f"--port={ports[6]}", "--include-dashboard=false"]
    else:
        args += [f"--address={head}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # 1: nodes may join
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return head or f"127.0.0.1:{ports[6]}"


def test_two_node_cluster_builds_into_s3(s3, tmp_path):
    """A head and a second node, each started by `ray start` with its own temp dir and one CPU (so Ray must place
    the two workers on different nodes), build into s3:// and run the gold standard into s3:// with nothing
    else shared; both equal local runs byte for byte."""
    import json
    import shutil
    import subprocess
    import sys
    import uuid

    import yaml
    from test_jobs import stop_head

    uri = f"{s3}/two-nodes"
    gt = {"epochs": 2, "eval_every": 1, "lr": 0.01, "batch_size": 64, "seeds": 2, "seed_block": 1, "workers": 2,
          "left_out_count": 4, "left_out_block": 4, "test_points": 5, "output": f"{uri}/gt"}  # fmt: skip
    config = small_config(tmp_path, projection={"kind": "gaussian", "dim": 32}, groundtruth=gt)
    tdastore.train(config, progress=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tdastore.config.config_to_dict(config)))
    temp_dirs = [f"/tmp/tdastore-node-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        address = start_node(temp_dirs[0])
        start_node(temp_dirs[1], head=address)
        command = [sys.executable, "-c", TWO_NODES, str(path), uri, address]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        for temp_dir in temp_dirs[::-1]:
            stop_head(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"nodes": 2, "status": "complete", "gt": f"{uri}/gt"}
    local = tdastore.open_store(tdastore.build(config, tmp_path / "local", progress=False).root)
    remote = tdastore.open_store(uri)
    np.testing.assert_array_equal(remote.read_rows(), local.read_rows())
    assert remote.meta.drop_columns(["shard"]).equals(local.meta.drop_columns(["shard"]))
    # the gold standard run by the two nodes into S3 equals one run here into a local directory
    import zarr

    from tdastore.groundtruth.pool import run_groundtruth
    from tdastore.store.location import zarr_store

    raw = tdastore.config.config_to_dict(config)
    here = run_groundtruth(tdastore.load_config({**raw, "groundtruth": {**gt, "output": str(tmp_path / "gt")}}),
                           progress=False)  # fmt: skip
    for name in ("loo.zarr", "full.zarr"):
        np.testing.assert_array_equal(
            zarr.open_array(store=zarr_store(store_path(f"{uri}/gt/{name}"), read_only=True), mode="r")[:],
            zarr.open_array(str(here / name), mode="r")[:],
        )


def test_query_service_over_a_store_on_s3(ray_cluster, serve_url, s3, tmp_path):
    """The Serve replicas open a store that lives only on S3 (its fitted operator and index saved there by the
    driver, the index shards fetched into the node cache): the answers equal the façade's on a local copy."""
    from test_serve import assert_same_answers, deploy, post, raw_test_rows

    from tdastore.serve import application

    config = small_config(tmp_path, projection={"kind": "gaussian", "dim": 32})
    tdastore.train(config, progress=False)
    uri = f"{s3}/served"
    build_store(config, uri, progress=False)
    local = build_store(config, tmp_path / "local", progress=False)
    url = deploy(serve_url, application(uri, methods=["if_gn"]), "s3")
    inputs, targets, _ = raw_test_rows(local, 3)
    status, body = post(url, {"method": "if_gn", "inputs": inputs, "targets": targets, "top_k": 4, "bottom_k": 2})
    assert status == 200, body
    assert_same_answers(body, local, "if_gn", 4, 2, 3)
    assert (store_path(uri) / "indexes" / "if_gn-flat" / "index.json").is_file()
    from ray import serve

    serve.delete("s3")
