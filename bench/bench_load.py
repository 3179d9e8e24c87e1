"""Adapter load time: disk -> slot and CPU cache -> slot, for a rank-16 LoRA on every linear layer.

Times what the server's loader thread does for one adapter load, in one process, on the
embedded default model (SmolLM2-135M: 30 layers x 7 linears, so 420 tensors): disk -> slot is
parse (read, check, no copy) plus install (each tensor copied once, straight from the file's
mapping into the slot's rows); the slot is then ready. After that the loader packs a copy of
its own for the CPU cache (cache copy: not part of the load's latency). CPU -> slot is the
install of a cached copy. For comparison, the same loads through two copies (parse into
memory of the adapter's own, then install: the path before) and through safetensors' own
`load_file` (the reader the mmap reader replaced). The files sit in the page cache, as on a
server whose store was written or read recently. Reports median and p95 over --loads loads of
--adapters different adapters, once with each copy freed after its install (memory reused) and
once with them kept (fresh memory, as while the CPU cache fills up).

    python -m bench.bench_load [--loads 60] [--adapters 8] [--rank 16] [--dtype auto]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.adapters import write_lora
from server.adapters.common import AdapterWeights
from server.adapters.loader import folder_loader
from server.adapters.slots import SlotTable
from server.base_model import LoadedModel, load_base_model
from server.config import Settings


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_loads(
    table: SlotTable,
    load: Callable[[Path], AdapterWeights],
    folders: list[Path],
    loads: int,
    keep: bool,
    cache_copy: bool,
) -> dict[str, list[float]]:
    """Seconds per load: parse, install, both (disk -> slot), the cache copy, and CPU -> slot.

    keep=False frees each copy right after its use, so the allocator hands the next load the
    same memory. keep=True keeps one per folder, as a CPU cache still filling up: each copy then
    writes into memory the process has not touched yet, and its first-touch page faults cost
    several microseconds per 4 KiB page on this virtual machine (~10 ms for 19 MiB).
    cache_copy: `load` leaves views of the file, packed into memory of their own after the install.
    """
    times: dict[str, list[float]] = {
        k: [] for k in ("parse", "install", "disk", "disk_cpu_time", "cache_copy", "cpu")
    }
    parsed = {}
    for i in range(loads):
        folder = folders[i % len(folders)]
        gc.collect()
        started, cpu_started = time.perf_counter(), time.thread_time()
        weights = load(folder)
        parsed_at = time.perf_counter()
        table.install(0, weights)
        done = time.perf_counter()
        times["disk_cpu_time"].append(time.thread_time() - cpu_started)
        table.clear(0)
        times["parse"].append(parsed_at - started)
        times["install"].append(done - parsed_at)
        times["disk"].append(done - started)
        if cache_copy:
            weights.own(table.dtype)
            times["cache_copy"].append(time.perf_counter() - done)
        if keep:
            parsed[folder] = weights
        del weights
    for i in range(loads):
        folder = folders[i % len(folders)]
        if keep:
            weights = parsed[folder]
        else:
            weights = load(folder)
            if cache_copy:
                weights.own(table.dtype)
        started = time.perf_counter()
        table.install(0, weights)
        times["cpu"].append(time.perf_counter() - started)
        table.clear(0)
    return times


def reference_loader(model: LoadedModel, max_rank: int) -> Callable[[Path], AdapterWeights] | None:
    """The same loads through safetensors' `load_file`; None where this version has no such path."""
    try:
        from server.adapters.loader import reference_folder_loader
    except ImportError:
        return None
    return reference_folder_loader(model, max_rank)


def cpu_name() -> str:
    """The CPU's model name: absolute times here mean something only on the CPU they came from."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loads", type=int, default=60, help="timed loads per path")
    parser.add_argument("--adapters", type=int, default=8, help="different adapters the loads cycle through")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, on every linear layer")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: as the server)")
    args = parser.parse_args()
    model = load_base_model(Settings.load({"dtype": args.dtype}).model)
    table = SlotTable(1, model.shape, model.dtype, model.device, max_rank=64)
    with tempfile.TemporaryDirectory(prefix="peftserve-bench-load-") as tmp:
        root = Path(tmp)
        folders = [write_lora(root / f"lora-{k}", model.shape, args.rank, k) for k in range(args.adapters)]
        size = (folders[0] / "adapter_model.safetensors").stat().st_size
        paths = {  # name: (load, whether the cache copy is made after the install)
            "server (file -> slot)": (folder_loader(model, 64, own=False), True),
            "two copies (file -> own memory -> slot)": (folder_loader(model, 64), False),
        }
        reference = reference_loader(model, 64)
        if reference is not None:
            paths["reference (safetensors load_file)"] = (reference, False)
        for load, copy in paths.values():  # warm: page cache, allocator
            time_loads(table, load, folders, len(folders), keep=False, cache_copy=copy)
        results = {}
        for name, (load, copy) in paths.items():
            for state, keep in (("memory reused", False), ("fresh memory", True)):
                results[f"{name}, {state}"] = time_loads(
                    table, load, folders, args.loads, keep=keep, cache_copy=copy
                )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nrank-{args.rank} LoRA on every linear layer of {model.name} ({size / 2**20:.1f} MiB file), "
        f"{str(model.dtype).removeprefix('torch.')} on {model.device}, {torch.get_num_threads()} threads, "
        f"{cpu_name()}, load average {load:.1f}; {args.loads} loads of {args.adapters} adapters. "
        "Wall times grow with other work on the machine; CPU time (of the loading thread) much less.\n"
    )
    print(
        "| path | disk -> slot p50 | p95 | its CPU time p50 | parse p50 | install p50 "
        "| cache copy p50 (after) | CPU -> slot p50 | p95 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, t in results.items():
        ms = {k: (statistics.median(v) * 1e3, percentile(v, 0.95) * 1e3) if v else None for k, v in t.items()}
        copy = f"{ms['cache_copy'][0]:.1f} ms" if ms["cache_copy"] else "-"
        print(
            f"| {name} | {ms['disk'][0]:.1f} ms | {ms['disk'][1]:.1f} ms | {ms['disk_cpu_time'][0]:.1f} ms "
            f"| {ms['parse'][0]:.1f} ms | {ms['install'][0]:.1f} ms | {copy} "
            f"| {ms['cpu'][0]:.1f} ms | {ms['cpu'][1]:.1f} ms |"
        )
    for state in ("memory reused", "fresh memory"):
        disk = {
            n.partition(" (")[0]: statistics.median(t["disk"])
            for n, t in results.items()
            if n.endswith(state)
        }
        ratios = ", ".join(
            f"{n} / server {v / disk['server']:.2f}x" for n, v in disk.items() if n != "server"
        )
        print(f"\ndisk -> slot, {state}: {ratios}")


if __name__ == "__main__":
    main()
