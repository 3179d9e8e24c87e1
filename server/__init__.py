"""peftserve: one frozen base model, many PEFT adapters, batched together."""

import os
import sys
import warnings

from server.cpu_quota import quota_cpus, threads_for_this_process
from server.malloc import keep_freed_memory

__version__ = "0.1.0"

# Torch's OpenMP threads spin while they wait for work. On a machine shared with anything else
# (our HTTP thread, a load generator, other processes) a spinning thread holds the core that the
# thread it waits for needs, and every op then waits out a scheduler time slice: measured here,
# a decode step took 2x to 10x longer. Passive threads sleep instead (OMP_WAIT_POLICY).
# But a thread that sleeps at once makes every parallel op wake it through the kernel (about
# 90 us on a 2-core VM, against 8 us), and a decode step runs thousands of them. libgomp's
# GOMP_SPINCOUNT, which wins over the policy, lets the workers spin that long first: about
# 0.1-0.3 ms, enough to bridge the gaps between one step's ops, short enough to give the core
# up between steps. Measured over HTTP with locust on the same 2 cores (32 users, 60 s):
# 67 -> 105 tokens/s with no adapters, 49 -> 55 with 64 LoRA adapters.
# libgomp reads both when torch loads it; an explicit setting in the environment wins.
OPENMP_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"}

CPU_QUOTA = quota_cpus()
"""CPUs this process's cgroup CPU quota allows (server/cpu_quota.py); None: no quota."""

QUOTA_THREADS = threads_for_this_process(CPU_QUOTA)
"""Torch's threads under CPU_QUOTA, where fewer than one per core; None: no cap."""

MALLOC_KEEPS_MEMORY = keep_freed_memory()
"""Whether glibc now keeps freed blocks for reuse (server/malloc.py)."""

_defaults = dict(OPENMP_WAITING)
if QUOTA_THREADS is not None:
    _defaults["OMP_NUM_THREADS"] = str(QUOTA_THREADS)
_unset = {name: value for name, value in _defaults.items() if name not in os.environ}
if "torch" not in sys.modules:
    os.environ.update(_unset)
elif _unset:
    # Too late: left unset, so the environment still says what libgomp read (the low-rank
    # calibration is keyed by it). Twice an entry point, the test suite and then `make bench`,
    # imported torch first and measured under libgomp's defaults unawares.
    warnings.warn(
        f"torch was imported before peftserve's server package, so {' and '.join(_unset)} "
        "(server/__init__.py) cannot take effect in this process: import server first, "
        "or set them in the environment",
        stacklevel=2,
    )
