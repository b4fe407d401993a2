"""A real Ray head on 127.0.0.1, the build job submitted through the job API, its store checked row for row."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import free_ports, small_config

import tdastore
from tdastore.config import save_config
from tdastore.distributed.build import build_store

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def stop_head(temp_dir: str, only: bytes = b"") -> int:
    """Kill only this head's processes (`ray stop` would also end the test session's own cluster); only: just
    those whose command line also holds these bytes. Returns how many were killed."""
    import signal

    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if temp_dir.encode() in cmdline and only in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            pass
    return killed


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, the job API
    address: str  # 127.0.0.1:PORT, what a driver joins
    temp_dir: str


@pytest.fixture
def ray_head(tmp_path):
    temp_dir = f"/tmp/tdastore-head-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port, dashboard, agent, grpc, metrics, client = free_ports(6)  # the session's own cluster holds the defaults
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", temp_dir)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_build_job_submitted_to_a_ray_head(ray_head, ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = small_config(tmp_path, store={"path": str(tmp_path / "job_store")})
    tdastore.train(config, progress=False)
    config_path = tmp_path / "job.yaml"
    save_config(config, config_path)
    client = JobSubmissionClient(ray_head.dashboard)
    deadline = time.time() + 120
    while True:  # the head's job agent takes a few seconds after `ray start` returns
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} jobs/build_index.py --config {config_path}",
                runtime_env={
                    "working_dir": str(ROOT),
                    "env_vars": {"TQDM_DISABLE": "1"},
                    "excludes": [".venv", ".git", "runs", "*.egg-info", "__pycache__", ".pytest_cache"],
                },
            )
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 300
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the job did not finish in 5 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    assert "status       complete" in logs
    submitted = tdastore.open_store(tmp_path / "job_store")
    local = build_store(config, tmp_path / "local_store", progress=False)
    np.testing.assert_array_equal(submitted.read_rows(), local.read_rows())
    assert submitted.meta.equals(local.meta)


def test_a_job_whose_ray_node_dies_exits_within_two_minutes_and_resumes(ray_head, ray_cluster, tmp_path):
    """The head's raylet killed under a running gold-standard job: the driver stops waiting, releases its lease
    and exits 2 with the resume message; the rerun keeps the units finished before the kill."""
    from test_groundtruth_pool import gt_config

    from tdastore.groundtruth.pool import run_groundtruth

    config = gt_config(tmp_path, epochs=1500, seeds=4, seed_block=1)  # units of ~1.5 s
    config = dataclasses.replace(config, build=dataclasses.replace(config.build, max_retries=2))
    tdastore.train(config, progress=False)
    config_path = tmp_path / "gt.yaml"
    save_config(config, config_path)
    root = Path(config.groundtruth.output)
    env = {**os.environ, "TQDM_DISABLE": "1", "RAY_ADDRESS": ""}
    driver = subprocess.Popen(
        [sys.executable, "-m", "tdastore", "ground-truth", "--config", str(config_path), "--address", ray_head.address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while not list(root.glob("units/*.done")):
            assert driver.poll() is None, driver.communicate()
            assert time.time() < deadline, "no unit finished in 3 minutes"
            time.sleep(0.2)
        assert stop_head(ray_head.temp_dir, only=b"raylet/raylet") == 1
        killed = time.time()
        _, stderr = driver.communicate(timeout=120)
        took = time.time() - killed
    finally:
        driver.kill()
    assert driver.returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "the Ray cluster went away" in lines[-1] and "rerun the same command to resume" in lines[-1], stderr
    assert "Traceback" not in stderr
    assert not (root / ".lease").exists()
    print(f"exited {took:.1f} s after the node died")
    kept = {path.name: path.stat().st_mtime_ns for path in root.glob("units/*.done")}
    units = len(json.loads((root / "manifest.json").read_text())["units"])
    assert 0 < len(kept) < units
    run_groundtruth(config, progress=False)  # the rerun, on the test session's cluster
    assert len(list(root.glob("units/*.done"))) == units
    assert all((root / "units" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
