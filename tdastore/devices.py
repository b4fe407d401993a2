"""Where compute runs: the config's `device` (auto | cpu | cuda | cuda:N | mps) as a torch.device, refused
clearly when this machine has no such device. Ray schedules GPU workers by `build.gpus_per_worker`."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from pathlib import Path

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


_CBWR_AUTO, _CBWR_STRICT, _CBWR_ALL = 2, 0x10000, ~0  # mkl_cbwr.h: MKL_CBWR_AUTO, MKL_CBWR_STRICT, MKL_CBWR_ALL
STRICT_PRODUCTS = "AUTO,STRICT"


@functools.cache
def reproducible_cpu_products() -> bool:
    """Ask MKL, torch's CPU BLAS on x86, for strict conditional bitwise reproducibility (MKL_CBWR=AUTO,STRICT).

    Why: by default MKL's sgemm picks its kernel and splits the work by the thread count, so one product of
    [128, 1024] x [1024, 256] gives other last bits under 1 thread than under 2 on a CPU with AVX-512 (and
    [7, 333] x [333, 65] does on one without), and two builds of one store differed in 65% of their entries: a Ray
    worker with one thread, the driver with two. Strict mode makes ?gemm independent of thread count and
    alignment and keeps the CPU's fastest instruction set (AUTO), so stores are bitwise equal across workers,
    processes, object stores and resumed builds on one CPU; it cannot make different CPUs agree.

    MKL reads the mode once, at its first product. The environment variable carries it to child processes
    (Ray workers started from here, subprocesses), and the call below sets it in this process, which works
    while no product has run (tdastore calls this on import). A MKL_CBWR the user set is left alone. Returns
    whether strict mode is on; False where torch has no MKL (Arm, macOS), whose own kernels decide."""
    user_mode = os.environ.get("MKL_CBWR")
    os.environ.setdefault("MKL_CBWR", STRICT_PRODUCTS)
    if not torch.backends.mkl.is_available():
        return False
    try:
        mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        if user_mode is None:
            mkl.mkl_serv_cbwr_set(_CBWR_AUTO | _CBWR_STRICT)  # refused (-8) once MKL has run: checked below
        strict = bool(mkl.mkl_serv_cbwr_get(_CBWR_ALL) & _CBWR_STRICT)
    except (OSError, AttributeError):  # another platform's library name, or an MKL without these entry points
        return False
    if not strict and user_mode is None:
        warnings.warn(
            "MKL ran a product before tdastore was imported, so its results here depend on the thread count "
            f"(last bits only): import tdastore first, or start Python with MKL_CBWR={STRICT_PRODUCTS}",
            stacklevel=2,
        )
    return strict
