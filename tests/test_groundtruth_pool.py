"""The ground-truth job: store layout, resume after a killed worker, and bad input."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import small_config
from helpers import job_damage_is_refused_and_repaired

import tdastore
from tdastore.config import load_config
from tdastore.errors import ConfigError, StoreError
from tdastore.groundtruth.engine import ReplicaTrainer
from tdastore.groundtruth.pool import run_groundtruth
from tdastore.tasks import TabularTask
from tdastore.training import load_model


def gt_config(tmp_path, name="gt", **gt):
    settings = {
        "output": str(tmp_path / name),
        "epochs": 3,
        "eval_every": 1,
        "lr": 0.01,
        "batch_size": 64,
        "seeds": 4,
        "seed_block": 2,
        "left_out_count": 6,
        "left_out_block": 3,
        "test_points": 5,
        **gt,
    }
    return small_config(tmp_path, model={"hidden": [16]}, groundtruth=settings)


def arrays(root):
    return zarr.open_array(str(root / "loo.zarr"))[:], zarr.open_array(str(root / "full.zarr"))[:]


@pytest.fixture
def trained(tmp_path):
    config = gt_config(tmp_path)
    tdastore.train(config, progress=False)
    return config


def test_store_holds_each_replica(ray_cluster, tmp_path, trained):
    root = run_groundtruth(trained, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    loo, full = arrays(root)
    assert manifest["status"] == "complete" and loo.shape == (3, 5, 6, 4) and full.shape == (3, 5, 4)
    assert manifest["evals"]["labels"] == [1, 2, 3] and len(manifest["left_out"]) == 6
    task = TabularTask(trained.task, trained.model)
    trainer = ReplicaTrainer(
        load_model(trained, task), task, trained.groundtruth, task.examples("train"), task.examples("test").slice(0, 5)
    )
    direct = trainer.run([3], manifest["left_out"][4:6]).numpy()  # seed 3, left-out rows 4 and 5
    np.testing.assert_allclose(full[:, :, 3], direct[:, :, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(loo[:, :, 4:6, 3], direct[:, :, 0, 1:], rtol=1e-6)


def test_killed_worker_then_rerun_resumes_to_the_same_result(ray_cluster, tmp_path, trained):
    reference = arrays(run_groundtruth(trained, progress=False))
    config = load_config(
        {
            **tdastore.config.config_to_dict(trained),
            "groundtruth": {**tdastore.config.config_to_dict(trained)["groundtruth"], "output": str(tmp_path / "gt2")},
        }
    )
    with pytest.raises(StoreError, match="rerun the same command to resume"):
        run_groundtruth(config, progress=False, fault={"unit": "0001-0000"}, max_retries=0)
    root = tmp_path / "gt2"
    assert json.loads((root / "manifest.json").read_text())["status"] == "running"
    assert not (root / "units" / "0001-0000.done").exists()
    run_groundtruth(config, progress=False)
    resumed = arrays(root)
    np.testing.assert_array_equal(resumed[0], reference[0])
    np.testing.assert_array_equal(resumed[1], reference[1])


def test_a_flipped_value_is_refused_and_the_rerun_recomputes_its_unit(ray_cluster, trained):
    """The issue's case: one value of loo.zarr flipped in place. Every read refuses it (its chunk's crc32c);
    rerunning ground-truth (or verify --deep, then the rerun) recomputes exactly that unit, bit for bit."""
    from tdastore.groundtruth.pool import finished_groundtruth
    from tdastore.store.checksums import read_array

    root = run_groundtruth(trained, progress=False)
    read = lambda: (finished_groundtruth(root), read_array(root / "loo.zarr", what="gt", fix="rerun"))  # noqa: E731
    job_damage_is_refused_and_repaired(root, "loo.zarr", read, lambda: run_groundtruth(trained, progress=False))


@pytest.mark.parametrize(
    "gt, words",
    [
        ({"left_out_count": None, "left_out_indices": [0, 5, 400]}, ["out of range 0..352"]),
        ({"left_out_count": None, "left_out_indices": [3, 7, 3]}, ["duplicates [3]"]),
        ({"left_out_count": 1000}, ["left_out_count must lie in 1..353"]),
    ],
)
def test_bad_left_out_sets(ray_cluster, tmp_path, trained, gt, words):
    config = gt_config(tmp_path, "bad", **gt)
    with pytest.raises(ConfigError) as err:
        run_groundtruth(config, progress=False)
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "gt, words",
    [
        ({"seeds": 0}, ["groundtruth.seeds", "zero seeds"]),
        ({"eval_every": 5}, ["groundtruth.eval_every", "1..3"]),
        ({"steps": 10}, ["not both"]),
        ({"left_out_every": 3}, ["set exactly one"]),
    ],
)
def test_bad_groundtruth_config(tmp_path, gt, words):
    with pytest.raises(ConfigError) as err:
        gt_config(tmp_path, **gt)
    assert all(w in str(err.value) for w in words)


def test_evaluate_refuses_another_models_ground_truth(ray_cluster, tmp_path, trained):
    from tdastore.distributed.build import build_store
    from tdastore.evaluate.run import evaluate

    root = run_groundtruth(trained, progress=False)
    other = small_config(tmp_path, model={"hidden": [16]}, train={"epochs": 7, "output_dir": str(tmp_path / "other")})
    tdastore.train(other, progress=False)
    store = build_store(other, tmp_path / "other_store", progress=False)
    with pytest.raises(StoreError, match="another model"):
        evaluate(store, root, methods=["grad_dot"], progress=False)
    with pytest.raises(StoreError, match="not a ground-truth store"):
        evaluate(store, tmp_path / "other_store", methods=["grad_dot"], progress=False)
    with pytest.raises(StoreError, match="is a ground-truth store, not a gradient store"):
        tdastore.open_store(root)


def test_a_unit_refuses_other_weights_than_the_jobs(trained):
    from tdastore.groundtruth.pool import check_fingerprint
    from tdastore.tasks.base import model_fingerprint

    task = TabularTask(trained.task, trained.model)
    model = load_model(trained, task)
    job = {"model": {"fingerprint": model_fingerprint(model)}}
    check_fingerprint(model, job, Path("gt"))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # another model of the same shape
    with pytest.raises(StoreError, match="weights changed since job 'gt' began"):
        check_fingerprint(model, job, Path("gt"))


def test_a_creation_stopped_before_its_manifest_is_redone(tmp_path):
    from tdastore.store.job_store import CREATING, create_or_reopen

    root = tmp_path / "job"

    def create():
        (root / "data").write_text("x")
        return {"kind": "demo", "identity": 1}

    def stopped():
        (root / "half").write_text("written before the driver was killed")
        raise KeyboardInterrupt

    args = (
        lambda r: json.loads((r / "manifest.json").read_text()),
        lambda m: [],
    )
    with pytest.raises(KeyboardInterrupt):
        create_or_reopen(root, *args, stopped, refused=str, not_ours="not ours")
    assert (root / CREATING).exists() and not (root / "manifest.json").exists()
    manifest = create_or_reopen(root, *args, create, refused=str, not_ours="not ours")
    assert manifest["identity"] == 1 and not (root / "half").exists() and not (root / CREATING).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "file").write_text("someone else's")
    with pytest.raises(StoreError, match="not ours"):
        create_or_reopen(foreign, *args, create, refused=str, not_ours="not ours")
    assert (foreign / "file").read_text() == "someone else's"


def test_lds_runs_and_score(ray_cluster, tmp_path):
    """The LDS job's stored runs equal the engine's subset replicas; the score equals a scipy loop; evaluate
    reports it beside the cosine."""
    from scipy.stats import spearmanr

    from tdastore.distributed.build import build_store
    from tdastore.evaluate.metrics import linear_datamodeling_score
    from tdastore.evaluate.run import evaluate
    from tdastore.groundtruth.lds import read_lds, run_lds

    lds = {"subsets": 6, "fraction": 0.5, "seeds": 2, "subset_block": 4, "workers": 2}
    gt = {"output": str(tmp_path / "gt"), "epochs": 2, "eval_every": 1, "lr": 0.01, "batch_size": 64, "seeds": 2}
    gt |= {"seed_block": 2, "left_out_count": 4, "left_out_block": 4, "test_points": 5, "coupling": "subtract"}
    metagrad = {"rows": "all", "seeds": 1}  # every row scored: the metagradient gets an LDS too
    config = small_config(tmp_path, model={"hidden": [16]}, lds=lds, groundtruth=gt, metagrad=metagrad)
    tdastore.train(config, progress=False)
    gt = run_groundtruth(config, progress=False)
    root = run_lds(config, gt, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["subsets"]) == 6
    assert all(len(rows) == round(0.5 * 353) for rows in manifest["subsets"])
    task = TabularTask(config.task, config.model)
    trainer = ReplicaTrainer(
        load_model(config, task), task, config.groundtruth, task.examples("train"), task.examples("test").slice(0, 5)
    )
    direct = trainer.run([1], manifest["subsets"][4:6]).numpy()  # seed 1, subsets 4 and 5 (the second unit)
    stored = zarr.open_array(str(root / "subsets.zarr"))[:]
    np.testing.assert_allclose(stored[:, :, 4:6, 1], direct[:, :, 0, 1:], rtol=1e-6)
    job_damage_is_refused_and_repaired(
        root, "subsets.zarr", lambda: read_lds(root), lambda: run_lds(config, gt, progress=False)
    )
    actual, _ = read_lds(root)  # [E, T, M]
    full = zarr.open_array(str(root / "full.zarr"))[:]
    np.testing.assert_allclose(actual[:, :, 5], (stored[:, :, 5, :] - full).mean(-1), rtol=1e-6)

    scores = np.random.default_rng(0).normal(size=(5, 353))
    found = linear_datamodeling_score(actual, scores, manifest["subsets"])
    for e in range(actual.shape[0]):
        by_hand = [spearmanr([scores[t, rows].sum() for rows in manifest["subsets"]], actual[e, t]).statistic
                   for t in range(5)]  # fmt: skip
        np.testing.assert_allclose(found["lds"][e], np.mean(by_hand), rtol=1e-9)

    # lds.coupling: delete beside a subtract ground truth: its own store, the engine's delete replicas
    raw = tdastore.config.config_to_dict(config)
    deleting = tdastore.load_config({**raw, "lds": {**raw["lds"], "coupling": "delete", "subsets": 2, "seeds": 1}})
    root_delete = run_lds(deleting, gt, progress=False)
    assert root_delete.name == "lds-delete" and root.name == "lds-subtract"
    delete_trainer = ReplicaTrainer(
        load_model(config, task),
        task,
        dataclasses.replace(config.groundtruth, coupling="delete"),
        task.examples("train"),
        task.examples("test").slice(0, 5),
    )
    subsets = json.loads((root_delete / "manifest.json").read_text())["subsets"]
    direct = delete_trainer.run([0], subsets).numpy()  # [E, T, 1, 1 + 2]
    stored = zarr.open_array(str(root_delete / "subsets.zarr"))[:]  # [E, T, 2, 1]
    np.testing.assert_allclose(stored[:, :, :, 0], direct[:, :, 0, 1:], rtol=1e-6)

    store = build_store(config, tmp_path / "store", progress=False)
    methods = ["grad_dot", "if_gn", "adam_dot", "metagrad", "adam_replay"]
    results = evaluate(store, gt, methods=methods, out=tmp_path / "ev", progress=False,
                       metrics=("cosine", "lds"), damping_grid=(10.0, 0.1, "auto"))  # fmt: skip
    for name in ("grad_dot", "if_gn", "metagrad"):
        assert len(results["methods"][name]["lds"]) == 2 and all(-1 <= v <= 1 for v in results["methods"][name]["lds"])
    # the metagradient's LDS at evaluation point e uses its scores at e: Spearman by hand over the subsets
    from tdastore.groundtruth.metagrad_pool import read_metagrad_scores

    every, _ = read_metagrad_scores(gt / "metagrad-subtract")  # [E, T, N]
    for e in range(2):
        by_hand = [spearmanr([every[e, t, rows].sum() for rows in manifest["subsets"]], actual[e, t]).statistic
                   for t in range(5)]  # fmt: skip
        assert results["methods"]["metagrad"]["lds"][e] == pytest.approx(np.mean(by_hand), rel=1e-9)
    # adam_replay's LDS at e uses its replay to e's step over every row: with SGD on frozen gradients that is
    # lr x steps x Grad-Dot, so the same ranking of the subsets as Grad-Dot's at every point
    np.testing.assert_allclose(
        results["methods"]["adam_replay"]["lds"], results["methods"]["grad_dot"]["lds"], atol=1e-9
    )
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "Linear datamodeling score" in report
    assert results["lds"]["subsets"] == 6
    # the damping sweep: damped methods only, the default factor reproduces the main table, lambda follows the factor
    sweep = results["damping_sweep"]
    assert set(sweep) == {"if_gn", "adam_dot"} and set(sweep["if_gn"]) == {"10.0", "0.1", "auto"}
    assert set(sweep["adam_dot"]) == {"10.0", "0.1"}  # Adam's eps = factor x mean sqrt(v)
    assert sweep["adam_dot"]["10.0"]["eps"] == pytest.approx(100 * sweep["adam_dot"]["0.1"]["eps"])
    assert len(results["methods"]["adam_dot"]["cosine"]) == 2
    np.testing.assert_allclose(sweep["if_gn"]["10.0"]["cosine"], results["methods"]["if_gn"]["cosine"], rtol=1e-6)
    assert sweep["if_gn"]["10.0"]["damping"] == pytest.approx(100 * sweep["if_gn"]["0.1"]["damping"])
    assert sweep["if_gn"]["auto"]["damping"] >= 0 and len(sweep["if_gn"]["auto"]["lds"]) == 2
    assert "## Damping" in report and (tmp_path / "ev" / "damping.png").stat().st_size > 1000


def test_gold_standard_workers_ask_ray_for_gpus_on_cuda(ray_cluster, tmp_path, trained, monkeypatch):
    """With device cuda the ground truth's actors request build.gpus_per_worker GPUs (checked on the options
    the pool passes, on a cluster that claims one GPU; nothing runs on a GPU here); with cpu they do not."""
    import ray

    import tdastore.groundtruth.pool as pool
    from tdastore.distributed.pool import device_options

    assert device_options("cuda:0", 2, 0.5, cluster_gpus=1) == {"num_cpus": 2, "max_restarts": 0, "num_gpus": 0.5}
    assert device_options("cpu", 2, 0.5, cluster_gpus=1) == {"num_cpus": 2, "max_restarts": 0}
    seen = []

    class Refused(Exception):
        pass

    def options(**kwargs):
        seen.append(kwargs)
        raise Refused

    monkeypatch.setattr(pool, "UnitWorker", type("FakeWorker", (), {"options": staticmethod(options)}))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    raw = tdastore.config.config_to_dict(trained)
    for device, name in (("cuda", "gpu"), ("cpu", "cpu")):
        gt = {**raw["groundtruth"], "output": str(tmp_path / name)}
        config = tdastore.load_config(
            {**raw, "device": device, "groundtruth": gt, "build": {**raw["build"], "gpus_per_worker": 0.25}}
        )
        with pytest.raises(Refused):
            run_groundtruth(config, progress=False)
    assert seen[0]["num_gpus"] == 0.25 and "num_gpus" not in seen[1]
