"""CPU threads that follow the load on the machine.

torch runs its kernels on an OpenMP team of one thread per core. When another process
holds a core, every parallel region waits at its barrier for the thread that lost its
core, so a small model's many short kernels slow down several-fold (a GMM training step on
2 cores: 1.2 s idle; 4.1 s with 2 threads beside one other busy process, 2.3 s with 1 thread).
Using no more threads than free cores avoids that: before each task the harness measures
how many cores are idle and uses that many threads (at least one). A thread count the user fixed (--threads or
OMP_NUM_THREADS) is left alone: float sums differ slightly with the thread count, so a
run that must repeat bit for bit on a shared machine pins it.
"""
from __future__ import annotations

import os
import time

import torch

_fixed: int | None = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None


def fix(n: int | None) -> None:
    """Pin torch to n threads for the rest of the process (None: follow the load again)."""
    global _fixed
    _fixed = n
    if n is not None:
        torch.set_num_threads(n)


def pinned() -> bool:
    """Whether the user fixed the thread count (then the load is not consulted)."""
    return _fixed is not None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all cores since boot, from /proc/stat; None where it does not exist."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return idle, sum(fields[:8])  # guest time is already counted in user


def idle_cores(window_s: float = 0.1) -> float | None:
    """How many cores were idle over the next window_s seconds (None where it cannot be read)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def threads_for(idle: float | None, cores: int) -> int:
    """Threads to use given the idle cores measured: a core counts as free when it is at least
    half idle; never more threads than usable cores, never fewer than one."""
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))


def follow_load() -> int:
    """Set torch's CPU threads to the idle cores now (unless fixed); return the count in use."""
    if not pinned():
        n = threads_for(idle_cores(), usable_cores())
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
    return torch.get_num_threads()
