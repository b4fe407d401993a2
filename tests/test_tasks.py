import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config

import tdastore
from tdastore.config import ModelConfig, TaskConfig
from tdastore.errors import DataError, StoreError
from tdastore.tasks import TabularTask
from tdastore.training import load_model


@pytest.mark.parametrize(
    "name, kind, n, d",
    [
        ("diabetes", "regression", 442, 10),
        ("breast_cancer", "classification", 569, 30),
        ("digits", "classification", 1797, 64),
        ("wine", "classification", 178, 13),
    ],
)
def test_bundled_sets_split_and_standardise(name, kind, n, d):
    task = TabularTask(TaskConfig(dataset=name))
    train, test = task.examples("train"), task.examples("test")
    assert task.kind == kind and task.n_features == d
    assert len(train) + len(test) == n and abs(len(test) - round(0.2 * n)) <= 1
    assert set(train.ids.tolist()).isdisjoint(test.ids.tolist())
    np.testing.assert_allclose(train.inputs.mean(0).numpy(), 0, atol=1e-5)
    assert torch.allclose(train.inputs.std(0, unbiased=False)[train.inputs.std(0) > 0], torch.tensor(1.0), atol=1e-4)
    again = TabularTask(TaskConfig(dataset=name))
    assert torch.equal(again.examples("train").inputs, train.inputs)  # deterministic split
    assert task.fingerprint() == again.fingerprint()
    assert TabularTask(TaskConfig(dataset=name, split_seed=1)).fingerprint() != task.fingerprint()


def test_model_shape_and_losses():
    task = TabularTask(TaskConfig(dataset="wine"), ModelConfig(hidden=[16, 8]))
    model = task.make_model()
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [16, 8, 3]
    data = task.examples("train")
    out = model(data.inputs[:5])
    expected = -torch.log_softmax(out, 1)[torch.arange(5), data.targets[:5]]
    torch.testing.assert_close(task.per_example_loss(out, data.targets[:5]), expected)


def _frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    return {"uid": np.arange(100, 100 + n), "x1": x1, "x2": x2, "y": 2 * x1 - x2, "cls": np.where(x1 > 0, "a", "b")}


def test_csv_and_parquet_tasks(tmp_path):
    cols = _frame()
    pq.write_table(pa.table(cols), tmp_path / "d.parquet")
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table(cols), tmp_path / "d.csv")
    for path in ("d.parquet", "d.csv"):
        reg = TabularTask(
            TaskConfig(
                dataset=str(tmp_path / path), kind="regression", target="y", features=["x1", "x2"], id_column="uid"
            )
        )
        assert reg.n_features == 2 and reg.examples("train").ids.min() >= 100
        cls = TabularTask(
            TaskConfig(dataset=str(tmp_path / path), kind="classification", target="cls", features=["x1", "x2"])
        )
        assert cls.n_outputs == 2 and set(cls.examples("train").targets.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "mutate, cfg, words",
    [
        (lambda c: c.__setitem__("x1", np.where(np.arange(60) == 7, np.nan, c["x1"])), {}, ["NaN/Inf", "row", "x1"]),
        (lambda c: c.__setitem__("x2", np.where(np.arange(60) == 3, np.inf, c["x2"])), {}, ["NaN/Inf", "x2"]),
        (lambda c: [c.__setitem__(k, v[:0]) for k, v in list(c.items())], {}, ["no rows"]),
        (lambda c: None, {"target": "nope"}, ["task.target", "nope"]),
        (lambda c: None, {"kind": None}, ["task.kind is required"]),
        (lambda c: None, {"features": ["x1", "cls"]}, ["cls", "not numeric"]),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, mutate, cfg, words):
    cols = _frame()
    mutate(cols)
    pq.write_table(pa.table(cols), tmp_path / "bad.parquet")
    settings = {
        "dataset": str(tmp_path / "bad.parquet"),
        "kind": "regression",
        "target": "y",
        "features": ["x1", "x2"],
        **cfg,
    }
    with pytest.raises(DataError) as err:
        TabularTask(TaskConfig(**settings))
    for word in words:
        assert word in str(err.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        TabularTask(TaskConfig(dataset="mnist"))


def test_train_saves_weights_and_config(tmp_path):
    config = small_config(tmp_path, train={"epochs": 30})
    model = tdastore.train(config, progress=False)
    out = tmp_path / "model"
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert tdastore.load_config(out / "config.yaml") == config
    task = TabularTask(config.task, config.model)
    reloaded = load_model(config, task)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    import json

    log = json.loads((out / "train_log.json").read_text())
    assert log["train_loss"][-1] < 0.5 * log["train_loss"][0]  # SGD actually trained it


def test_missing_weights_is_a_clear_error(tmp_path):
    config = small_config(tmp_path)
    with pytest.raises(StoreError, match="tdastore train"):
        load_model(config, TabularTask(config.task, config.model))
