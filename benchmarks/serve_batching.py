"""The query service's request batching (issue 13), as a ratio measured in one run on this machine.

The tiny GPT-2 store (`tdastore demo-lm` shape: GPT-2 2 x 64, its standard-library documents, factored 16 x 16
gradients of the four Conv1D kinds), one Serve replica, an exact (flat) index, `grad_cos`; 32 concurrent
clients each sending one prompt per request. Throughput with batching (up to 32 requests per gradient pass)
divided by throughput without (max_batch 1), with p50 and p99 latencies of both.

    python benchmarks/serve_batching.py [--requests 640] [--clients 32] [--method grad_cos]
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


def load(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[float, np.ndarray, int]:
    """(requests/s, latencies in ms, errors) of `requests` POSTs from `clients` threads."""

    def one(i: int) -> tuple[int, float]:
        began = time.perf_counter()
        request = urllib.request.Request(
            url + "/query", data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
                code = response.status
        except Exception:
            code = 0
        return code, time.perf_counter() - began

    for i in range(clients):  # warm: the replica has opened its operator and index
        one(i)
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    return requests / wall, np.array([t for _, t in results]) * 1000, sum(code != 200 for code, _ in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--method", default="grad_cos")
    args = parser.parse_args()
    import ray
    from ray import serve

    import tdastore
    from tdastore.demo_text import make_tiny_lm
    from tdastore.distributed.build import build_store
    from tdastore.serve import application, start
    from tdastore.tasks.text import quiet_hugging_face

    quiet_hugging_face()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_tiny_lm(Path(tmp), train_steps=0, progress=False)  # untrained weights cost the same
        config = tdastore.load_config(
            {
                "device": "cpu",
                "task": {"kind": "causal_lm", "dataset": str(demo / "corpus.jsonl"), "max_length": 64},
                "model": {"name_or_path": str(demo / "model")},
                "gradients": {"modules": "auto", "batch_size": 32, "full_norms": False},
                "projection": {"kind": "factored", "factors": [16, 16]},
                "store": {"chunk_rows": 128, "shard_rows": 512},
                "build": {"workers": 2},
            }
        )
        store = build_store(config, Path(tmp) / "store", progress=False)
        prompts = [json.loads(line)["text"] for line in (demo / "prompts.jsonl").read_text().splitlines()]
        bodies = [json.dumps({"method": args.method, "inputs": [p], "top_k": 10}).encode() for p in prompts]
        figures = {}
        port = 38000 + os.getpid() % 1000
        for name, batch in (("batched", 32), ("unbatched", 1)):
            app = application(str(store.root), methods=[args.method], max_batch=batch, batch_wait_ms=5)
            url = start(app, port=port, name="bench")
            figures[name] = load(url, bodies, args.requests, args.clients)
            serve.delete("bench")
        serve.shutdown()
    ray.shutdown()
    for name, (rate, latencies, errors) in figures.items():
        print(
            f"{name}: {rate:.1f} requests/s, p50 {np.percentile(latencies, 50):.0f} ms, "
            f"p99 {np.percentile(latencies, 99):.0f} ms, errors {errors}"
        )
    ratio = figures["batched"][0] / figures["unbatched"][0]
    print(
        f"service throughput batched / unbatched ({args.clients} clients, tiny GPT-2 store, {store.n_rows} rows): "
        f"{ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
