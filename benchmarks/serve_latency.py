"""Query service latency on loopback: 1,000 requests from 16 concurrent clients, p50 and p99.

    python benchmarks/serve_latency.py [--requests 1000] [--clients 16] [--replicas 2] [--method if_gn]

Figures (one per line): requests/s, p50 and p99 latency, errors; and, for reference in the same run, the
latency of the same query through the Python API (store.query) in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import ray
from sklearn.datasets import load_diabetes

import tdastore
from tdastore.attribution import Attributor
from tdastore.distributed.build import build_store
from tdastore.serve import BackgroundServer, make_app, start_replicas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--method", default="if_gn")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = tdastore.load_config(
            {
                "task": {"dataset": "diabetes"},
                "train": {"epochs": 100, "lr": 0.01, "batch_size": 32, "output_dir": str(work / "model")},
                "projection": {"kind": "gaussian", "dim": 256},
                "store": {"chunk_rows": 64, "shard_rows": 64},
            }
        )
        tdastore.train(config, progress=False)
        store = build_store(config, work / "store", progress=False)
        actors, meta = start_replicas(str(store.root), args.replicas, "flat")
        server = BackgroundServer(make_app(actors, meta))
        task = Attributor(store, args.method).task
        ids = task.examples("test").ids
        bunch = load_diabetes()
        bodies = [
            json.dumps(
                {
                    "method": args.method,
                    "inputs": [bunch.data[i].tolist()],
                    "targets": [float(bunch.target[i])],
                    "top_k": 10,
                }
            ).encode()
            for i in ids
        ]

        def one(i: int) -> tuple[int, float]:
            began = time.perf_counter()
            request = urllib.request.Request(
                server.url + "/query", data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    code = response.status
            except Exception:
                code = 0
            return code, time.perf_counter() - began

        for i in range(20):  # warm-up: every replica opens its operator and index
            one(i)
        began = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - began
        latencies = np.array([t for _, t in results]) * 1000
        errors = sum(code != 200 for code, _ in results)
        test = task.examples("test").slice(0, 1)
        tdastore.query(store, args.method, inputs=test, top_k=10, kind="flat")
        began = time.perf_counter()
        for _ in range(20):
            tdastore.query(store, args.method, inputs=test, top_k=10, kind="flat")
        api_ms = (time.perf_counter() - began) / 20 * 1000
        server.stop()
    ray.shutdown()
    print(
        f"serve {args.requests} requests, {args.clients} clients, {args.replicas} replicas: "
        f"{args.requests / wall:.0f} requests/s, errors {errors}"
    )
    print(f"serve latency p50: {np.percentile(latencies, 50):.1f} ms")
    print(f"serve latency p99: {np.percentile(latencies, 99):.1f} ms")
    print(f"python api store.query (opens model and index per call) for comparison: {api_ms:.1f} ms")


if __name__ == "__main__":
    main()
