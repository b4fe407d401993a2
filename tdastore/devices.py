"""Where compute runs: the config's `device` (auto | cpu | cuda | cuda:N | mps) as a torch.device, refused
clearly when this machine has no such device. Ray schedules GPU workers by `build.gpus_per_worker`."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

from tdastore.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """auto: CUDA if present, else MPS, else the CPU; a named device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    kind, _, number = name.partition(":")
    if kind not in DEVICES[1:] or (number and not number.isdigit()) or (number and kind != "cuda"):
        raise ConfigError(f"device '{name}' is not one of auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but torch sees no CUDA device here: use device: cpu or auto")
    if kind == "cuda" and number and int(number) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but torch sees no MPS device here: use device: cpu or auto")
    return torch.device(name)


def wants_gpu(name: str, cluster_gpus: float = 0.0) -> bool:
    """Whether workers should ask Ray for GPUs: cuda named, or auto on a cluster that has GPUs (decided by the
    cluster's resources, not the driver's own hardware: a driver node may have none)."""
    return name.startswith("cuda") or (name == "auto" and cluster_gpus > 0)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (inputs and work tensors follow them)."""
    return next(model.parameters()).device


def on_device(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The model moved to the config's device (`auto` decided by this process's own hardware)."""
    return model.to(resolve_device(name))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@functools.cache
def keep_cpu_allocations(limit: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks below `limit` from its heap and to keep freed ones there for the next step.

    Why: glibc maps every block over its mmap threshold afresh and unmaps it on free, and returns the heap's
    free top to the system past 128 KiB, so a training step that allocates [replicas, batch, ...] tensors
    page-faults through all of them again every step. On the text replica engine that was 40% of the eager
    time (22 -> 37 replica-steps/s, benchmarks/text_groundtruth.py). The cost: this process keeps up to `limit`
    of freed memory mapped instead of returning it. Called by the training loops on the CPU (once per
    process); does nothing where the C library is not glibc. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):  # musl and others: no libc.so.6 or no mallopt
        return False
