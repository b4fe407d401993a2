"""The gold standard for a Hugging Face causal LM: vectorised replicas equal one-at-a-time torch.optim further
training, the Ray pool stores the engine's values, a killed job resumes to the same arrays, and evaluation
scores a text store against it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tdastore.config import config_to_dict, load_config
from tdastore.errors import StoreError


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from tdastore.demo_text import make_tiny_lm

    root = tmp_path_factory.mktemp("gt_lm")
    make_tiny_lm(root, n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64, train_steps=10, documents=48)
    return root


def lm_config(root, tmp_path, **gt):
    settings = {
        "coupling": "subtract",
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.01,
        "clip_norm": 1.0,
        "batch_size": 8,
        "epochs": None,
        "steps": 6,
        "eval_every": 2,
        "seeds": 2,
        "seed_block": 1,
        "left_out_indices": [3, 7, 11],
        "left_out_count": None,
        "left_out_block": 2,
        "test_points": 4,
        "output": str(tmp_path / "gt"),
        **gt,
    }
    return load_config(
        {
            "device": "cpu",
            "task": {"dataset": str(root / "corpus.jsonl"), "kind": "causal_lm", "max_length": 24, "id_column": "id"},
            "model": {"name_or_path": str(root / "model")},
            "gradients": {"modules": "auto", "batch_size": 16},
            "projection": {"kind": "factored", "factors": [4, 4]},
            "store": {"chunk_rows": 16, "shard_rows": 32, "path": str(tmp_path / "store")},
            "build": {"workers": 2, "max_retries": 0},
            "groundtruth": settings,
        }
    )


def trainers(config):
    from tdastore.groundtruth.engine import ReplicaTrainer
    from tdastore.groundtruth.sequential import SequentialTrainer
    from tdastore.tasks import make_task
    from tdastore.training import load_model

    task = make_task(config.task, config.model)
    model = load_model(config, task)
    train, test = task.examples("train"), task.examples("test").slice(0, config.groundtruth.test_points)
    gt = config.groundtruth
    return ReplicaTrainer(model, task, gt, train, test), SequentialTrainer(model, task, gt, train, test)


@pytest.mark.parametrize("coupling", ["subtract", "delete"])
def test_vectorised_replicas_equal_torch_adamw_one_at_a_time(lm, tmp_path, coupling):
    """AdamW with weight decay and clipping 1.0: the stacked engine (hand-written update rules, vmap over a GPT-2)
    and torch.optim.AdamW + clip_grad_norm_ one replica at a time record the same test losses (1e-5)."""
    config = lm_config(lm, tmp_path, coupling=coupling)
    vectorised, sequential = trainers(config)
    left = [3, (5, 9)]  # a row, and a set of rows (as LDS leaves out)
    a, b = vectorised.run([0, 1], left), sequential.run([0, 1], left)
    assert a.shape == b.shape == (3, 4, 2, 3)
    assert np.abs((a - b).numpy()).max() <= 1e-5 * np.abs(b.numpy()).max()
    assert (a[-1] != a[0]).any() and (a[..., 1] != a[..., 0]).any()  # training moved, leaving out mattered


def test_text_metagradient_equals_central_differences(lm, tmp_path):
    """The metagradient differentiated through the transformer's AdamW steps with weight decay and clipping:
    forward and reverse modes agree, and both equal central differences of the weighted run (float64)."""
    from tdastore.groundtruth.metagrad import MetaGradient

    config = lm_config(lm, tmp_path)
    first, _ = trainers(config)
    model = first.model.double()  # float64: differences of one row's weight are far below float32's resolution
    rows = [3, 7, 11, 20]
    meta = MetaGradient(model, first.task, config.groundtruth, first.train, first.test, rows)
    forward, reverse = meta.gradients(0, "forward"), meta.gradients(0, "reverse")  # [E, T, R]
    assert np.abs((forward - reverse).numpy()).max() <= 1e-6 * np.abs(forward.numpy()).max()
    for r in (0, 2):
        errors = []
        for eps in (1e-6, 1e-7, 1e-8):  # Adam's sqrt(v) curves sharply: the best step of a few (as for tabular)
            up, down = torch.ones(len(rows), dtype=torch.float64), torch.ones(len(rows), dtype=torch.float64)
            up[r], down[r] = 1 + eps, 1 - eps
            central = (meta.test_values(up, 0) - meta.test_values(down, 0)) / (2 * eps)  # [E, T]
            errors.append(np.abs(central.numpy() - forward[:, :, r].numpy()).max())
        assert min(errors) <= 1e-4 * np.abs(forward[:, :, r].numpy()).max(), errors


def test_text_gold_standard_pool_resumes_and_evaluates(ray_cluster, lm, tmp_path):
    """The Ray pool's arrays equal the engine's; a job killed part way resumes to the same arrays; the
    sequential execution writes the same values; evaluate scores a text store's methods against it."""
    from tdastore.distributed.build import build_store
    from tdastore.evaluate.run import evaluate
    from tdastore.groundtruth.pool import run_groundtruth

    config = lm_config(lm, tmp_path)
    root = run_groundtruth(config, progress=False)
    loo = np.asarray(__import__("zarr").open_array(str(root / "loo.zarr"))[:])
    full = np.asarray(__import__("zarr").open_array(str(root / "full.zarr"))[:])
    vectorised, _ = trainers(config)
    direct = vectorised.run([1], [3, 7, 11]).numpy()  # seed 1
    np.testing.assert_allclose(full[:, :, 1], direct[:, :, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(loo[:, :, :, 1], direct[:, :, 0, 1:], rtol=1e-6)

    raw = config_to_dict(config)
    other = load_config({**raw, "groundtruth": {**raw["groundtruth"], "output": str(tmp_path / "gt2")}})
    with pytest.raises(StoreError, match="rerun the same command to resume"):
        run_groundtruth(other, progress=False, fault={"unit": "0001-0000"}, max_retries=0)
    assert json.loads((tmp_path / "gt2" / "manifest.json").read_text())["status"] == "running"
    sequential = load_config({**raw, "groundtruth": {**raw["groundtruth"], "output": str(tmp_path / "gt2"),
                                                     "execution": "sequential"}})  # fmt: skip
    resumed = run_groundtruth(sequential, progress=False)  # the same job: how it runs is not its identity
    loo2 = np.asarray(__import__("zarr").open_array(str(resumed / "loo.zarr"))[:])
    np.testing.assert_allclose(loo2, loo, rtol=1e-5)

    store = build_store(config, config.store.path, progress=False)
    methods = ["grad_dot", "grad_cos", "if_gn", "lissa", "datainf", "trak1", "kfac", "ekfac", "metagrad"]
    results = evaluate(store, root, methods=methods, path="projected", progress=False)
    assert not [entry for entry in results["methods"].values() if "error" in entry], results["methods"]
    cosines = {name: np.asarray(entry["cosine"]) for name, entry in results["methods"].items()}
    print({name: np.round(c, 3).tolist() for name, c in cosines.items()})
    others = np.max([c for name, c in cosines.items() if name != "metagrad"], axis=0)
    assert (cosines["metagrad"] > others).all()  # its job ran on Ray; above every unified-view method here
    for name in methods:  # every method with a projected path scores the text store against the gold standard
        found = results["methods"][name]
        assert "error" not in found, found
        assert len(found["cosine"]) == 3 and np.isfinite(found["cosine"]).all() and found["seed_curve"]

    # the exact path on a text model small enough for it: grad_dot equals an autograd loop over whole-model
    # gradients, and the second-order methods score against the gold standard too
    from tdastore.attribution import Attributor

    exact = Attributor(store, "grad_dot", {"attribution": {"path": "exact"}})
    task, model = exact.task, exact.model
    test, train = task.examples("test").slice(0, 3), task.examples("train")
    params = [p for p in model.parameters() if p.requires_grad]

    def whole_gradient(loss_fn, one) -> torch.Tensor:
        loss = loss_fn(model(one.inputs), one.targets).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    g_test = torch.stack([whole_gradient(task.test_function, test.slice(t, t + 1)) for t in range(3)])
    g_train = torch.stack([whole_gradient(task.per_example_loss, train.slice(i, i + 1)) for i in range(len(train))])
    np.testing.assert_allclose(exact.score_matrix(test), (g_test @ g_train.T / len(train)).numpy(), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    second = evaluate(store, root, methods=["grad_dot", "if_gn", "if_h", "datainf", "ekfac"], path="exact",
                      progress=False)  # fmt: skip
    for name in ("grad_dot", "if_gn", "if_h", "datainf"):
        found = second["methods"][name]
        assert "error" not in found and found["path"] == "exact", found
        assert len(found["cosine"]) == 3 and np.isfinite(found["cosine"]).all()
    assert "Narrow gradients.params" in second["methods"]["ekfac"]["error"]  # embeddings are not Linear layers


def test_vectorised_steps_cut_padding_without_changing_values(lm, tmp_path):
    """The stacked engine cuts each step's token tensors to the longest real document among its rows: the same
    recorded test losses as with the split's full padding."""
    from tdastore.groundtruth.engine import ReplicaTrainer

    config = lm_config(lm, tmp_path, steps=4, eval_every=2)
    config = load_config({**config_to_dict(config), "task": {**config_to_dict(config)["task"], "max_length": 64}})
    vectorised, _ = trainers(config)
    x, y = vectorised.train.inputs[:4][None], vectorised.train.targets[:4][None]  # [1, 4, 2, L], [1, 4, L]
    lengths = vectorised.train.inputs[:, 1].sum(1)
    assert int(lengths.min()) < x.shape[-1]  # some documents are shorter than the split's padding
    cut_x, cut_y = vectorised._trim_padding(x, y)
    assert cut_x.shape[-1] == int(lengths[:4].max()) and cut_y.shape[-1] == cut_x.shape[-1]
    trimmed = vectorised.run([0], [3, 7])
    padded = ReplicaTrainer(vectorised.model, vectorised.task, config.groundtruth, vectorised.train, vectorised.test)
    padded._trim_padding = lambda x, y: (x, y)
    torch.testing.assert_close(trimmed, padded.run([0], [3, 7]), rtol=1e-5, atol=1e-7)


def test_compiled_text_replicas_equal_torch_adamw_and_auto_chooses_them(lm, tmp_path):
    """groundtruth.compile on a GPT-2: the compiled stacked engine records the test losses of torch.optim.AdamW
    one replica at a time; execution auto runs token sequences vectorised only when compiled."""
    from tdastore.groundtruth.engine import ReplicaTrainer
    from tdastore.groundtruth.sequential import SequentialTrainer, make_trainer

    config = lm_config(lm, tmp_path, steps=4, eval_every=2)
    compiled = load_config({**config_to_dict(config), "groundtruth": {**config_to_dict(config)["groundtruth"],
                                                                      "compile": True}})  # fmt: skip
    eager, sequential = trainers(config)
    fused = ReplicaTrainer(eager.model, eager.task, compiled.groundtruth, eager.train, eager.test)
    torch.testing.assert_close(fused.run([0], [3, 7]), sequential.run([0], [3, 7]), rtol=1e-5, atol=1e-6)
    args = (eager.model, eager.task)
    assert isinstance(make_trainer(*args, config.groundtruth, eager.train, eager.test), SequentialTrainer)
    assert isinstance(make_trainer(*args, compiled.groundtruth, eager.train, eager.test), ReplicaTrainer)
