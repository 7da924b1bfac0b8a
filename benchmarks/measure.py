"""Peak memory and step time of one benchmark configuration, on the CPU or on CUDA.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, that is
  the largest total of live tensors. The CUDA context and memory that the caching
  allocator has reserved but not handed out are not counted.
- CPU (Linux): the process's resident set. Writing ``5`` to ``/proc/self/clear_refs``
  resets the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) to the
  current resident set, so the peak of the measured steps is read without the peak of
  the set-up before them. Free heap memory is first handed back to the kernel with
  glibc's ``malloc_trim``, so memory freed during the warm-up is not counted as in use.
  Elsewhere the lifetime peak is the fallback (``ru_maxrss`` on macOS, the peak working
  set on Windows), which includes set-up. NOTE: those two paths have not been run.
  Memory-only workers (``exact_memory``) also set ``MALLOC_MMAP_THRESHOLD_``, so large
  blocks are unmapped when freed rather than kept in a fragmented heap.

Both report ``base_mb``, the memory in use before the measured steps (weights, teacher,
optimizer state, gradients, batches), and ``peak_mb``. Their difference ``step_mb`` is
what the steps themselves add: activations, features, logits and temporary buffers.

Step time: wall-clock ``time.perf_counter`` and process CPU time (all threads) on the
CPU; CUDA events around each step on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _trim_heap() -> None:
    """Return free heap pages to the kernel (glibc only; a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak-memory meter for a block of steps on ``device`` (methods in the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = self._choose_method()
        self.base_mb = 0.0

    def _choose_method(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        try:
            if _status_kib("VmHWM") is not None:
                _CLEAR_REFS.write_text("5")
                return "resident set high-water mark, reset before the measured steps (/proc/self/clear_refs)"
        except OSError:
            pass
        return "lifetime peak resident set (ru_maxrss, or the peak working set on Windows), includes set-up"

    def start(self) -> None:
        """Free what can be freed, record the memory in use, and reset the peak."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _trim_heap()
        if self.method.startswith("resident set high-water"):
            self.base_mb = _status_kib("VmRSS") / 1024
            _CLEAR_REFS.write_text("5")
        else:
            self.base_mb = _lifetime_peak_mb()

    def peak_mb(self) -> float:
        """Return the peak memory in MiB since ``start()``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method.startswith("resident set high-water"):
            return _status_kib("VmHWM") / 1024
        return _lifetime_peak_mb()


def _lifetime_peak_mb() -> float:
    """Return the process's peak resident set since it started, in MiB."""
    try:
        import resource
    except ImportError:  # Windows: the peak working set
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def time_step(step: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Run ``step`` once and return (wall seconds, process CPU seconds or None on CUDA).

    On CUDA the wall time is measured with CUDA events, so it covers the queued kernels
    and not only the Python that launched them.
    """
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop) / 1000.0, None
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu
