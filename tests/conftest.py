"""Shared fixtures: one local Ray cluster on loopback per test session, and small trained models."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's node IP becomes 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test cluster: no token needed
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TDASTORE_CACHE", os.path.join(tempfile.gettempdir(), "tdastore-test-cache"))  # index downloads
# the local S3 endpoint of tests/test_s3.py (moto's server), set before any Ray worker starts so they inherit it
os.environ.setdefault("AWS_ENDPOINT_URL", "http://127.0.0.1:39517")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest

S3_PORT = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (all bound at once, then released)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """One Ray Serve instance on 127.0.0.1 for the session; tests add their apps under their own prefixes."""
    from ray import serve

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def small_config(tmp_path, dataset="diabetes", **sections):
    """A quick config: a 32-32 MLP trained for a few epochs, stores in small shards."""
    from tdastore.config import load_config

    raw = {
        "device": "cpu",  # every path runs with the device named explicitly
        "task": {"dataset": dataset},
        "model": {"hidden": [32, 32]},
        "train": {"lr": 0.01, "batch_size": 32, "epochs": 5, "output_dir": str(tmp_path / "model")},
        "gradients": {"batch_size": 48},
        "store": {"chunk_rows": 32, "shard_rows": 64},
        "build": {"workers": 2, "max_retries": 0},
        "attribution": {},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(raw)


@pytest.fixture
def trained_config(tmp_path):
    import tdastore

    config = small_config(tmp_path)
    tdastore.train(config, progress=False)
    return config
