"""glibc's allocator, told to keep the memory a step frees for the next step (no torch import).

A step frees tensors of several MiB (logits, and the softmax and cumulative sums over the
vocabulary) and allocates them again the next step. Left to its defaults, glibc hands such
blocks back to the kernel (always above 32 MiB, and often smaller ones freed on the engine's
thread), and every reuse faults its pages in again: one `sample()` of 28 rows took 8.8 ms and
5,346 page faults on a 2-core Xeon, 2.9 ms and 134 faults with these thresholds. vLLM's CPU
backend gets the same from tcmalloc; setting two of glibc's thresholds needs no preload.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 64 * 1024**2
"""Blocks below this come from the heap, which keeps them, instead of their own mapping."""
TRIM_THRESHOLD = 256 * 1024**2
"""Free memory at the heap's top is given back to the kernel only beyond this much."""
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc's own settings: if either is set, the environment decides and this module does nothing."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds here; False where not glibc or set by the environment."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
