"""Connect to Ray: an existing cluster when an address is given, else a local one (the embedded default)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import ray

from tdastore.errors import ConfigError


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port (or ray://host:port) that nothing answers on is refused in seconds: ray.init would retry
    for minutes without a word."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({err.strerror or err}): start one there (ray start --head "
            "--port PORT) or give the right --address / RAY_ADDRESS, or none for a local cluster"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Reuse a running Ray session, join `address` (or RAY_ADDRESS), or start a local cluster.

    Only a cluster started here is shut down on exit. A local cluster stays on loopback, with its dashboard on
    127.0.0.1:8265; workers' output (warnings, errors) is shown in this process, as a user expects.
    """
    if address:  # refused even when a session runs already: the caller named a cluster
        check_reachable(address)
    if ray.is_initialized():
        yield
        return
    with _keeping_sigterm_handler():
        _init(address, num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """ray.init installs its C++ failure handler for SIGTERM (it prints stack lines and ends the process): the
    Python handler a caller set before (the CLI's: stop between units, "rerun to resume") is put back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    if callable(before) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before)


def _init(address: str | None, num_cpus: int | None) -> None:
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        check_reachable(address)
    if address:
        # workers on other nodes receive the package itself (merged with a submitted job's working_dir)
        package = str(Path(__file__).resolve().parents[1])  # the tdastore package directory
        ray.init(address=address, log_to_driver=True, runtime_env={"py_modules": [package]})
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node IP 127.0.0.1: traffic on loopback
        # Ray starts workers at nice 15: on a busy machine a build crawled behind any other process (643 s vs
        # ~100 s). The work is the user's own job, so it runs at the driver's priority (as Ray's job manager does)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
        )
