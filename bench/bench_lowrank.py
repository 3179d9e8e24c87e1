"""Microbenchmark of the batched low-rank adapter math on the SmolLM2-135M shapes.

Every site (30 layers x q,k,v,o,gate,up,down = 210) has its own table of 64 rank-16
adapters, so weights are distinct per site and do not stay in cache between steps, as in a
real decode step; tables are stacked with ranks padded to 64 (--max-lora-rank's default), as
the server keeps them. Prints markdown tables: per decode step over all sites, per prefill
step, and a sweep of rows per group (the server measures its own at start-up: lowrank_choice.py). The two
torch forms of issue 12 are both timed: segmented gather + bmm (rows sorted by slot and cut
into equal segments, each gathering its slot's stacked weights, no loop over adapters: one row
per segment at decode, which is BGMV; the device path) and per-group matmuls (one pair of
matmuls per group, a Python loop over groups; the CPU's big-group path).

    python -m bench.bench_lowrank [--repeats 7] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from server.adapters import lowrank_choice
from server.adapters.lowrank import (
    NEVER_BIG,
    LowRankTable,
    RowGroups,
    low_rank_apply,
    low_rank_apply_reference,
    native_kernel,
)

HIDDEN, KV, INTER, LAYERS = 576, 192, 1536, 30
LINEARS = {
    "q": (HIDDEN, HIDDEN),
    "k": (HIDDEN, KV),
    "v": (HIDDEN, KV),
    "o": (HIDDEN, HIDDEN),
    "gate": (HIDDEN, INTER),
    "up": (HIDDEN, INTER),
    "down": (INTER, HIDDEN),
}
ADAPTERS, RANK, MAX_RANK = 64, 16, 64  # MAX_RANK: the server default --max-lora-rank


class Site:
    def __init__(self, in_f: int, out_f: int, dtype: torch.dtype) -> None:
        self.table = LowRankTable(ADAPTERS, in_f, out_f, dtype, max_rank=MAX_RANK)
        for s in range(ADAPTERS):
            # Kaiming-like A and small B keep bf16 values in a realistic range.
            a = torch.randn(RANK, in_f, dtype=dtype) * in_f**-0.5
            self.table.set(s, a, torch.randn(RANK, out_f, dtype=dtype) * 0.01)
        self.set_rows(1)

    def set_rows(self, rows: int) -> None:
        self.x = torch.randn(rows, self.table.in_features, dtype=self.table.dtype)
        self.y = torch.zeros(rows, self.table.out_features, dtype=self.table.dtype)

    def weight_bytes(self, slots: set[int]) -> int:
        return sum(w.a.nbytes + w.b.nbytes for s in slots if (w := self.table.get(s)) is not None)


def make_sites(dtype: torch.dtype) -> list[Site]:
    """Every site, each table given the threshold the start-up calibration measured for its shape."""
    found = lowrank_choice.calibrate([(dtype, i, o) for i, o in LINEARS.values()])
    sites = [Site(i, o, dtype) for _ in range(LAYERS) for i, o in LINEARS.values()]
    for site in sites:
        site.table.big_group_rows = found[(dtype, site.table.in_features, site.table.out_features)]
    return sites


def zipf_slots(rows: int, generator: torch.Generator) -> torch.Tensor:
    """(rows,) slots with P(slot k-1) proportional to 1/k."""
    p = 1.0 / torch.arange(1, ADAPTERS + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), rows, replacement=True, generator=generator)


def times_ms(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """ms of each run of each step; rounds interleave the steps so load from elsewhere hits all alike."""
    for step in steps.values():
        step()  # warm: builds the kernel, faults pages in
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[label].append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    return {label: statistics.median(t) for label, t in times_ms(steps, repeats).items()}


def run_step(
    sites: list[Site], row_slots: torch.Tensor, how: str, big_group_rows: int | None
) -> Callable[[], None]:
    groups = RowGroups.build(row_slots, big_group_rows)

    def step() -> None:
        for site in sites:
            if how == "reference":
                low_rank_apply_reference(site.x, site.y, site.table, row_slots)
            else:
                low_rank_apply(site.x, site.y, site.table, groups, use_native=how != "torch")

    return step


def table_rows(
    sites: list[Site], row_slots: torch.Tensor, repeats: int, cases: list[tuple[str, str, int]]
) -> None:
    used = set(row_slots.tolist())
    gbytes = sum(site.weight_bytes(used) for site in sites) / 1e9
    # The native path is cheap, so it gets many runs; the slow paths a few.
    runs: dict[str, list[float]] = {}
    for label, how, big in cases:
        reps = repeats if how == "native" else max(2, repeats // 4)
        runs |= times_ms({label: run_step(sites, row_slots, how, big)}, reps)
    medians = {label: statistics.median(t) for label, t in runs.items()}
    fastest = min(medians.values())
    print(f"unique adapter weights read per step: {gbytes * 1e3:.0f} MB ({len(used)} distinct adapters)\n")
    print("| path | ms / step (median) | best ms | GB/s (median) | x fastest |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, ms in medians.items():
        best, gbs = min(runs[label]), gbytes / (ms / 1e3)
        print(f"| {label} | {ms:.2f} | {best:.2f} | {gbs:.1f} | {ms / fastest:.2f} |")
    print()


def apply_all(sites: list[Site], groups: RowGroups, use_native: bool) -> None:
    for site in sites:
        low_rank_apply(site.x, site.y, site.table, groups, use_native=use_native)


def sweep(sites: list[Site], repeats: int) -> None:
    """Native kernel vs torch for one layer's 7 sites, 8 groups of m rows each."""
    layer = sites[: len(LINEARS)]
    print("### rows per group: native kernel vs torch (one layer, 7 sites, 8 groups)\n")
    print("| rows / group | native µs | torch µs | torch / native |")
    print("| ---: | ---: | ---: | ---: |")
    for m in (1, 4, 16, 64, 128, 256, 512, 1024, 2048):
        for site in layer:
            site.set_rows(8 * m)
        groups = RowGroups.build(torch.arange(8).repeat_interleave(m), NEVER_BIG)
        steps = {how: partial(apply_all, layer, groups, how == "native") for how in ("native", "torch")}
        ms = median_ms(steps, repeats)
        native, torch_us = ms["native"] * 1e3, ms["torch"] * 1e3
        print(f"| {m} | {native:.0f} | {torch_us:.0f} | {torch_us / native:.2f} |")
    print()


def read_bandwidth_gbs(repeats: int) -> dict[str, float]:
    """What plain streaming reads over a large buffer reach (torch's threads): the ceiling to compare with.

    sum reads 512 MiB; copy reads 512 MiB and writes as much, counted here as bytes read.
    """
    big = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    dst = torch.empty_like(big)
    ms = median_ms({"sum": big.sum, "copy": lambda: dst.copy_(big)}, repeats)
    return {label: big.nbytes / (t / 1e3) / 1e9 for label, t in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    kernel = native_kernel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"kernel: {kernel.path if kernel else 'unavailable'}")
    stream = read_bandwidth_gbs(args.repeats)
    print(f"streaming read over 512 MiB: sum {stream['sum']:.1f} GB/s, copy {stream['copy']:.1f} GB/s read\n")

    print(f"### decode: 64 rows, Zipf over {ADAPTERS} rank-{RANK} adapters, {LAYERS * len(LINEARS)} sites\n")
    sites = make_sites(dtype)
    print("calibrated big_group_rows (groups this big go to torch):")
    for i, o in LINEARS.values():
        rows = lowrank_choice.big_group_rows((dtype, i, o))
        print(f"- {i}x{o}: {'never' if rows == NEVER_BIG else rows}")
    print()
    for site in sites:
        site.set_rows(64)
    decode = zipf_slots(64, gen)
    table_rows(
        sites,
        decode,
        args.repeats,
        [
            ("native kernel (calibrated per shape)", "native", None),
            ("torch segmented gather + bmm (the device path)", "torch", 0),
            ("torch per-group matmuls (the CPU's big groups)", "native", 0),
            ("reference", "reference", 0),
        ],
    )

    print("### prefill: 8 requests x 128 tokens, 8 distinct adapters\n")
    for site in sites:
        site.set_rows(1024)
    prefill = torch.arange(8).repeat_interleave(128)
    table_rows(
        sites,
        prefill,
        args.repeats,
        [
            ("auto (calibrated per shape)", "native", None),
            ("native kernel only", "native", NEVER_BIG),
            ("torch segmented gather + bmm (the device path)", "torch", 0),
            ("torch per-group matmuls (the CPU's big groups)", "native", 0),
        ],
    )
    if not args.skip_sweep:
        sweep(sites, max(3, args.repeats // 3))


if __name__ == "__main__":
    main()
