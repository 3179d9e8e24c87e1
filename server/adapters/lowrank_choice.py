"""Which low-rank path a group of rows takes on this CPU: measured once per machine, not assumed.

The native kernel (lowrank_kernel.c) reads an adapter's weights once and fuses both products,
so it wins where a group has few rows (decode); torch's matmuls win where a group has many
(prefill), and where that crossover lies depends on the CPU and on how its threads wait: above
2048 rows per group in bfloat16 on an AVX-512-BF16 CPU; on a 2-core AVX2-only EPYC in float32,
at 16 for a 576x49152 lm_head but at 2048 or above for the default model's other layers (an
earlier kernel lost there from about 40). So at start-up, for each layer shape (dtype, in, out)
the model has, `calibrate` times both paths on `GROUPS` adapters of rank `RANK` for
rows-per-group buckets 1, 2, 4, ... and takes the first bucket from which torch stays faster as
that shape's `LowRankTable.big_group_rows`.

Results are cached on disk next to the compiled kernel: the kernel's folder is already keyed by
the CPU (model name and feature flags from /proc/cpuinfo), the compiler flags and the kernel
source, and the file name adds torch's version, the thread count and the OpenMP wait settings
(server/__init__.py; with threads that sleep at once, every small torch op pays a kernel wake-up
and the crossover moves). A later start reads the file and measures nothing.

The torch gather path (`gather_apply`) is not a candidate here: on a CPU it copies each
segment's padded weights before multiplying, so it loses to the kernel at decode and to
per-group matmuls at prefill (bench/bench_lowrank.py measures all three); it is the path off
the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from server import OPENMP_WAITING
from server.adapters import lowrank
from server.adapters.lowrank import NEVER_BIG, LowRankTable, NativeKernel, RowGroups, torch_groups
from server.torch_threads import on_own_thread

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
"""Rows per group tried, smallest first; measuring stops once torch has won twice in a row."""
SLOW_S = 0.02
"""Measuring also stops after a bucket whose faster path took this long: a start-up stays short, and
groups that big keep the decision of the last bucket measured."""
GROUPS = 4
RANK = 16
REPEATS = 5

Shape = tuple[torch.dtype, int, int]  # (dtype, in_features, out_features)

_lock = threading.Lock()
_loaded: dict[Path, dict[str, dict]] = {}


def calibration_file(kernel_path: Path) -> Path:
    """The cache file beside this kernel build, for this torch version, thread count and wait policy."""
    waits = ", ".join(f"{name}={os.environ.get(name, '')}" for name in OPENMP_WAITING)
    tag = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {waits}"
    return kernel_path.parent / f"calibration-{hashlib.sha256(tag.encode()).hexdigest()[:12]}.json"


def _key(shape: Shape) -> str:
    dtype, in_f, out_f = shape
    return f"{str(dtype).removeprefix('torch.')} {in_f}x{out_f}"


def big_group_rows(shape: Shape) -> int:
    """The measured threshold for this shape: groups of at least this many rows go to torch.

    Reads the cache, measures (and caches) a shape seen for the first time; NEVER_BIG, no
    measurement, when the kernel is not available or does not take this dtype. It runs on a
    thread of its own, which has the engine's thread count: the caller may be the adapter loader,
    which runs single-threaded (server/torch_threads.py).
    """
    return on_own_thread(calibrate, [shape])[shape]


def calibrate(shapes: list[Shape]) -> dict[Shape, int]:
    """Thresholds for these shapes, measuring the ones the cache does not have (and saving them)."""
    kernel = lowrank.native_kernel()
    usable = [s for s in shapes if kernel is not None and lowrank.kernel_takes(s[0])]
    out = dict.fromkeys(shapes, NEVER_BIG)
    if not usable:
        return out
    path = calibration_file(kernel.path)
    with _lock:
        cached = _loaded.get(path)
        if cached is None:
            cached = _loaded[path] = _read(path)
        missing = [s for s in dict.fromkeys(usable) if _key(s) not in cached]
        if missing:
            started = time.perf_counter()
            for shape in missing:
                cached[_key(shape)] = measure(kernel, shape)
                log.info("low-rank path for %s: %s", _key(shape), describe(cached[_key(shape)]))
            log.info("low-rank paths calibrated in %.1f s, cached in %s", time.perf_counter() - started, path)
            _write(path, cached)
        for shape in usable:
            out[shape] = cached[_key(shape)]["big_group_rows"]
    return out


def describe(entry: dict) -> str:
    rows = entry["big_group_rows"]
    if rows >= NEVER_BIG:
        return "the native kernel for every group size measured"
    return f"the native kernel below {rows} rows per group, torch matmuls from {rows}"


def measure(kernel: NativeKernel, shape: Shape) -> dict:
    """Time the kernel and torch's per-group matmuls per bucket; the bucket from which torch wins."""
    dtype, in_f, out_f = shape
    gen = torch.Generator().manual_seed(0)
    table = LowRankTable(GROUPS, in_f, out_f, dtype, max_rank=RANK)
    for slot in range(GROUPS):
        a = torch.randn(RANK, in_f, generator=gen) * in_f**-0.5
        table.set(slot, a.to(dtype), (torch.randn(RANK, out_f, generator=gen) * 0.01).to(dtype))
    kernel_us, torch_us, torch_wins, threshold = [], [], 0, NEVER_BIG
    for m in BUCKETS:
        slots = torch.arange(GROUPS).repeat_interleave(m)
        x = torch.randn(GROUPS * m, in_f, generator=gen).to(dtype)
        y = torch.zeros(GROUPS * m, out_f, dtype=dtype)
        groups = RowGroups.build(slots)
        packed = groups.split(NEVER_BIG)[1]
        times: dict[str, list[float]] = {"kernel": [], "torch": []}
        for rep in range(REPEATS + 1):  # the first round warms caches and is dropped
            for name in times:  # interleaved: load from elsewhere hits both alike
                t0 = time.perf_counter()
                if name == "kernel":
                    kernel.apply(x, y, table, packed, None)
                else:
                    torch_groups(x, y, table, groups, groups.spans, None)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        kernel_us.append(round(statistics.median(times["kernel"]) * 1e6, 1))
        torch_us.append(round(statistics.median(times["torch"]) * 1e6, 1))
        if torch_us[-1] < kernel_us[-1]:
            torch_wins += 1
            if torch_wins == 1:
                threshold = m
            if torch_wins == 2:
                break
        else:
            torch_wins, threshold = 0, NEVER_BIG
        if min(kernel_us[-1], torch_us[-1]) > SLOW_S * 1e6:
            break
    return {
        "big_group_rows": threshold,
        "buckets": list(BUCKETS[: len(kernel_us)]),
        "kernel_us": kernel_us,
        "torch_us": torch_us,
    }


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable low-rank calibration %s (%s); measuring again", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, dict]) -> None:
    """Atomically, so a concurrent start reads the old file or the new one, never half of one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the low-rank calibration in %s (%s): next start measures again", path, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    """`python -m server.adapters.lowrank_choice` (make install): compile the kernel for this CPU now."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if lowrank.native_kernel() is None:
        log.warning("no native low-rank kernel on this machine: the server will use torch")


if __name__ == "__main__":
    main()
