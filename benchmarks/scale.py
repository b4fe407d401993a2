"""Ten million rows (issue 23): a store, its indexes and the query service at the scale users index, measured at
several row counts in one run on this machine.

The data: a regression MLP (32 features -> 64 -> 64 -> 1, 6,401 parameters, trained here for 300 Adam steps)
over generated rows, projected by a Gaussian matrix to 256 columns, float16 on disk. Each row is generated from
its own id (seeded per 4,096-row block), so neither the driver nor a worker ever holds the data set: a worker
materialises one shard at a time, as a text store's memory-mapped token table does; everything after that
(actors, shards, markers, manifest, meta.parquet, Zarr chunks, indexes, queries, the service) is the code a
text store runs. Cheap enough for 10^7 per-example gradients on 2 cores.

Per row count N, in a fresh process (so its peak RSS is its own):
  build      rows/s of `tdastore.build` (2 Ray workers), driver and worker peak RSS, manifest size
  open       open_store + the first block, and the first exact query (train ids read)
  stream     a full `iter_blocks` pass (float16 -> float32) against reading the same chunk files raw, both
             with the files evicted from the page cache first (posix_fadvise DONTNEED)
  indexes    build seconds and peak RSS per kind, recall@10 against exact streamed top-10 for Q queries,
             single-query p50/p99 (gradient + search) and batch-of-256 queries/s, in process
  serve      through the query service with --index-shards 2: p50 of one query, same hits as in process

    python benchmarks/scale.py --rows 100000 1000000 10000000 [--kinds flat ivf pq hnsw] [--queries 1000]
    python benchmarks/scale.py --s3 --rows 1000000 --work DIR   # that store on a local S3 endpoint vs the disk
    python benchmarks/scale.py --plot benchmarks/results/scale.json   # latency and recall against rows

Results go to benchmarks/results/scale.json (one entry per N, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # `scale:GeneratedTask`, for Ray workers and replicas too
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))

import numpy as np
import torch

FEATURES, HIDDEN, BLOCK = 32, 64, 4096
RESULTS = Path(__file__).parent / "results" / "scale.json"


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, 1),
    )  # fmt: skip


def generated_block(seed: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [block * BLOCK, (block + 1) * BLOCK) of data set `seed`: x [BLOCK, F], y [BLOCK]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + block)
    x = torch.randn(BLOCK, FEATURES, generator=g)
    w = torch.linspace(-1, 1, FEATURES)
    y = torch.tanh(x @ w / 3) * 2 + x[:, 0] * x[:, 1] / 2 + 0.3 * torch.randn(BLOCK, generator=g)
    return x, y


class GeneratedRows:
    """N rows generated from their ids on demand (slice / take materialise only what is asked for)."""

    padded, texts = False, None

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed

    def __len__(self) -> int:
        return self.n_rows

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.n_rows, dtype=np.int64)

    def take(self, rows):
        rows = np.arange(self.n_rows)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        x, y = torch.empty(len(rows), FEATURES), torch.empty(len(rows))
        blocks = rows // BLOCK
        for block in np.unique(blocks):
            where = np.nonzero(blocks == block)[0]
            bx, by = generated_block(self.seed, int(block))
            x[where], y[where] = bx[rows[where] % BLOCK], by[rows[where] % BLOCK]
        return Examples(x, y, rows.astype(np.int64), y.numpy().astype(np.float64))

    def slice(self, start: int, stop: int):
        return self.take(np.arange(start, stop))


def train_weights(path: Path) -> None:
    model = make_mlp()
    data = GeneratedRows(20_000, seed=7).slice(0, 20_000)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        index = torch.randint(0, 20_000, (256,), generator=torch.Generator().manual_seed(step))
        loss = ((model(data.inputs[index]).squeeze(-1) - data.targets[index]) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(model.state_dict(), path)


from tdastore.tasks.base import Examples, Task  # noqa: E402


class GeneratedTask(Task):
    """A regression MLP over generated rows (see the module docstring); `task.class: scale:GeneratedTask`, its
    `task.dataset` "ROWS:TEST_ROWS:WEIGHTS" (so a store's config rebuilds it: queries, the service)."""

    name, pretrained = "generated", True

    def __init__(self, task_config, model_config=None):
        rows, test_rows, self.weights = str(task_config.dataset).split(":", 2)
        self.rows, self.test_rows = int(rows), int(test_rows)
        self.train = GeneratedRows(self.rows, seed=0)
        self.test = GeneratedRows(self.test_rows, seed=1).slice(0, self.test_rows)

    def make_model(self):
        model = make_mlp()
        model.load_state_dict(torch.load(self.weights))
        return model

    def per_example_loss(self, outputs, targets):
        return (outputs.squeeze(-1) - targets) ** 2

    def examples(self, split):
        return self.train if split == "train" else self.test

    def description(self):
        return {"name": self.name, "kind": "regression", "rows": self.rows, "features": FEATURES}

    def fingerprint(self):
        return hashlib.sha256(json.dumps([self.rows, self.test_rows, FEATURES, BLOCK]).encode()).hexdigest()[:16]

    def describe_inputs(self):
        return {"kind": "regression", "features": [f"x{i}" for i in range(FEATURES)], "target": "y"}

    def encode_request(self, inputs, targets):
        y = torch.tensor(targets, dtype=torch.float32)
        return Examples(torch.tensor(inputs, dtype=torch.float32), y, np.arange(len(y)), y.numpy())


class PeakRss:
    """Peak resident memory of this process over a `with` block, sampled every 20 ms (MB)."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def evict(root: Path) -> None:
    """Drop a directory's files from the page cache, so the next read comes from the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw_read(root: Path) -> tuple[float, int]:
    """Seconds and bytes to read every file under root (chunk files, in key order), 8 MB at a time."""
    began, total = time.perf_counter(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(8 << 20):
                total += len(chunk)
    return time.perf_counter() - began, total


def config_for(workers: int, dataset: str):
    from tdastore.config import load_config

    return load_config(
        {
            "device": "cpu",
            "task": {"class": "scale:GeneratedTask", "dataset": dataset},
            "projection": {"kind": "gaussian", "dim": 256, "seed": 0},
            "gradients": {"batch_size": 1024},
            "store": {"dtype": "float16", "chunk_rows": 1024, "shard_rows": 16384},
            "build": {"workers": workers, "cpus_per_worker": 1, "max_retries": 1},
            "index": {"shard_rows": 1_048_576, "nprobe": 32, "train_rows": 131_072},
        }
    )


def measure(rows: int, kinds: list[str], queries: int, work: Path, serve: bool, build_only: bool = False) -> dict:
    """Every figure of one row count, in this process."""
    import ray

    import tdastore
    from tdastore.attribution import Attributor

    weights = work / "weights.pt"
    if not weights.exists():
        train_weights(weights)
    out: dict = {"rows": rows}
    config = config_for(2, f"{rows}:{queries}:{weights}")
    task = GeneratedTask(config.task)
    root = work / f"store-{rows}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    with PeakRss() as driver:
        store = tdastore.build(config, root, progress=False)
    summary = store.manifest["summary"]
    out["build"] = {
        "seconds": time.perf_counter() - began,
        "rows_per_s": rows / (time.perf_counter() - began),
        "worker_rows_per_s": summary["worker_examples_per_s"],
        "driver_peak_rss_mb": driver.peak,
        "driver_rss_before_mb": rss_before,
        "worker_peak_rss_mb": summary["peak_worker_rss_mb"],
        "manifest_bytes": (root / "manifest.json").stat().st_size,
        "store_bytes": sum(p.stat().st_size for p in (root / "grads.zarr").rglob("*") if p.is_file()),
        "shards": len(store.manifest["shards"]),
    }
    save(work, out, {"build": out["build"]})
    if build_only:
        ray.shutdown()
        return out

    evict(root)
    began = time.perf_counter()
    opened = tdastore.open_store(root)
    opened.read_rows(0, 1024)
    out["open_seconds"] = time.perf_counter() - began
    evict(root / "grads.zarr")
    raw_s, raw_bytes = raw_read(root / "grads.zarr")
    evict(root / "grads.zarr")
    began = time.perf_counter()
    for _ in opened.iter_blocks():
        pass
    stream_s = time.perf_counter() - began
    out["stream"] = {
        "raw_read_mb_per_s": raw_bytes / raw_s / 2**20,
        "stream_mb_per_s": raw_bytes / stream_s / 2**20,
        "ratio": raw_s / stream_s,
        "rows_per_s": rows / stream_s,
    }
    save(work, out, {"open_seconds": out["open_seconds"], "stream": out["stream"]})

    test = task.examples("test")
    exact = Attributor(opened, "grad_dot")
    began = time.perf_counter()
    exact.top_k(test.slice(0, 1), 10)
    out["first_exact_query_seconds"] = time.perf_counter() - began  # open + train ids + a streamed pass
    began = time.perf_counter()
    truth = exact.top_k(test, 10).column("train_row").to_numpy().reshape(queries, 10)
    out["exact_seconds"] = time.perf_counter() - began
    save(
        work,
        out,
        {"first_exact_query_seconds": out["first_exact_query_seconds"], "exact_seconds": out["exact_seconds"]},
    )
    out["indexes"] = {}
    served_kind = "ivf" if "ivf" in kinds else (kinds[0] if kinds else None)
    expected = None
    for kind in kinds:
        began = time.perf_counter()
        with PeakRss() as peak:
            Attributor(opened, "grad_dot", kind=kind)
        built = time.perf_counter() - began
        gc.collect()
        began = time.perf_counter()  # a reader that comes later: open, the index's shards loaded, one query
        attributor = Attributor(tdastore.open_store(root), "grad_dot", kind=kind)
        opened_s = time.perf_counter() - began
        attributor.index.search(np.zeros((1, opened.dim), np.float32), 1)
        load_s = time.perf_counter() - began - opened_s
        attributor.top_k(test.slice(0, 1), 10)
        first_s = time.perf_counter() - began - opened_s - load_s
        found = attributor.top_k(test, 10).column("train_row").to_numpy().reshape(queries, 10)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
        expected = found[:100] if kind == served_kind else expected  # what the service must answer
        single = []
        for i in range(min(queries, 200)):
            began = time.perf_counter()
            attributor.top_k(test.slice(i, i + 1), 10)
            single.append(time.perf_counter() - began)
        batch = test.slice(0, min(256, queries))
        began = time.perf_counter()
        attributor.top_k(batch, 10)
        batch_s = time.perf_counter() - began
        index_dir = root / "indexes" / f"grad_dot-{kind}"
        out["indexes"][kind] = {
            "build_seconds": built,
            "build_peak_rss_mb": peak.peak,
            "open_seconds": opened_s,
            "index_load_seconds": load_s,
            "first_query_seconds": first_s,
            "index_bytes": sum(p.stat().st_size for p in index_dir.glob("*.faiss")),
            "recall_at_10": recall,
            "p50_ms": 1000 * float(np.percentile(single, 50)),
            "p99_ms": 1000 * float(np.percentile(single, 99)),
            "batch256_queries_per_s": len(batch) / batch_s,
        }
        save(work, out, {"kind": kind, **out["indexes"][kind]})
        del attributor  # its index shards leave memory before the next kind's
        gc.collect()
    if serve and kinds:  # measured by a fresh process (this one's memory still holds what the indexes left)
        np.save(work / f"expected-{rows}.npy", expected)
        out["serve_kind"] = served_kind
        save(work, out, {"serve_kind": served_kind})
    ray.shutdown()
    return out


def save(work: Path, out: dict, shown: dict) -> None:
    """Print a stage's figures and keep everything measured so far (a later stage that fails loses nothing)."""
    print(json.dumps({"rows": out["rows"], **shown}), flush=True)
    (work / f"result-{out['rows']}.json").write_text(json.dumps(out))


def measure_service(root: Path, kind: str, test, expected: np.ndarray) -> dict:
    """The service with 2 index shards: p50 of single queries over HTTP, and its hits against in process."""
    import urllib.request

    from ray import serve

    from tdastore.serve import application

    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    began = time.perf_counter()
    serve.run(application(str(root), methods=["grad_dot"], kind=kind, index_shards=2), name="scale", route_prefix="/s")
    start_s = time.perf_counter() - began

    def ask(examples, timeout: float) -> tuple[dict, float]:
        """One POST of these test inputs: the answer and its seconds."""
        body = {"method": "grad_dot", "inputs": examples.inputs.tolist(), "targets": examples.targets.tolist(),
                "top_k": 10}  # fmt: skip
        request = urllib.request.Request("http://127.0.0.1:8765/s/query", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read()), time.perf_counter() - began

    def top_rows(result: dict) -> list[int]:
        return [hit["train_row"] for hit in result["top"]]

    times, same = [], 0
    count = len(expected)
    for i in range(count):
        answer, seconds = ask(test.slice(i, i + 1), 120)
        times.append(seconds)
        same += top_rows(answer["results"][0]) == expected[i].tolist()
    batch = test.slice(0, min(256, len(test)))  # one request of 256 test inputs (the service's MAX_BATCH)
    batch_times = []
    for _ in range(3):
        answer, seconds = ask(batch, 600)
        batch_times.append(seconds)
    batch_same = np.mean([top_rows(r) == expected[i].tolist() for i, r in enumerate(answer["results"][:count])])
    serve.shutdown()
    return {"kind": kind, "index_shards": 2, "start_seconds": start_s, "p50_ms": 1000 * float(np.median(times)),
            "p99_ms": 1000 * float(np.percentile(times, 99)), "same_hits": same / count,
            "batch256_queries_per_s": len(batch) / float(np.median(batch_times)),
            "batch256_same_hits": float(batch_same)}  # fmt: skip


def measure_reopen(work: Path, rows: int, kind: str) -> dict:
    """A store and index built by an earlier run, as a later reader meets them: the streamed pass with one and two
    read-ahead threads, and open + the index's load + the first query (files evicted from the page cache)."""
    import tdastore
    from tdastore.attribution import Attributor

    root, out = work / f"store-{rows}", {"rows": rows, "kind": kind}
    evict(root / "grads.zarr")
    raw_s, raw_bytes = raw_read(root / "grads.zarr")
    out["raw_read_mb_per_s"] = raw_bytes / raw_s / 2**20
    for readers in (1, 2):
        evict(root / "grads.zarr")
        began = time.perf_counter()
        for _ in tdastore.open_store(root).iter_blocks(readers=readers):
            pass
        out[f"stream_mb_per_s_{readers}_readers"] = raw_bytes / (time.perf_counter() - began) / 2**20
        out[f"stream_ratio_{readers}_readers"] = out[f"stream_mb_per_s_{readers}_readers"] / out["raw_read_mb_per_s"]
    evict(root)
    test = GeneratedTask(_task_config(root)).test
    began = time.perf_counter()
    attributor = Attributor(tdastore.open_store(root), "grad_dot", kind=kind)
    out["open_seconds"] = time.perf_counter() - began
    attributor.index.search(np.zeros((1, attributor.store.dim), np.float32), 1)
    out["index_load_seconds"] = time.perf_counter() - began - out["open_seconds"]
    began = time.perf_counter()
    attributor.top_k(test.slice(0, 1), 10)
    out["first_query_seconds"] = time.perf_counter() - began
    expected = attributor.top_k(test.slice(0, 100), 10).column("train_row").to_numpy().reshape(-1, 10)
    np.save(work / f"expected-{rows}.npy", expected)  # what the service (--serve-only) must answer
    del attributor
    gc.collect()
    exact = Attributor(tdastore.open_store(root), "grad_dot")
    began = time.perf_counter()
    exact.top_k(test.slice(0, 1), 10)
    out["first_exact_query_seconds"] = time.perf_counter() - began  # a streamed pass over every row
    return out


def _task_config(root: Path):
    from tdastore.config import load_config

    return load_config(json.loads((root / "manifest.json").read_text())["config"]).task


def serve_in_a_fresh_process(work: Path, rows: int, kind: str, queries: int) -> dict:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        test = GeneratedTask(_task_config(work / f"store-{rows}")).test
        return measure_service(work / f"store-{rows}", kind, test, np.load(work / f"expected-{rows}.npy"))
    finally:
        ray.shutdown()


def measure_s3(work: Path, rows: int, kind: str = "ivf") -> dict:
    """The N-row store copied to a local S3 endpoint (moto's server, its own process): a streamed pass (Zarr
    fetches a block's chunks concurrently while the next block is read ahead) and the index's load, against the
    same from the local disk (evicted from the page cache first)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    os.environ["TDASTORE_CACHE"] = str(work / "cache")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        import boto3
        import fsspec

        for _ in range(100):
            try:
                boto3.client("s3").create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - the server is starting
                time.sleep(0.1)
        import tdastore
        from tdastore.attribution import Attributor

        local = work / f"store-{rows}"
        shutil.rmtree(work / "cache", ignore_errors=True)  # index shards are downloaded, not found cached
        parts = ["manifest.json", "meta.parquet", "grads.zarr", f"indexes/grad_dot-{kind}"]  # what queries read
        began = time.perf_counter()
        for part in parts:
            fsspec.filesystem("s3").put(str(local / part), f"bench/store/{part}", recursive=True)
        upload_s = time.perf_counter() - began
        files = [p for part in parts for p in [local / part, *(local / part).rglob("*")] if p.is_file()]
        sent = sum(p.stat().st_size for p in files)
        out = {"rows": rows, "upload_mb_per_s": sent / upload_s / 2**20}
        for where, location in (("local", local), ("s3", "s3://bench/store")):
            evict(local)
            store = tdastore.open_store(location)
            began = time.perf_counter()
            for _ in store.iter_blocks():
                pass
            seconds = time.perf_counter() - began
            out[f"{where}_stream_rows_per_s"] = rows / seconds
            out[f"{where}_stream_mb_per_s"] = rows * store.dim * 2 / seconds / 2**20
            began = time.perf_counter()
            attributor = Attributor(store, "grad_dot", kind=kind)
            attributor.index.search(np.zeros((1, store.dim), np.float32), 1)
            out[f"{where}_index_load_seconds"] = time.perf_counter() - began
        out["stream_ratio_s3_to_local"] = out["s3_stream_rows_per_s"] / out["local_stream_rows_per_s"]
        return out
    finally:
        server.terminate()


def table(path: Path) -> None:
    """The README's tables from a results file (markdown)."""
    results = json.loads(path.read_text())
    runs = sorted((r for key, r in results.items() if key.isdigit()), key=lambda r: r["rows"])
    print("| rows | build rows/s (workers' own) | driver / worker peak RSS MB | manifest KB | open + first block ms "
          "| streamed pass MB/s / raw read MB/s | first exact query s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        b, st = r["build"], r["stream"]
        cells = [
            f"{r['rows']:,}",
            f"{b['rows_per_s']:,.0f} ({b['worker_rows_per_s']:,.0f})",
            f"{b['driver_peak_rss_mb']:,.0f} / {b['worker_peak_rss_mb']:,.0f}",
            f"{b['manifest_bytes'] / 1024:,.0f}",
            f"{1000 * r['open_seconds']:.0f}",
            f"{st['stream_mb_per_s']:,.0f} / {st['raw_read_mb_per_s']:,.0f} = {st['ratio']:.2f}",
            f"{r['first_exact_query_seconds']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\n| rows | kind | build s | peak RSS MB | index MB | recall@10 | p50 / p99 ms | batch 256 q/s | load s "
          "| open + first query s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for kind, x in r.get("indexes", {}).items():
            print(f"| {r['rows']:,} | {kind} | {x['build_seconds']:,.1f} | {x['build_peak_rss_mb']:,.0f} "
                  f"| {x['index_bytes'] / 2**20:,.0f} | {x['recall_at_10']:.3f} "
                  f"| {x['p50_ms']:.1f} / {x['p99_ms']:.1f} "
                  f"| {x['batch256_queries_per_s']:,.0f} | {x['index_load_seconds']:.1f} "
                  f"| {x['open_seconds'] + x['first_query_seconds']:.2f} |")  # fmt: skip
    for r in runs:
        if "serve" in r:
            v = r["serve"]
            print(
                f"\nservice at {r['rows']:,} rows ({v['kind']}, {v['index_shards']} index shards): p50 "
                f"{v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, same hits as in process {v['same_hits']:.0%}"
                + (
                    f"; one request of 256 queries: {v['batch256_queries_per_s']:,.0f} queries/s, same hits "
                    f"{v['batch256_same_hits']:.0%}"
                    if "batch256_queries_per_s" in v
                    else ""
                )
            )


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for key, r in json.loads(path.read_text()).items() if key.isdigit()), key=lambda r: r["rows"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = sorted({k for r in runs for k in r.get("indexes", {})})
    for kind in kinds:
        have = [r for r in runs if kind in r.get("indexes", {})]
        rows = [r["rows"] for r in have]
        left.plot(rows, [r["indexes"][kind]["p50_ms"] for r in have], "o-", label=f"{kind} p50")
        right.plot(rows, [r["indexes"][kind]["recall_at_10"] for r in have], "o-", label=kind)
    for axis, label in ((left, "single-query latency, ms (gradient + search)"), (right, "recall@10 vs exact")):
        axis.set_xscale("log")
        axis.set_xlabel("rows in the store")
        axis.set_ylabel(label)
        axis.legend()
    left.set_yscale("log")
    fig.tight_layout()
    image = Path(__file__).parents[1] / "docs" / "assets" / "scale.png"  # shown by docs/benchmarks.md
    fig.savefig(image, dpi=120)
    print(f"wrote {image}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--kinds", nargs="*", default=["flat", "ivf", "pq", "hnsw"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--work", default=None, help="where stores go (default: a temporary directory)")
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--build-only", action="store_true", help="the build's figures only (into build-N keys)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one row count
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # a child: its service
    parser.add_argument("--plot", default=None)
    parser.add_argument("--s3", action="store_true", help="the --rows store of an earlier run (--work) against S3")
    parser.add_argument("--reopen", action="store_true", help="the --rows store and --kinds index of an earlier "
                        "run (--work), opened and streamed by a later reader")  # fmt: skip
    args = parser.parse_args()
    if args.plot:
        table(Path(args.plot))
        return plot(Path(args.plot))
    if args.reopen:
        result = measure_reopen(Path(args.work), args.rows[0], args.kinds[0])
        print(json.dumps(result))
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.setdefault("reopen", {})[str(args.rows[0])] = result
        RESULTS.write_text(json.dumps(results, indent=1))
        return
    if args.s3:
        result = measure_s3(Path(args.work), args.rows[0])
        print(json.dumps(result))
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.setdefault("s3", {})[str(args.rows[0])] = result
        RESULTS.write_text(json.dumps(results, indent=1))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="tdastore-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        measure(args.rows[0], args.kinds, args.queries, work, not args.no_serve, args.build_only)
        return
    if args.serve_only:
        rows = args.rows[0]
        result = json.loads((work / f"result-{rows}.json").read_text())
        result["serve"] = serve_in_a_fresh_process(work, rows, result["serve_kind"], args.queries)
        save(work, result, {"serve": result["serve"]})
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for rows in args.rows:
        command = [sys.executable, __file__, "--one", "--rows", str(rows), "--kinds", *args.kinds,
                   "--queries", str(args.queries), "--work", str(work)]  # fmt: skip
        command += ["--no-serve"] if args.no_serve else []
        if args.build_only:
            shutil.rmtree(work / f"store-{rows}", ignore_errors=True)  # a fresh build
            subprocess.run([*command, "--build-only"], check=True)
            results.setdefault("build_only", {})[str(rows)] = json.loads((work / f"result-{rows}.json").read_text())
            RESULTS.write_text(json.dumps(results, indent=1))
            continue
        subprocess.run(command, check=True)
        if not args.no_serve and args.kinds:
            serve_command = [sys.executable, __file__, "--serve-only", "--rows", str(rows), "--queries",
                             str(args.queries), "--work", str(work)]  # fmt: skip
            subprocess.run(serve_command, check=True)
        measured = json.loads((work / f"result-{rows}.json").read_text())
        kept = results.get(str(rows), {})  # kinds measured by an earlier run stay (a run may add kinds)
        measured["indexes"] = {**kept.get("indexes", {}), **measured.get("indexes", {})}
        results[str(rows)] = {**kept, **measured}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    plot(RESULTS)


if __name__ == "__main__":
    main()
