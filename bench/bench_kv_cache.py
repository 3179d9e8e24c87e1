"""The paged KV cache and prefix caching on the default model, in one process.

Parts (all by default; --parts picks some):
  attention  decode attention at batch 64, one layer of the model's shape, keys of 32-128 prompt
             + 64 new tokens: the dense row layout the engine had (slice + two matmuls) against
             the paged cache (native kernel, and gather + matmuls as on a GPU); ms per call.
  memory     tokens a 1 GiB budget holds, paged vs dense rows of --max-model-len; peak RSS of the
             process after 64 requests of mixed lengths (32-512 prompt tokens, 32 new).
  chat       64 requests over 8 LoRA adapters (round robin), each a shared 600-token system prompt
             plus its own 20-60-token question, all submitted at once, 16 new tokens each: TTFT p50
             and p90, prefill tokens computed, wall time; prefix caching on and off.
  adapters   generated tokens/s of 64 requests (32-128 prompt tokens, 64 new) with no adapters and
             with 64 LoRA adapters (rank 16, every linear, Zipf s=1.0), and their ratio.

Runs against whatever `server` package is on the path, so the same file measures an older engine
(parts that need flags the older one lacks say so and are skipped).

    python -m bench.bench_kv_cache --out bench/results/kv_cache.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.adapters import write_lora, zipf_choices
from server.base_model import LoadedModel, load_base_model
from server.config import AdapterSettings, EngineSettings, Settings
from server.engine.engine import Engine
from server.engine.request import Delta, Finished
from server.engine.sampler import SamplingParams
from server.metrics import Metrics
from server.registry.store import Store
from server.torch_threads import on_own_thread

PAGED = "block_size" in EngineSettings.model_fields


class Progress(dict):
    """The results so far, each printed to stderr as it arrives: the whole run takes many minutes."""

    def __setitem__(self, name: str, value: float) -> None:
        super().__setitem__(name, value)
        print(f"{time.strftime('%H:%M:%S')} {name}: {value:.4g}", file=sys.stderr, flush=True)


def random_prompt(gen: torch.Generator, vocab: int, low: int, high: int) -> list[int]:
    n = int(torch.randint(low, high + 1, (1,), generator=gen))
    return torch.randint(1000, vocab, (n,), generator=gen).tolist()  # ids below 1000: special tokens


def run(engine: Engine, jobs, params: SamplingParams) -> tuple[list[float], float, int]:
    """Submit every (prompt, adapter) at once through the engine thread: (TTFTs, wall seconds, tokens)."""
    started = time.perf_counter()
    handles = [engine.submit(p, params, engine.resolve_model(a) if a else None) for p, a in jobs]
    first: list[float | None] = [None] * len(handles)
    done, tokens = [False] * len(handles), 0
    while not all(done):
        time.sleep(0.002)
        for i, handle in enumerate(handles):
            for event in handle.drain():
                if isinstance(event, Delta) and event.token_ids and first[i] is None:
                    first[i] = time.perf_counter() - started
                if isinstance(event, Finished):
                    if event.reason != "length":
                        raise RuntimeError(f"request ended with {event.reason}: {event.error}")
                    tokens += event.completion_tokens
                    done[i] = True
    return [t for t in first if t is not None], time.perf_counter() - started, tokens


def engine_for(model, store, metrics=None, **settings) -> Engine:
    if not PAGED:
        settings = {k: v for k, v in settings.items() if k in EngineSettings.model_fields}
    engine = on_own_thread(
        Engine, model, EngineSettings(max_batch_size=64, **settings), AdapterSettings(), store, metrics
    )
    engine.start()
    return engine


def part_attention(model: LoadedModel, results: dict) -> None:
    from server.engine import model as model_module

    shape, gen = model.shape, torch.Generator().manual_seed(3)
    batch, dim, heads, kv_heads = 64, shape.head_dim, shape.num_heads, shape.num_kv_heads
    lengths = torch.randint(32, 129, (batch,), generator=gen) + 64
    span = int(lengths.max())
    q = torch.randn(batch, heads, 1, dim, generator=gen).to(model.dtype)
    dense_k, dense_v = (torch.randn(batch, kv_heads, 4096, dim).to(model.dtype) for _ in range(2))
    positions = (lengths - 1).view(batch, 1)
    visible = torch.arange(span) <= positions.unsqueeze(-1)
    decode = getattr(model_module, "decode_attention", None)
    if decode is None:
        from server.engine.attention import decode_attention as decode

    def timed(fn, n: int = 40) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - started) / n * 1000

    results["attention: dense rows (ms)"] = timed(
        lambda: decode(q, dense_k[:, :, :span], dense_v[:, :, :span], visible, dim**-0.5)
    )
    if not PAGED:
        return
    from server.engine.attention import paged_decode_attention

    size = 16
    blocks = -(-span // size)
    k_pool, v_pool = (torch.randn(batch * blocks + 1, size, kv_heads, dim).to(model.dtype) for _ in range(2))
    table = (torch.randperm(batch * blocks, generator=gen) + 1).view(batch, blocks)
    for name, native in (("native", True), ("torch gather", False)):
        results[f"attention: paged, {name} (ms)"] = timed(
            lambda native=native: paged_decode_attention(
                q, k_pool, v_pool, table, positions, dim**-0.5, native=native
            )
        )


def part_memory(model: LoadedModel, results: dict, budget: str) -> None:
    shape = model.shape
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * model.dtype.itemsize
    gib = 1024**3
    rows = gib // (per_token * model.max_model_len)
    results["memory: sequences of any length at once in 1 GiB, dense rows"] = rows
    results["memory: tokens in 1 GiB, paged (any mix of lengths)"] = gib // per_token
    results["memory: tokens in 1 GiB, dense rows (only if every row is full)"] = rows * model.max_model_len
    results["memory: RSS after loading the model (MiB)"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    gen = torch.Generator().manual_seed(5)
    jobs = [(random_prompt(gen, shape.vocab_size, 32, 512), None) for _ in range(64)]
    engine = engine_for(model, None, kv_cache_memory=budget)
    try:
        _, seconds, _ = run(engine, jobs, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    finally:
        engine.stop()
    results["memory: peak RSS after 64 mixed requests (MiB)"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    results["memory: 64 mixed requests, wall (s)"] = seconds


def part_chat(model: LoadedModel, root: Path, results: dict) -> None:
    shape, gen = model.shape, torch.Generator().manual_seed(7)
    store = root / "chat"
    for k in range(8):
        on_own_thread(write_lora, store / f"chat-{k}", shape, 16, 100 + k)
    system = random_prompt(gen, shape.vocab_size, 600, 600)
    jobs = [(system + random_prompt(gen, shape.vocab_size, 20, 60), f"chat-{i % 8}") for i in range(64)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    other = random_prompt(gen, shape.vocab_size, 600, 600)
    warm_up = [(other + random_prompt(gen, shape.vocab_size, 20, 60), f"chat-{k}") for k in range(8)]
    for caching in (True, False) if PAGED else (False,):
        label = "on" if caching else "off"
        metrics = Metrics()
        engine = engine_for(model, Store(store), metrics, enable_prefix_caching=caching)
        try:
            run(engine, warm_up, params)  # loads the adapters into slots; another system prompt
            hits = metrics.prefix_cache_hits._value.get() if caching else 0
            ttfts, seconds, _ = run(engine, jobs, params)
        finally:
            engine.stop()
        computed = sum(len(p) for p, _ in jobs)
        if caching:
            computed -= int(metrics.prefix_cache_hits._value.get() - hits)
        results[f"chat: TTFT p50 (s), prefix caching {label}"] = statistics.median(ttfts)
        results[f"chat: TTFT p90 (s), prefix caching {label}"] = statistics.quantiles(ttfts, n=10)[-1]
        results[f"chat: prefill tokens computed, prefix caching {label}"] = computed
        results[f"chat: wall (s), prefix caching {label}"] = seconds


def part_adapters(model: LoadedModel, root: Path, results: dict, repeats: int) -> None:
    shape, gen = model.shape, torch.Generator().manual_seed(1)
    store = root / "lora"
    for k in range(64):
        on_own_thread(write_lora, store / f"lora-{k:02d}", shape, 16, k)
    prompts = [random_prompt(gen, shape.vocab_size, 32, 128) for _ in range(64)]
    names = [f"lora-{i:02d}" for i in zipf_choices(64, 64, 1.0, seed=64)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for label, adapters in (("no adapters", [None] * 64), ("K=64", names)):
        engine = engine_for(model, Store(store))
        try:
            run(engine, list(zip(prompts, adapters, strict=True)), params)
            rates = []
            for _ in range(repeats):
                _, seconds, tokens = run(engine, list(zip(prompts, adapters, strict=True)), params)
                rates.append(tokens / seconds)
        finally:
            engine.stop()
        results[f"adapters: tokens/s, {label}"] = statistics.median(rates)
    results["adapters: K=64 / no adapters"] = (
        results["adapters: tokens/s, K=64"] / results["adapters: tokens/s, no adapters"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--parts", default="attention,memory,chat,adapters", help="comma-separated parts")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: as the server)")
    parser.add_argument("--budget", default="1GiB", help="--kv-cache-memory of the memory part")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of the adapters part (median)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    # This thread runs no parallel torch work while engines run, as in the server: server/torch_threads.py.
    model = on_own_thread(load_base_model, Settings.load({"dtype": args.dtype}).model)
    results: dict[str, float] = Progress()
    with tempfile.TemporaryDirectory(prefix="peftserve-bench-") as tmp:
        if "memory" in parts:  # first, so the peak RSS is this part's
            part_memory(model, results, args.budget)
        if "attention" in parts:
            on_own_thread(part_attention, model, results)
        if "chat" in parts:
            part_chat(model, Path(tmp), results)
        if "adapters" in parts:
            part_adapters(model, Path(tmp), results, args.repeats)
    engine = "paged KV cache" if PAGED else "dense KV cache rows"
    print(
        f"\n{engine}, {str(model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
        f"--max-model-len {model.max_model_len}, {platform.processor() or platform.machine()}\n"
    )
    print("| measure | value |")
    print("| --- | --- |")
    for name, value in results.items():
        print(f"| {name} | {value:.4g} |")
    if "chat: TTFT p50 (s), prefix caching on" in results:
        on, off = (results[f"chat: TTFT p50 (s), prefix caching {x}"] for x in ("on", "off"))
        print(f"\nTTFT p50, prefix caching off / on: {off / on:.2f} (goal >= 3)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"engine": engine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
