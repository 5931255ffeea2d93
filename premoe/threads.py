"""How many CPU threads premoe's torch work uses, and how idle OpenMP threads wait.

Why this exists: torch starts one OpenMP thread per core, and between parallel regions those threads
*spin* (busy-wait) for a while before sleeping. On a machine where another CPU-bound process runs, a
spinning thread takes the core that the other process (or premoe's own lagging thread) needs, and every
parallel region waits for its slowest thread. Measured on 2 cores with one `while True: pass` beside it,
`premoe eval` took 3-7x its idle time with torch's defaults (bench/bench_threads.py). Two changes fix
most of it, and neither costs anything on an idle machine:

- ``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep instead of spinning;
- one thread per core that is *free* when the command starts (cores this process may use, from its CPU
  affinity and its cgroup's CPU quota, minus the other runnable tasks), so premoe never asks for more
  cores than it can get.

Both are set only where the user has not: an explicit ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` wins.
They must be set before torch is imported (OpenMP reads them once), so this module never imports torch.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import MutableMapping
from pathlib import Path


def usable_cpus() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota() -> int | None:
    """ceil(quota / period) of this process's cgroup, or None when unlimited or unknown."""
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if fields and fields[0] != "max":
            return max(1, math.ceil(int(fields[0]) / int(fields[1])))
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


def other_runnable(samples: int = 5, interval_s: float = 0.01) -> int:
    """Runnable tasks besides this one right now (median of a few reads of /proc/stat; 0 where unknown).

    The median, not the 1-minute load average: a competitor started seconds ago counts, a burst does not.
    """
    counts = []
    for i in range(samples):
        running = _procs_running()
        if running is None:
            return 0
        counts.append(running - 1)  # the reading process itself is running
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, round(statistics.median(counts)))


def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def free_cpus() -> int:
    """Cores free for premoe now: usable cores minus other runnable tasks, at least 1."""
    return max(1, usable_cpus() - other_runnable())


def configure(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the thread count and wait policy in ``environ`` where the user has not; returns what it set.

    Call before torch is imported (the CLI does, first thing).
    """
    chosen = {}
    if not environ.get("OMP_WAIT_POLICY"):
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    if not environ.get("OMP_NUM_THREADS"):
        chosen["OMP_NUM_THREADS"] = str(free_cpus())
    environ.update(chosen)
    return chosen
