"""A real Ray head on 127.0.0.1, the build job submitted through the job API, its store checked row for row."""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import free_ports, small_config

import tdastore
from tdastore.config import save_config
from tdastore.distributed.build import build_store

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def stop_head(temp_dir: str) -> None:
    """Kill only this head's processes (`ray stop` would also end the test session's own cluster)."""
    import signal

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


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
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_build_job_submitted_to_a_ray_head(ray_head, ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = small_config(tmp_path, store={"path": str(tmp_path / "job_store")})
    tdastore.train(config, progress=False)
    config_path = tmp_path / "job.yaml"
    save_config(config, config_path)
    client = JobSubmissionClient(ray_head)
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
