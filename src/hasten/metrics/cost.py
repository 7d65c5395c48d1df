"""Cost measurements: wall-clock (warm-up, then median of repeats, device-synchronised), peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["peak_memory_bytes", "time_call"]


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, device: torch.device | None = None
) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; median and spread in seconds."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start a new peak-memory window; False where the platform cannot (then the peak is the process's)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """CUDA: ``max_memory_allocated``; CPU: the peak resident set size since :func:`reset_peak_memory`
    (Linux ``VmHWM``), else the process's lifetime peak."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
