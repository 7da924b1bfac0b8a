"""Seeding, devices, autocast and run provenance (package versions, git commit)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive each worker's Python and NumPy seeds from torch's."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``, or CUDA when available and the CPU otherwise."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``"auto"`` to fp16 on CUDA and fp32 on the CPU, and reject fp16 on the CPU.

    fp32 is the CPU default because bfloat16 matrix products are slower than float32
    on CPUs without native bfloat16 units; ``precision="bf16"`` turns CPU autocast on.
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"invalid precision='fp16' on device {device}: float16 autocast with loss scaling "
                         "needs CUDA; use 'bf16' or 'fp32' on the CPU")
    return precision


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """Return a zero-argument function that opens the autocast context for ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: none on the CPU, where the model needs every core; up to 4 beside a GPU."""
    if device.type == "cpu":
        return 0
    return min(4, max(1, (os.cpu_count() or 2) - 1))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA's max allocated on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        # ru_maxrss is in KiB on Linux.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # Windows has no resource module.
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a run's numbers depend on."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("msd-core", "torch", "transformers", "tokenizers", "numpy", "pandas", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """Return the commit of the git work tree containing ``path`` (default: this package), or None."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")
