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


def test_yaml_scientific_notation_and_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attribution:\n  cg_tol: 1e-6\ntrain:\n  lr: 3e-2\n")
    config = load_config(path)
    assert config.attribution.cg_tol == 1e-6 and config.train.lr == 0.03
    with pytest.raises(ConfigError, match="'epoch': did you mean 'epochs'"):
        load_config({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="must be a number, got 'fast'"):
        load_config({"train": {"lr": "fast"}})


def test_task_class_is_the_yaml_key_class(tmp_path):
    from tdastore.config import config_to_dict

    config = load_config({"task": {"class": "tabular"}})
    assert config.task.cls == "tabular" and config_to_dict(config)["task"]["class"] == "tabular"
    path = tmp_path / "c.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_every_config_field_is_a_flag(tmp_path, capsys):
    """The CLI's flags are generated from the config: one per field, YAML optional, overrides on top of it."""
    import dataclasses

    from tdastore.cli import main, make_parser
    from tdastore.cli.commands import run_config
    from tdastore.config import Config, yaml_key

    build = make_parser()._subparsers._group_actions[0].choices["build"]
    options = {o for action in build._actions for o in action.option_strings}
    for name, section in Config().__dict__.items():
        if not dataclasses.is_dataclass(section):  # a top-level setting: --device
            assert f"--{name}" in options
            continue
        for field in dataclasses.fields(section):
            assert f"--{name}.{yaml_key(field)}" in options
    path = tmp_path / "c.yaml"
    path.write_text("projection:\n  kind: gaussian\n  dim: 256\ntrain:\n  epochs: 3\n")
    args = make_parser().parse_args(
        ["build", "--config", str(path), "--projection.dim", "512", "--attribution.cg_tol", "1e-6"]
    )
    config = run_config(args)
    assert (config.projection.kind, config.projection.dim, config.train.epochs) == ("gaussian", 512, 3)
    assert config.attribution.cg_tol == 1e-6
    args = make_parser().parse_args(["train", "--projection.factors", "[8, 4]", "--task.target", "null"])
    assert run_config(args).projection.factors == [8, 4] and run_config(args).task.target is None
    assert main(["train", "--train.epoch", "3"]) == 2
    assert "did you mean '--train.epochs'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("tdastore ")


def test_list_flags_take_words_commas_or_yaml_and_yaml_errors_are_shown(capsys):
    """`*` starts a YAML alias: list items are read as words, so globs need no quoting inside quotes."""
    from tdastore.cli import make_parser
    from tdastore.cli.commands import run_config

    def modules(*words):
        return run_config(make_parser().parse_args(["build", "--gradients.modules", *words])).gradients.modules

    assert modules("*lora_B*", "*lora_A*") == ["*lora_B*", "*lora_A*"]
    assert modules("*.c_attn,*.c_fc") == ["*.c_attn", "*.c_fc"]
    assert modules("[a, b]") == ["a", "b"] and modules("auto") == "auto" and modules("null") is None
    parsed = make_parser().parse_args(["train", "--projection.factors", "8", "4", "--model.hidden", "16,8"])
    assert run_config(parsed).projection.factors == [8, 4] and run_config(parsed).model.hidden == [16, 8]
    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "--attribution.cg_tol", "[1e-6"])
    assert "is not a YAML value" in capsys.readouterr().err


def test_task_class_errors_name_the_fix():
    from tdastore.config import ModelConfig, TaskConfig
    from tdastore.tasks import make_task

    for path, words in [
        ("nomodule_xyz:Task", "cannot be imported"),
        ("tdastore.tasks.base:Examples", "not a tdastore.tasks.Task subclass"),
        ("justaname", "must be 'module:Class'"),
    ]:
        with pytest.raises(ConfigError, match=words):
            make_task(TaskConfig(cls=path), ModelConfig())
    assert type(make_task(TaskConfig(cls="tabular"))).__name__ == "TabularTask"
