"""The metagradient job on Ray: stored scores, resume, evaluation beside the other methods, bad input."""

import json

import numpy as np
import pytest
import zarr
from conftest import small_config
from helpers import job_damage_is_refused_and_repaired

import tdastore
from tdastore.config import config_to_dict, load_config
from tdastore.distributed.build import build_store
from tdastore.errors import ConfigError, StoreError
from tdastore.evaluate.metrics import cosine_rows, gold_vectors
from tdastore.evaluate.run import evaluate
from tdastore.groundtruth.metagrad import MetaGradient
from tdastore.groundtruth.metagrad_pool import metagrad_root, read_metagrad_scores, run_metagrad
from tdastore.groundtruth.pool import run_groundtruth
from tdastore.tasks import TabularTask
from tdastore.training import load_model


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metagrad")
    config = small_config(
        tmp,
        model={"hidden": [16]},
        groundtruth={
            "output": str(tmp / "gt"),
            "coupling": "subtract",
            "epochs": 4,
            "eval_every": 2,
            "lr": 0.01,
            "batch_size": 64,
            "seeds": 3,
            "seed_block": 3,
            "left_out_count": 6,
            "left_out_block": 6,
            "test_points": 5,
        },
        metagrad={"seeds": 2, "seed_block": 1, "test_block": 3},
    )
    tdastore.train(config, progress=False)
    store = build_store(config, tmp / "store", progress=False)
    gt_root = run_groundtruth(config, progress=False)
    return config, store, gt_root


def test_stored_scores_are_the_engines(finished):
    config, _, gt_root = finished
    root = run_metagrad(config, gt_root, progress=False)
    assert root == metagrad_root(gt_root, "subtract")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seeds"] == [0, 1]
    assert manifest["units"] == ["0000-0000", "0000-0001", "0001-0000", "0001-0001"]  # 2 seeds x 2 test blocks
    stored = zarr.open_array(str(root / "scores.zarr"))[:]  # [E, T, R, S]
    assert stored.shape == (2, 5, 6, 2) and np.isfinite(stored).all()
    task = TabularTask(config.task, config.model)
    meta = MetaGradient(
        load_model(config, task),
        task,
        config.groundtruth,
        task.examples("train"),
        task.examples("test").slice(0, 5),
        rows=manifest["rows"],
    )
    for s in (0, 1):
        np.testing.assert_allclose(stored[..., s], -meta.gradients(s).numpy(), rtol=1e-4, atol=1e-7)

    marker = (root / "units" / "0001-0001.done").read_text()
    run_metagrad(config, gt_root, progress=False)  # everything done: nothing recomputed
    assert (root / "units" / "0001-0001.done").read_text() == marker
    rerun = lambda: run_metagrad(config, gt_root, progress=False)  # noqa: E731
    job_damage_is_refused_and_repaired(root, "scores.zarr", lambda: read_metagrad_scores(root), rerun)


def test_evaluate_scores_metagrad_against_the_gold_vectors(finished):
    config, store, gt_root = finished
    results = evaluate(store, gt_root, methods=["grad_dot", "metagrad"], progress=False)
    entry = results["methods"]["metagrad"]
    assert entry["operator"] == "metagrad" and entry["coupling"] == "subtract" and entry["seeds"] == 2
    loo = zarr.open_array(str(gt_root / "loo.zarr"))[:]
    full = zarr.open_array(str(gt_root / "full.zarr"))[:]
    scores = zarr.open_array(str(metagrad_root(gt_root, "subtract") / "scores.zarr"))[:].astype(np.float64).mean(-1)
    expected = cosine_rows(gold_vectors(loo, full), scores).mean(1)  # per evaluation point
    np.testing.assert_allclose(entry["cosine"], expected, rtol=1e-9)
    assert min(entry["cosine"]) > 0.9  # exact to first order in subtract coupling


def test_bad_input(finished, tmp_path):
    config, store, gt_root = finished
    with pytest.raises(ConfigError, match="tdastore metagrad"):
        tdastore.query(store, "metagrad", split="test", top_k=3)
    other = load_config(config_to_dict(config) | {"metagrad": config_to_dict(config)["metagrad"] | {"seeds": 1}})
    with pytest.raises(StoreError, match="holds another job"):
        run_metagrad(other, gt_root, progress=False)  # the finished store is kept
    assert (metagrad_root(gt_root, "subtract") / "scores.zarr").exists()
    with pytest.raises(StoreError, match="not a ground-truth store"):
        run_metagrad(config, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="metagrad.seeds"):
        load_config(config_to_dict(config) | {"metagrad": {"seeds": 0}})
