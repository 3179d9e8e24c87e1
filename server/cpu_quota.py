"""How many threads torch should use under a cgroup CPU quota (docker --cpus, a Kubernetes CPU limit).

OpenMP sizes torch's pool by the CPUs the process may run on, not by its quota. Under a quota
of one CPU on a 2-CPU machine, two threads share one CPU's time, and every parallel op waits for
whichever of them the kernel has parked: measured on the 2-core AVX2 EPYC under a one-CPU
quota, a 24-row decode step of the default model took 288-380 ms with 2 threads and 169-192 ms
with 1. So where the quota allows fewer whole CPUs than torch would use, server/__init__.py
sets OMP_NUM_THREADS to that before torch loads. Free of torch: it runs before torch may be
imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def quota_cpus(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the tightest CPU quota over this process's cgroup and its ancestors allows; None: no quota.

    Reads cgroup v2 (`cpu.max`, at `root` or, on a hybrid host, `root/unified`) and v1
    (`cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            mounts = [root, root / "unified"]
            found += [q for mount in mounts for q in _along(mount, path, _v2_quota)]
        elif "cpu" in controllers.split(","):
            found += _along(root / "cpu", path, _v1_quota)
    return min(found, default=None)


def _along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """Quotas in the process's cgroup folder and every folder above it, up to the mount."""
    start = mount / path.lstrip("/")
    if not start.is_dir():
        # Inside a container without its own cgroup namespace, /proc names the host's path while
        # the mount shows the container's own cgroup at its top.
        start = mount
    folders = [start, *(p for p in start.parents if p.is_relative_to(mount))]
    return [q for q in map(read, folders) if q is not None]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def physical_cores(cpus: set[int], topology: Path = CPU_TOPOLOGY) -> int:
    """Distinct cores among `cpus` (hyperthreads of one core count once); len(cpus) if unreadable."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add((topology / f"cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores)


def quota_threads(quota: float | None, cores: int) -> int | None:
    """Threads to use under `quota` CPUs where that is fewer than torch's default of one per core."""
    if quota is None:
        return None
    threads = max(1, math.floor(quota))
    return threads if threads < cores else None


def threads_for_this_process(quota: float | None) -> int | None:
    """quota_threads for this process's `quota_cpus()` and the cores it may run on."""
    if quota is None:  # also every system without /proc/self/cgroup, and so without sched_getaffinity
        return None
    return quota_threads(quota, physical_cores(os.sched_getaffinity(0)))
