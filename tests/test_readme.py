"""The README's two commands stay true: CI runs the test command verbatim, and the demo's config exists."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    demo, test = readme_commands()
    assert "pytest" in test and "torch==2.13.0" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
    # set -e lets a failed link of an && chain pass (a ruff failure once skipped the whole suite): checked after
    assert ci_lines[ci_lines.index(test) + 1].startswith("status=$?")


def test_demo_command_installs_torch_first_and_uses_shipped_config():
    demo, _ = readme_commands()
    assert demo.index("torch==2.13.0") < demo.index("pip install -e ")
    for config in re.findall(r"--config (\S+)", demo):
        assert (ROOT / config).is_file()


def test_package_declares_a_torch_range_that_admits_the_pinned_cpu_build():
    text = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"torch([^"]*)"', text).group(1)
    assert ">=" in spec and "<2.14" in spec  # never a range that pulls a newer (CUDA) build


def test_python_dash_m_tdastore_is_the_cli():
    """`python -m tdastore --help` lists the commands as `tdastore --help` does; the package ships py.typed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tdastore", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in ("build", "query", "ground-truth", "quickstart"))
    assert (ROOT / "tdastore" / "py.typed").is_file()


def readme_object_route() -> str:
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "model=net" in b)


def test_the_readme_object_route_runs_as_written_and_scores_like_an_autograd_loop(ray_cluster, tmp_path, monkeypatch):
    """The README's notebook route: build from objects, query new (X, y) points through the returned store,
    then the same store reopened with the objects handed again, as tensors, a list of pairs or a Dataset."""
    import numpy as np
    import pytest
    import torch

    import tdastore
    from tdastore.errors import ConfigError, DataError

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_object_route(), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    net, loss, X, y, top = scope["net"], scope["per_example_loss"], scope["X"], scope["y"], scope["top"]

    def gradient(i: int) -> np.ndarray:  # one autograd call per example
        net.zero_grad()
        loss(net(X[i : i + 1]), y[i : i + 1]).sum().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()]).numpy().copy()

    train = np.stack([gradient(i) for i in range(400)])  # [400, p]
    test = np.stack([gradient(i) for i in range(400, len(X))])  # [m, p]
    expected = test @ train.T / 400  # grad_dot with the paper's 1/n
    ranked = np.argsort(-expected, axis=1)[:, :3]
    got = top.to_pandas()
    assert len(got) == 3 * len(test)
    np.testing.assert_array_equal(got["train_id"].to_numpy().reshape(-1, 3), ranked)
    np.testing.assert_allclose(got["score"].to_numpy().reshape(-1, 3), np.take_along_axis(expected, ranked, 1),
                               rtol=1e-4, atol=1e-7)  # fmt: skip

    reopened = tdastore.open_store("runs/mine")
    with pytest.raises(ConfigError, match="model=net, loss=per_example_loss"):
        tdastore.Attributor(reopened, "grad_dot")
    again = tdastore.Attributor(reopened, "grad_dot", model=net, loss=loss, data=(X[:400], y[:400]))
    assert "grad_dot" in repr(again) and "400 rows" in repr(reopened)
    pairs = [(X[i], y[i]) for i in range(400, 410)]
    dataset = torch.utils.data.TensorDataset(X[400:410], y[400:410])
    for points in (pairs, dataset, (X[400:410].numpy(), y[400:410].numpy())):
        table = again.top_k(points, k=3).to_pandas()
        np.testing.assert_array_equal(table["train_id"].to_numpy().reshape(-1, 3), ranked[:10])
    with pytest.raises(DataError, match="without targets"):
        again.top_k(X[400:410], k=3)


def readme_llm_route() -> str:
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "make_tiny_lm(" in b)


def test_the_readme_llm_route_runs_as_written(ray_cluster, tmp_path, monkeypatch):
    """The README's LLM script: a factored store over every matrix, top-k, token shares that sum to each hit's
    score, a completion pair and the same chat giving the same answer, and a LoRA adapter's store whose rows are
    the adapter's parameters only, ranked as numpy ranks them."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_llm_route(), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    top, tokens = scope["top"].to_pandas(), scope["tokens"].to_pandas()
    assert len(top) == 3 and (tmp_path / "runs" / "tokens" / "tokens.html").is_file()
    for (rank, side), part in tokens.groupby(["rank", "side"]):
        document = part["document_score"].iloc[0]
        assert abs(part["score"].sum() - document) <= 1e-4 * abs(document) + 1e-6, (rank, side)
        assert abs(document - top["score"][top["rank"] == rank].iloc[0]) <= 1e-4 * abs(document)
    by_pair, by_chat = scope["by_pair"].to_pandas(), scope["by_chat"].to_pandas()
    np.testing.assert_array_equal(by_pair["train_id"], by_chat["train_id"])
    np.testing.assert_allclose(by_pair["score"], by_chat["score"], rtol=1e-5)
    assert scope["by_pair"].schema.metadata[b"tdastore.measurement"] == b"completion"
    lora, pair = scope["lora"], scope["pair"]
    modules = lora.manifest["projection"]["modules"]
    assert modules and all("lora_" in name for name in modules), modules
    attributor = scope["tdastore"].Attributor(lora, "grad_cos")
    t = attributor.test_rows(attributor.examples([pair])).astype(np.float64)[0]  # [K]
    g = np.asarray(lora.grads[:], dtype=np.float64)  # [N, K]
    cosines = g @ t / (np.linalg.norm(g, axis=1) * np.linalg.norm(t))
    np.testing.assert_array_equal(scope["lora_top"].column("train_row").to_numpy(), np.argsort(-cosines)[:3])
