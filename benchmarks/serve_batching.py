"""The query service's request batching (issue 13), as a ratio measured in one run on this machine.

The tiny GPT-2 store (`tdastore demo-lm` shape: GPT-2 2 x 64, its standard-library documents, factored 16 x 16
gradients of the four Conv1D kinds), one Serve replica, an exact (flat) index, `grad_cos`; 32 concurrent
clients each sending one document (up to 64 tokens) per request on a keep-alive connection. Throughput with
batching (up to 32 requests per gradient pass) divided by throughput without (max_batch 1), with p50 and p99
latencies of both; and, for reference, the same ratio in process (what a replica saves per request once
requests arrive faster than it answers; on 2 cores shared by the 32 client threads, Serve's HTTP proxy and the
replica, the proxy rather than the replica limits the service).

    python benchmarks/serve_batching.py [--requests 640] [--clients 32] [--method grad_cos]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np


def load(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[float, np.ndarray, int]:
    """(requests/s, latencies in ms, errors) of `requests` POSTs from `clients` threads, each on its own
    keep-alive connection (as a requests.Session or an HTTP client pool would)."""
    host, port = url.removeprefix("http://").split(":")
    local = threading.local()

    def one(i: int) -> tuple[int, float]:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(host, int(port), timeout=300)
        began = time.perf_counter()
        try:
            local.connection.request(
                "POST", "/query", body=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
            )
            response = local.connection.getresponse()
            response.read()
            code = response.status
        except Exception:
            local.connection.close()
            del local.connection
            code = 0
        return code, time.perf_counter() - began

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(2 * clients)))  # warm: connections open, the replica has read its index
        began = time.perf_counter()
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    return requests / wall, np.array([t for _, t in results]) * 1000, sum(code != 200 for code, _ in results)


def in_process_ratio(store, texts: list[str], method: str) -> float:
    """What batching saves a replica when requests arrive faster than it answers: encoding, the test gradients
    and the index search for all texts at once vs one at a time (one thread, as a replica has)."""
    import torch

    from tdastore.attribution import Attributor

    torch.set_num_threads(1)
    attributor = Attributor(store, method, {"attribution": {"path": "projected"}}, kind="flat")

    def answer(part: list[str]) -> None:
        attributor.ranked_queries(attributor.queries(attributor.task.encode_request(part, None)), 10)

    answer(texts)  # warm
    began = time.perf_counter()
    answer(texts)
    batched = time.perf_counter() - began
    began = time.perf_counter()
    for text in texts:
        answer([text])
    return (time.perf_counter() - began) / batched


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
        lines = (demo / "corpus.jsonl").read_text().splitlines()[-64:]  # whole documents, as users send them
        texts = [json.loads(line)["text"] for line in lines]
        bodies = [json.dumps({"method": args.method, "inputs": [t], "top_k": 10}).encode() for t in texts]
        figures = {}
        port = 38000 + os.getpid() % 1000
        for name, batch in (("batched", 32), ("unbatched", 1)):
            app = application(str(store.root), methods=[args.method], max_batch=batch, batch_wait_ms=5)
            url = start(app, port=port, name="bench")
            figures[name] = load(url, bodies, args.requests, args.clients)
            serve.delete("bench")
        serve.shutdown()
        ceiling = in_process_ratio(store, texts[: args.clients], args.method)
    ray.shutdown()
    for name, (rate, latencies, errors) in figures.items():
        print(
            f"{name}: {rate:.1f} requests/s, p50 {np.percentile(latencies, 50):.0f} ms, "
            f"p99 {np.percentile(latencies, 99):.0f} ms, errors {errors}"
        )
    ratio = figures["batched"][0] / figures["unbatched"][0]
    print(f"in process, one pass over {args.clients} documents / {args.clients} passes of one: {ceiling:.2f}x")
    print(
        f"service throughput batched / unbatched ({args.clients} clients, tiny GPT-2 store, {store.n_rows} rows): "
        f"{ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
