"""Build throughput into object storage (issue 13), as a ratio measured in one run on this machine.

A local S3-compatible endpoint (moto's threaded server on 127.0.0.1, reached by s3fs through AWS_ENDPOINT_URL),
the same Ray build (2 workers) of a projected diabetes store with many rows (the training split repeated) into a
local directory and into s3://: rows/s into S3 divided by rows/s into the directory, each the best of two builds.

    python benchmarks/s3_build.py [--repeat 40]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=40, help="copies of the diabetes training rows")
    args = parser.parse_args()
    port = free_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        TQDM_DISABLE="1",
    )
    import boto3
    import numpy as np
    import ray
    from moto.server import ThreadedMotoServer

    import tdastore
    from tdastore.distributed.build import build_store
    from tdastore.tasks import ModelTask, make_task
    from tdastore.training import load_model

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    boto3.client("s3").create_bucket(Bucket="bench")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = tdastore.load_config(
            {
                "device": "cpu",
                "model": {"hidden": [128, 128]},
                "train": {"epochs": 5, "output_dir": str(work / "model")},
                "projection": {"kind": "gaussian", "dim": 512},
                "store": {"chunk_rows": 1024, "shard_rows": 2048, "dtype": "float16"},
                "build": {"workers": 2},
            }
        )
        tdastore.train(config, progress=False)
        base = make_task(config.task, config.model)
        train = base.examples("train")
        inputs = train.inputs.repeat(args.repeat, 1)  # [N x repeat, d]
        targets = train.targets.repeat(args.repeat)
        test = base.examples("test")
        model = load_model(config, base)  # the trained weights, as they are
        task = ModelTask(model, base.per_example_loss, (inputs, targets), (test.inputs, test.targets))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        rates = {}
        for where in ("local", "s3"):
            best = np.inf
            for attempt in range(2):
                out = str(work / f"{where}-{attempt}") if where == "local" else f"s3://bench/{attempt}"
                began = time.perf_counter()
                store = build_store(config, out, progress=False, task=task)
                best = min(best, time.perf_counter() - began)
            rates[where] = store.n_rows / best
        ray.shutdown()
    server.stop()
    print(
        f"Ray build (2 workers, {store.n_rows:,} rows x {store.dim} columns float16): into s3:// (moto on loopback) / "
        f"into a local directory, rows/s: {rates['s3'] / rates['local']:.2f} "
        f"({rates['s3']:,.0f} vs {rates['local']:,.0f} rows/s)"
    )


if __name__ == "__main__":
    main()
