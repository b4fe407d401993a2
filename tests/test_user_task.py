"""A task of the user's own, defined in this file only: a small CNN on scikit-learn's digits images.

It goes through build -> index -> query -> ground truth -> evaluate with the Python API (the workers get the
task object by value), and the same build from YAML, from flags only and from the Python API (the workers
import `task.class` through the runtime_env) gives byte-equal stores. Nothing here imports conftest at module
level: the Ray workers import this module.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import tdastore
from tdastore.tasks import Examples, Task

N_TRAIN, N_TEST = 160, 40


class DigitsCNN(Task):
    """8x8 digit images [N, 1, 8, 8] -> 10 classes with one 3x3 convolution and a linear head."""

    name = "digits_cnn"

    def __init__(self, task_config=None, model_config=None):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images[: N_TRAIN + N_TEST, None] / 16.0, dtype=torch.float32)
        labels = torch.tensor(digits.target[: N_TRAIN + N_TEST], dtype=torch.int64)
        ids = np.arange(N_TRAIN + N_TEST, dtype=np.int64)
        self._splits = {
            "train": Examples(images[:N_TRAIN], labels[:N_TRAIN], ids[:N_TRAIN], labels[:N_TRAIN].numpy()),
            "test": Examples(images[N_TRAIN:], labels[N_TRAIN:], ids[N_TRAIN:], labels[N_TRAIN:].numpy()),
        }

    def make_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))

    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")  # [B]

    def examples(self, split: str) -> Examples:
        return self._splits[split]


def settings(tmp_path) -> dict:
    return {
        "task": {"class": "test_user_task:DigitsCNN"},
        "train": {"lr": 0.1, "batch_size": 32, "epochs": 8, "output_dir": str(tmp_path / "model")},
        "gradients": {"batch_size": 64},
        "store": {"chunk_rows": 32, "shard_rows": 64},
        "build": {"workers": 2, "max_retries": 0},
        "groundtruth": {"lr": 0.01, "batch_size": 32, "epochs": 2, "eval_every": 1, "seeds": 2, "seed_block": 2,
                        "left_out_count": 6, "left_out_block": 6, "test_points": 8, "workers": 1,
                        "output": str(tmp_path / "gt")},
    }  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user_task")
    config = tdastore.load_config(settings(tmp))
    task = DigitsCNN()
    tdastore.train(config, progress=False, task=task)
    return config, task, tmp


def per_example_gradients(model, task, data) -> np.ndarray:
    """Independent rows: one autograd call per example, [n, p]."""
    rows = []
    for i in range(len(data)):
        loss = task.per_example_loss(model(data.inputs[i : i + 1]), data.targets[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows).double().numpy()


def test_user_cnn_end_to_end(ray_cluster, trained):
    from helpers import assert_float32_close, assert_same_ranking, assert_within, float32_atol, product_scale

    from tdastore.evaluate.run import evaluate
    from tdastore.groundtruth.pool import run_groundtruth
    from tdastore.training import load_model

    config, task, tmp = trained
    store = tdastore.build(config, tmp / "store", progress=False, task=task)
    model = load_model(config, task)
    g = per_example_gradients(model, task, task.examples("train"))  # [N, p]
    # the store's rows come from batched per-example gradients, g from one autograd call each: float32 sums of
    # up to 36 terms (the convolution's positions) in another order
    assert_float32_close(store.read_rows(), g, depth=36, scale=np.abs(g).max(1, keepdims=True))

    test = task.examples("test").slice(0, 8)
    t = per_example_gradients(model, task, test)  # [8, p]
    expected = t @ g.T / N_TRAIN  # grad_dot, [8, N]
    atol = float32_atol(product_scale(t, g) / N_TRAIN, g.shape[1])  # [8, N]: scores sum p products
    attributor = tdastore.Attributor(store, "grad_dot", kind="flat", task=task)
    top = attributor.top_k(test, 5).column("train_row").to_numpy().reshape(8, 5)
    assert_same_ranking(top, expected, atol)
    bottom = attributor.bottom_k(test, 5)
    bottom_rows = bottom.column("train_row").to_numpy().reshape(8, 5)
    assert_same_ranking(bottom_rows, -expected, atol)
    bottom_scores = bottom.column("score").to_numpy().reshape(8, 5)
    assert_within(bottom_scores, np.take_along_axis(expected, bottom_rows, 1), np.take_along_axis(atol, bottom_rows, 1))
    streamed = np.concatenate([block for _, block in attributor.scores(test)], axis=1)
    assert_within(streamed, expected, atol)

    gt = run_groundtruth(config, progress=False, task=task)
    manifest = json.loads((gt / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["task"]["fingerprint"] == store.manifest["task"]["fingerprint"]
    results = evaluate(store, gt, methods=["grad_dot", "if_gn"], out=tmp / "eval", progress=False, task=task)
    for name in ("grad_dot", "if_gn"):
        cosine = np.asarray(results["methods"][name]["cosine"])
        assert cosine.shape == (2,) and np.all(np.abs(cosine) <= 1.0) and np.isfinite(cosine).all()
    assert (tmp / "eval" / "report.md").is_file()


def test_yaml_flags_and_python_api_build_identical_stores(ray_cluster, trained, tmp_path):
    from tdastore.cli import main

    config, _, tmp = trained
    raw = settings(tmp)  # the trained model's directory
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["build", "--config", str(path), "--output", str(tmp_path / "yaml"), "--quiet"]) == 0
    sections = ("task", "train", "gradients", "store", "build")
    flags = [
        f"--{section}.{key}={value if isinstance(value, str) else json.dumps(value)}"
        for section in sections
        for key, value in raw[section].items()
    ]
    assert main(["build", *flags, "--output", str(tmp_path / "flags"), "--quiet"]) == 0
    tdastore.build(tdastore.load_config(raw), tmp_path / "api", progress=False)
    stores = [tdastore.open_store(tmp_path / name) for name in ("yaml", "flags", "api")]
    chunks = sorted(
        p.relative_to(tmp_path / "yaml") for p in (tmp_path / "yaml" / "grads.zarr").rglob("*") if p.is_file()
    )
    for other in ("flags", "api"):
        for chunk in chunks:
            assert (tmp_path / "yaml" / chunk).read_bytes() == (tmp_path / other / chunk).read_bytes(), chunk
        assert pq.read_table(tmp_path / "yaml" / "meta.parquet").equals(
            pq.read_table(tmp_path / other / "meta.parquet")
        )
    assert all(s.manifest["task"]["description"]["name"] == "digits_cnn" for s in stores)
