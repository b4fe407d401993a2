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
