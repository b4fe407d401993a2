import pytest

from tdastore.config import load_config, save_config
from tdastore.errors import ConfigError


def test_defaults_and_yaml_round_trip(tmp_path):
    config = load_config({"projection": {"kind": "sparse", "dim": 256, "nonzeros": 4}, "train": {"lr": 1}})
    assert config.projection.dim == 256 and config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.hidden == [128, 128]
    path = tmp_path / "c.yaml"
    save_config(config, path)
    assert load_config(path) == config


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"trian": {}}, ["unknown config key", "trian", "allowed keys"]),
        ({"train": {"learning_rate": 0.1}}, ["unknown config key", "learning_rate", "section 'train'"]),
        ({"train": {"epochs": "ten"}}, ["train.epochs", "integer"]),
        ({"train": {"lr": True}}, ["train.lr", "number"]),
        ({"model": {"hidden": 128}}, ["model.hidden", "list"]),
        ({"model": {"hidden": [128, "x"]}}, ["model.hidden[1]", "integer"]),
        ({"projection": {"kind": "gauss"}}, ["projection.kind", "gaussian"]),
        ({"projection": {"kind": "sparse", "dim": 100, "nonzeros": 3}}, ["projection.nonzeros", "divide"]),
        ({"store": {"chunk_rows": 64, "shard_rows": 100}}, ["store.shard_rows", "multiple"]),
        ({"task": {"test_fraction": 1.5}}, ["task.test_fraction"]),
        ({"train": []}, ["section 'train'", "mapping"]),
    ],
)
def test_bad_config_is_a_clear_error(raw, words):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    for word in words:
        assert word in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)
