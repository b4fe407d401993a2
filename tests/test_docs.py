"""The docs site covers what it promises: every public name has a reference entry and a docstring, every CLI
command and config field is in the generated reference, the examples have pages, and the README is an
overview whose links into the docs resolve. (CI builds the site itself with `mkdocs build --strict`.)"""

import ast
import dataclasses
import importlib
import importlib.util
import re
import typing
from pathlib import Path

import tdastore

ROOT = Path(__file__).parents[1]


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_reference_entry_and_a_docstring():
    api = (ROOT / "docs" / "reference" / "api.md").read_text()
    for name in tdastore.__all__:
        assert f"::: tdastore.{name}\n" in api, name
        if name == "__version__":  # an attribute's docstring is the string after it
            tree = ast.parse((ROOT / "tdastore" / "version.py").read_text())
            after = tree.body[[isinstance(n, ast.Assign) for n in tree.body].index(True) + 1]
            assert isinstance(after, ast.Expr) and isinstance(after.value.value, str)
            continue
        doc = getattr(tdastore, name).__doc__ or ""
        assert len(doc) > 40 and not doc.startswith(f"{name}("), f"{name} has no docstring of its own"


def test_every_command_and_config_field_is_in_the_generated_reference():
    docs = hooks()
    cli, config = docs.cli_reference(), docs.config_reference()
    commands = docs.subcommands()
    assert len(commands) >= 15
    for name, parser in commands.items():
        assert f"## tdastore {name}\n" in cli
        for action in parser._actions:  # noqa: SLF001
            for flag in action.option_strings:
                if flag.startswith("--") and "." not in flag and flag != "--help":
                    assert flag in cli or f"--{flag.split('-', 3)[-1]}" in config, (name, flag)
    from tdastore.config import Config, yaml_key

    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(hints[section.name]):
            for field in dataclasses.fields(hints[section.name]):
                row = next(line for line in config.splitlines() if f"`--{section.name}.{yaml_key(field)}`" in line)
                assert not row.endswith("|  |"), f"{section.name}.{field.name} has no description"
    assert "| `adam_dot` |" in docs.method_table()
    http = docs.http_reference()
    assert "`/query`" in http and "`/reload`" in http and "`tokens`" in http


def test_examples_have_pages_and_recorded_outputs():
    nav = (ROOT / "mkdocs.yml").read_text()
    for example in sorted((ROOT / "examples").glob("*.py")):
        pages = [p for p in (ROOT / "docs" / "examples").glob("*.md") if f"examples/{example.name}" in p.read_text()]
        assert pages, f"{example.name} has no docs page"
        assert f"examples/{pages[0].name}" in nav
        assert (ROOT / "examples" / "outputs" / f"{example.stem}.txt").is_file()


def test_the_readme_is_an_overview_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) > 20
    for link in links:
        assert (ROOT / link).exists(), link
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav or page.name == "index.md", f"{page} not in the nav"


def test_the_task_class_of_the_how_to_builds_a_store_of_its_gradients(ray_cluster, tmp_path, monkeypatch):
    """docs/how-to/own-model.md's task class, as written: trained, built, its rows autograd's gradients."""
    import numpy as np
    import torch

    block = re.findall(r"```python\n(.*?)\n```", (ROOT / "docs/how-to/own-model.md").read_text(), flags=re.S)[1]
    (tmp_path / "digits_page.py").write_text(block)  # the user's module, which the workers never import
    monkeypatch.syspath_prepend(str(tmp_path))
    task = importlib.import_module("digits_page").Digits()
    config = tdastore.load_config(
        {"train": {"epochs": 1, "output_dir": str(tmp_path / "model")}, "build": {"workers": 1}, "device": "cpu"}
    )
    tdastore.train(config, task=task, progress=False)
    store = tdastore.build(config, tmp_path / "store", task=task, progress=False)
    train = task.examples("train")
    assert len(store.meta) == len(train) == 1437
    model = task.make_model()
    model.load_state_dict(tdastore.Attributor(store, "grad_dot").model.state_dict())
    loss = task.per_example_loss(model(train.inputs[7:8]), train.targets[7:8]).sum()
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
    np.testing.assert_allclose(np.asarray(store.grads[7]), expected, rtol=1e-4, atol=1e-6)


def test_every_yaml_config_in_the_docs_is_valid():
    """Each YAML block of the docs that is a config loads (unknown keys and wrong types would be refused)."""
    import yaml

    from tdastore.config import Config

    sections = {field.name for field in dataclasses.fields(Config)}
    checked = 0
    for page in (ROOT / "docs").rglob("*.md"):
        for block in re.findall(r"```yaml\n(.*?)\n```", page.read_text(), flags=re.S):
            settings = yaml.safe_load(block)
            if isinstance(settings, dict) and set(settings) <= sections:
                tdastore.load_config(settings)
                checked += 1
    assert checked >= 2
