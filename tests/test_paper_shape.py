"""The shape of the paper's finding on the embedded regression set (diabetes, MLP d-128-128-1).

First-order methods agree best early and decay with more further training; the damped Gauss-Newton
influence rises; Grad-Cos sits below Grad-Dot; DataInf tracks Grad-Dot (PAPER.md, Energy / Folktables).
Sized to be stable in CI: 10 seeds, 50 left-out rows, 50 evaluation points over 100 epochs.
"""

import json

import numpy as np
import pytest

import tdastore
from tdastore.distributed.build import build_store
from tdastore.evaluate.run import evaluate
from tdastore.groundtruth.pool import run_groundtruth


@pytest.fixture(scope="module")
def results(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shape")
    config = tdastore.load_config(
        {
            "task": {"dataset": "diabetes"},
            "model": {"hidden": [128, 128]},
            "train": {"lr": 0.01, "batch_size": 32, "epochs": 300, "output_dir": str(tmp / "model")},
            "store": {"chunk_rows": 64, "shard_rows": 64},
            "groundtruth": {
                "lr": 0.003,
                "batch_size": 128,
                "epochs": 100,
                "eval_every": 2,
                "seeds": 10,
                "seed_block": 5,
                "left_out_count": 50,
                "left_out_block": 50,
                "output": str(tmp / "gt"),
            },
        }
    )
    tdastore.train(config, progress=False)
    store = build_store(config, tmp / "store", progress=False)
    root = run_groundtruth(config, progress=False)
    out = tmp / "evaluation"
    methods = ["grad_dot", "grad_cos", "if_gn", "datainf", "adam_replay"]
    evaluated = evaluate(store, root, methods=methods, out=out, progress=False)
    return evaluated, out


def test_paper_shape(results):
    evaluated, _ = results
    cos = {name: np.asarray(entry["cosine"]) for name, entry in evaluated["methods"].items()}
    assert len(cos["grad_dot"]) == 50
    assert cos["grad_dot"][0] >= 0.6
    assert cos["grad_dot"][-1] < cos["grad_dot"][0]
    assert cos["if_gn"][-1] > cos["if_gn"][0]
    assert cos["grad_cos"][0] < cos["grad_dot"][0]
    assert np.abs(cos["datainf"] - cos["grad_dot"]).max() <= 0.1
    assert all(entry["path"] == "exact" for entry in evaluated["methods"].values())
    # SGD on frozen gradients is linear in them: the replay to each point is lr x steps x Grad-Dot there
    np.testing.assert_allclose(cos["adam_replay"], cos["grad_dot"], atol=1e-5)
    assert evaluated["methods"]["adam_replay"]["replay_steps"] == "each evaluation point"


def test_report_files(results):
    evaluated, out = results
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"grad_dot", "grad_cos", "if_gn", "datainf", "adam_replay"}
    entry = saved["methods"]["grad_dot"]
    assert len(entry["cosine"]) == len(entry["stderr"]) == len(entry["spearman"]) == 50
    assert set(entry["seed_curve"]) == {"1", "2", "5", "10"}
    report = (out / "report.md").read_text()
    assert "| grad_dot | exact |" in report and "Seed curves" in report
    ceiling = np.asarray(saved["gold_ceiling"])  # [E]: a perfect method against these 10 seeds
    assert len(ceiling) == 50 and "| *ceiling* | seeds |" in report
    assert (ceiling > np.asarray(entry["cosine"]) - 0.05).all() and (ceiling <= 1).all()
    for plot in ("cosine.png", "seed_curves.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
