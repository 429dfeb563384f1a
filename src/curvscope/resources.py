"""What the machine offers now: the CPUs this process may use and a device's free memory.

The CPUs give the default thread count, the free memory the default budgets of kept graphs and SLQ
bases.
"""

from __future__ import annotations

import os

import torch


def available_cpus() -> int:
    """The number of CPUs this process may run on.

    Its affinity mask; ``os.cpu_count()`` where the platform has no affinity.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def available_memory(device: torch.device | str) -> int | None:
    """Bytes available now on ``device``; None where it cannot be read.

    ``MemAvailable`` of /proc/meminfo on the CPU (the free physical pages elsewhere), free memory on
    CUDA.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_share(device: torch.device | str, share: float, fallback: int = 1 << 30) -> int:
    """``share`` of :func:`available_memory` in bytes, or ``fallback`` where it is unknown."""
    available = available_memory(device)
    return fallback if available is None else int(share * available)
