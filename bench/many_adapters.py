"""Thousands of adapters: far more than slots and than the CPU cache, under Zipf traffic.

One cold engine per (K, s): the store holds K LoRA adapters (`write_lora_store`: ranks 8-16
on q_proj and v_proj of every layer), N requests (all submitted at once, like the rest of the
bench) name adapters drawn with P(rank k) proportional to 1/k^s. Nothing is loaded before the
run, so every adapter a request names comes from disk at least once. Measured per run:

- tokens/s: generated tokens / wall time from the first submit to the last token;
- adapter loads per second (from disk and from the CPU cache) and each load's time, parse on
  the loader thread plus install, as the engine reports it (`peftserve_adapter_load_seconds`);
- queue time: submit to the step that admits the request, per request, overall and per
  popularity decile of its adapter (decile 1 = the most popular tenth of the K adapters);
- requests that completed, failed, or had not finished by the time limit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.base_model import LoadedModel
from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.request import Finished
from server.engine.sampler import SamplingParams
from server.registry.store import Store


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1), interpolating between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Recorder:
    """Stands in for one of the engine's histograms and keeps every value observed as well."""

    def __init__(self, histogram) -> None:
        self.histogram = histogram
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)
        self.histogram.observe(value)


@dataclass
class ChurnResult:
    k: int
    zipf_s: float
    requests: int
    completed: int
    failed: int
    unfinished: int
    seconds: float
    tokens_per_s: float
    store_scan_s: float
    disk_loads: int
    cpu_loads: int
    loads_per_s: float
    load_p50_s: float | None
    load_p95_s: float | None
    queue_p95_s: float | None
    decile_requests: list[int] = field(default_factory=list)
    decile_queue_p95_s: list[float | None] = field(default_factory=list)
    first_error: str | None = None

    def as_json(self) -> dict:
        return asdict(self)


def run_churn(
    model: LoadedModel,
    store: Path,
    prompts: list[list[int]],
    ranks: list[int | None],
    k: int,
    zipf_s: float,
    new_tokens: int,
    adapters: AdapterSettings,
    time_limit: float,
) -> ChurnResult:
    """One cold engine over `store`; request i names adapter `t{ranks[i]:05d}` (None: the base)."""
    started = time.perf_counter()
    source = Store(store)
    store_scan = time.perf_counter() - started
    engine = Engine(model, EngineSettings(max_batch_size=64), adapters, source)
    load_times = Recorder(engine.metrics.adapter_load_time)
    engine.metrics.adapter_load_time = load_times
    admitted_at: dict[int, float] = {}
    step = engine.step

    def timed_step():
        began = time.monotonic()
        report = step()
        for request_id in report.plan.admit:
            admitted_at.setdefault(request_id, began)
        return report

    engine.step = timed_step
    engine.start()
    try:
        warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        _wait(engine, [engine.submit(p, warm) for p in prompts[:8]], time_limit)
        loads_before = _loads(engine)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        submitted, handles = {}, []
        began = time.perf_counter()
        for prompt, rank in zip(prompts, ranks, strict=True):
            ref = None if rank is None else engine.resolve_model(f"t{rank:05d}")
            at = time.monotonic()
            handle = engine.submit(prompt, params, ref)
            submitted[handle.request_id] = at
            handles.append(handle)
        finished = _wait(engine, handles, time_limit)
        seconds = time.perf_counter() - began
        disk, cpu = (after - before for after, before in zip(_loads(engine), loads_before, strict=True))
    finally:
        engine.stop()
    done = [f for f in finished if f is not None and f.reason == "length"]
    errors = [f for f in finished if f is not None and f.reason not in ("length", "stop")]
    queue = {
        h.request_id: max(0.0, admitted_at[h.request_id] - submitted[h.request_id])
        for h in handles
        if h.request_id in admitted_at
    }
    deciles: list[list[float]] = [[] for _ in range(10)]
    for handle, rank in zip(handles, ranks, strict=True):
        if rank is not None and handle.request_id in queue:
            deciles[rank * 10 // k].append(queue[handle.request_id])
    timed_loads = load_times.values  # the warm-up used no adapter
    return ChurnResult(
        k=k,
        zipf_s=zipf_s,
        requests=len(handles),
        completed=len(done),
        failed=len(errors),
        unfinished=sum(f is None for f in finished),
        seconds=seconds,
        tokens_per_s=sum(f.completion_tokens for f in done) / seconds,
        store_scan_s=store_scan,
        disk_loads=disk,
        cpu_loads=cpu,
        loads_per_s=(disk + cpu) / seconds,
        load_p50_s=percentile(timed_loads, 0.5),
        load_p95_s=percentile(timed_loads, 0.95),
        queue_p95_s=percentile(list(queue.values()), 0.95),
        decile_requests=[len(d) for d in deciles],
        decile_queue_p95_s=[percentile(d, 0.95) for d in deciles],
        first_error=errors[0].error if errors else None,
    )


def base_rate(
    model: LoadedModel, store: Path, prompts: list[list[int]], new_tokens: int, time_limit: float
) -> float:
    """Tokens/s of the same workload with no adapters, through the same kind of cold engine."""
    result = run_churn(
        model, store, prompts, [None] * len(prompts), 1, 0.0, new_tokens, AdapterSettings(), time_limit
    )
    return result.tokens_per_s


def _loads(engine: Engine) -> tuple[int, int]:
    """Adapter loads so far, (from disk, from the CPU cache)."""
    get = engine.metrics.registry.get_sample_value
    return tuple(int(get("peftserve_adapter_loads_total", {"source": s}) or 0) for s in ("disk", "cpu"))


def _wait(engine: Engine, handles, time_limit: float) -> list[Finished | None]:
    """Each request's Finished event; None for those still running after `time_limit` (then cancelled)."""
    finished: list[Finished | None] = [None] * len(handles)
    deadline = time.monotonic() + time_limit
    pending = set(range(len(handles)))
    while pending and time.monotonic() < deadline:
        time.sleep(0.002)
        for i in list(pending):
            for event in handles[i].drain():
                if isinstance(event, Finished):
                    finished[i] = event
                    pending.discard(i)
    for i in pending:
        engine.cancel(handles[i].request_id)
    return finished


def report(results: list[ChurnResult], base: float, adapters: AdapterSettings, args) -> None:
    print(
        f"\n### Thousands of adapters: {args.large_requests} requests, "
        f"{args.large_new_tokens} new tokens each, "
        f"LoRA ranks 8-16 on q_proj and v_proj, {adapters.max_active_adapters} slots, "
        f"CPU cache {adapters.cpu_adapter_memory.human_readable()}; base {base:.1f} tokens/s\n"
    )
    print(
        "| K | Zipf s | completed | tokens/s | vs no adapters | loads/s (disk + CPU) "
        "| load p50 | load p95 | queue p95 | store scan |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.k} | {r.zipf_s} | {r.completed}/{r.requests}"
            f"{f' ({r.failed} failed, {r.unfinished} unfinished)' if r.failed or r.unfinished else ''} "
            f"| {r.tokens_per_s:.1f} | {r.tokens_per_s / base:.2f} "
            f"| {r.loads_per_s:.1f} ({r.disk_loads} + {r.cpu_loads}) "
            f"| {_ms(r.load_p50_s)} | {_ms(r.load_p95_s)} "
            f"| {_ms(r.queue_p95_s)} | {r.store_scan_s:.1f} s |"
        )
    print("\np95 queue time per popularity decile of the adapter (1 = most popular tenth), (requests):\n")
    print("| K | Zipf s | " + " | ".join(f"d{d}" for d in range(1, 11)) + " |")
    print("| --- | --- |" + " --- |" * 10)
    for r in results:
        cells = [
            f"{_ms(q)} ({n})" if n else "-"
            for q, n in zip(r.decile_queue_p95_s, r.decile_requests, strict=True)
        ]
        print(f"| {r.k} | {r.zipf_s} | " + " | ".join(cells) + " |")
    for r in results:
        if r.first_error:
            print(f"\nK={r.k}, s={r.zipf_s}: first error: {r.first_error}")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.0f} s"
