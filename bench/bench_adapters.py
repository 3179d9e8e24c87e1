"""Throughput with many adapters: the engine against PEFT and plain `generate`, in one process.

Workload: N requests (default 64), prompts of 32-128 random tokens, 64 new tokens each (EOS
ignored so every request generates all of them), adapters drawn from K LoRA adapters (rank 16,
every linear layer) with a Zipf law, P(rank k) proportional to 1/k^s, s = 1.0. Plus one mix of
all adapter kinds (two of each), and each method of issue 15 (NEW_METHODS) alone, ALONE_K
adapters of its kind. Tokens/s = generated tokens / wall time from the first submit to the last
token, prefill included. Engine figures are the median of --repeats runs of one engine after
one warm-up run (adapters then sit in slots or the CPU cache, as on a server that has been up
a while).

The large part (bench/many_adapters.py) runs K = 1,000 and 10,000 adapters, more than the
slots and the CPU cache hold, with Zipf s = 1 and s = 0.5: tokens/s against no adapters,
adapter loads per second, load time and queue time (p95 per popularity decile too).

    python -m bench.bench_adapters --out bench/results/adapters.json
    python -m bench.bench_adapters --quick      # the large part only, small and short
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import many_adapters
from bench.adapters import (
    write_adalora,
    write_bitfit,
    write_bottleneck,
    write_ia3,
    write_ln_tuning,
    write_lora,
    write_lora_embed_head,
    write_lora_store,
    write_oft,
    write_prompt,
    write_trainable_tokens,
    write_vera,
    zipf_choices,
)
from server.adapters.loader import folder_loader
from server.adapters.slots import SlotTable
from server.base_model import LoadedModel, ModelShape, load_base_model
from server.config import AdapterSettings, EngineSettings, Settings
from server.engine.engine import Engine
from server.engine.request import Finished
from server.engine.sampler import SamplingParams
from server.registry.merge import fold_into
from server.registry.store import Store
from server.torch_threads import on_own_thread

# (numerator, denominator, goal); "engine K=max" is the engine with the largest K.
TARGETS = [
    ("engine, lora-00 merged (--merge-adapter)", "engine K=1", None),
    ("engine K=max", "engine, no adapters", 0.85),
    ("engine K=max", "PEFT set_adapter + generate", 8.0),
    ("engine K=max", "PEFT adapter_names batch", 2.5),
    ("engine, all kinds", "engine, no adapters", 0.75),
]


# Methods of issue 15: each joins the all-kinds mix, and runs alone with ALONE_K adapters of its kind.
NEW_METHODS: dict[str, Callable[[Path, ModelShape, int], Path]] = {
    "adalora": lambda f, shape, s: write_adalora(f, shape, 16, s),
    "vera": lambda f, shape, s: write_vera(f, shape, 64, s),
    "oft": lambda f, shape, s: write_oft(f, shape, 32, s),
    "lora_embed_head": lambda f, shape, s: write_lora_embed_head(f, shape, 16, s),
    "lora_bias": lambda f, shape, s: write_lora(f, shape, 16, s, lora_bias=True),
    "trainable_tokens": lambda f, shape, s: write_trainable_tokens(f, shape, 16, s),
    "ln_tuning": lambda f, shape, s: write_ln_tuning(f, shape, s),
    "bitfit": lambda f, shape, s: write_bitfit(f, shape, s),
}
ALONE_K = 8


class Progress(dict):
    """The results so far, each printed to stderr as it arrives: the whole run takes many minutes."""

    def __setitem__(self, name: str, value: float) -> None:
        super().__setitem__(name, value)
        print(f"{time.strftime('%H:%M:%S')} {name}: {value:.3g}", file=sys.stderr, flush=True)


def make_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 129, (count,), generator=gen).tolist()
    # Skip the first 1000 ids: special and control tokens live there.
    return [torch.randint(1000, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_engine(engine: Engine, prompts, adapters, new_tokens: int) -> float:
    """Generated tokens/s for the whole workload through the engine thread."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    handles = [
        engine.submit(p, params, engine.resolve_model(a) if a else None)
        for p, a in zip(prompts, adapters, strict=True)
    ]
    done = [False] * len(handles)
    tokens = 0
    while not all(done):
        time.sleep(0.002)
        for i, handle in enumerate(handles):
            for event in handle.drain():
                if isinstance(event, Finished):
                    assert event.reason == "length", event
                    tokens += event.completion_tokens
                    done[i] = True
    return tokens / (time.perf_counter() - started)


def engine_median(
    model, store, prompts, adapters, new_tokens, repeats, settings: AdapterSettings, graphs: str = "auto"
) -> float:
    """Median tokens/s of one engine after a warm-up run (which loads the adapters and captures
    the decode graphs, if any)."""
    engine_settings = EngineSettings(max_batch_size=64, decode_graphs=graphs)
    engine = on_own_thread(Engine, model, engine_settings, settings, Store(store))
    engine.start()
    try:
        run_engine(engine, prompts, adapters, new_tokens)
        return statistics.median(run_engine(engine, prompts, adapters, new_tokens) for _ in range(repeats))
    finally:
        engine.stop()


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _generate(model, prompts, pad: int, new_tokens: int, **kwargs) -> int:
    ids, mask = _left_padded(prompts, pad)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            **kwargs,
        )
    return (out.shape[1] - ids.shape[1]) * len(prompts)


def plain_generate(model_dir: Path, dtype, prompts, pad, new_tokens, batch: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        tokens += _generate(model, prompts[i : i + batch], pad, new_tokens)
    return tokens / (time.perf_counter() - started)


def peft_model(model_dir: Path, dtype, store: Path, names: list[str]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    return model.eval()


def peft_per_request(model, prompts, adapters, pad, new_tokens) -> float:
    started, tokens = time.perf_counter(), 0
    for prompt, name in zip(prompts, adapters, strict=True):
        model.set_adapter(name)
        tokens += _generate(model, [prompt], pad, new_tokens)
    return tokens / (time.perf_counter() - started)


def peft_mixed_batches(model, prompts, adapters, pad, new_tokens, batch: int) -> float:
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        tokens += _generate(
            model, prompts[i : i + batch], pad, new_tokens, adapter_names=adapters[i : i + batch]
        )
    return tokens / (time.perf_counter() - started)


def adapter_load_median(model: LoadedModel, store: Path, names: list[str]) -> float:
    """Seconds from an adapter folder on disk to weights in a device slot."""
    table = SlotTable(1, model.shape, model.dtype, model.device, max_rank=64)
    load = folder_loader(model, 64)
    times = []
    for name in names:
        started = time.perf_counter()
        table.install(0, load(store / name))
        times.append(time.perf_counter() - started)
        table.clear(0)
    return statistics.median(times)


def build_stores(root: Path, model: LoadedModel, max_k: int) -> tuple[Path, Path, list[str]]:
    shape = model.shape
    lora_store = root / "lora"
    for k in range(max_k):
        write_lora(lora_store / f"lora-{k:02d}", shape, rank=16, seed=k)
    mix_store = root / "mix"
    writers = {
        "lora": lambda f, s: write_lora(f, shape, 16, s),
        "dora": lambda f, s: write_lora(f, shape, 16, s, dora=True),
        "ia3": lambda f, s: write_ia3(f, shape, s),
        "prompt": lambda f, s: write_prompt(f, shape, 16, s),
        "prefix": lambda f, s: write_prompt(f, shape, 16, s, prefix=True),
        "bottleneck": lambda f, s: write_bottleneck(f, shape, 64, s),
        **{kind: (lambda f, s, w=write: w(f, shape, s)) for kind, write in NEW_METHODS.items()},
    }
    mix_names = []
    for round_ in range(2):  # two of each kind, interleaved so Zipf's popular ranks span every kind
        for kind, write in writers.items():
            name = f"{kind}-{round_}"
            write(mix_store / name, 1000 + len(mix_names))
            mix_names.append(name)
    for kind, write in NEW_METHODS.items():
        for k in range(ALONE_K):
            write(root / f"only-{kind}" / f"{kind}-{k}", shape, 2000 + k)
    return lora_store, mix_store, mix_names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--dtype", default="auto", help="model dtype for every contender (auto: as the server)"
    )
    parser.add_argument("--requests", type=int, default=64, help="requests in the workload")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--ks", default="1,8,64", help="comma-separated adapter counts K")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent s (0 = uniform)")
    parser.add_argument("--repeats", type=int, default=3, help="timed engine runs per configuration (median)")
    parser.add_argument("--batch", type=int, default=16, help="static batch size of the generate baselines")
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=16,
        help="requests timed for the per-request PEFT baseline (its rate does not depend on N)",
    )
    parser.add_argument(
        "--parts",
        default="small,large",
        help="which parts to run: small (K up to 64 against the baselines), large (thousands of adapters)",
    )
    parser.add_argument(
        "--large-ks", default="1000,10000", help="adapter counts K of the large part (comma-separated)"
    )
    parser.add_argument(
        "--large-zipf-s", default="1.0,0.5", help="Zipf exponents of the large part (comma-separated)"
    )
    parser.add_argument("--large-requests", type=int, default=256, help="requests per run of the large part")
    parser.add_argument("--large-new-tokens", type=int, default=32, help="tokens per request, large part")
    parser.add_argument(
        "--large-slots", type=int, default=32, help="device slots (--max-active-adapters), large part"
    )
    parser.add_argument(
        "--large-cpu-memory", default="256MiB", help="CPU adapter cache (--cpu-adapter-memory), large part"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=900,
        help="seconds before a large-part run gives up on its requests",
    )
    parser.add_argument(
        "--lowrank-path",
        choices=["auto", "kernel", "torch"],
        default=AdapterSettings().lowrank_path,
        help="the engine's CPU low-rank path (--lowrank-path of the server): torch switches the kernel off",
    )
    parser.add_argument(
        "--decode-graphs",
        choices=["auto", "on", "off"],
        default=EngineSettings().decode_graphs,
        help="the engine's --decode-graphs: auto captures decode steps into CUDA graphs on a GPU",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="small part: the engine only, without plain generate and PEFT (make device-check)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only a short large part, to check it: K=200 and 1000, 64 requests of 8 tokens, 8 slots, 64MiB",
    )
    args = parser.parse_args()
    if args.quick:
        args.parts, args.large_ks, args.large_requests, args.large_new_tokens = "large", "200,1000", 64, 8
        args.large_slots, args.large_cpu_memory = 8, "64MiB"
    torch.manual_seed(0)
    # The main thread runs no parallel torch work before the last engine run, as in the server:
    # see server/torch_threads.py.
    model = on_own_thread(load_base_model, Settings.load({"dtype": args.dtype}).model)
    payload: dict = {}
    parts = set(args.parts.split(","))
    if "large" in parts:  # first: the small part folds an adapter into the model's weights at its end
        payload["many_adapters"] = run_large(args, model)
    if "small" in parts:
        payload |= run_small(args, model)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))


def run_large(args, model: LoadedModel) -> dict:
    """K = thousands of adapters, more than slots and than the CPU cache (bench/many_adapters.py)."""
    prompts = make_prompts(args.large_requests, model.shape.vocab_size, seed=2)
    adapters = AdapterSettings(max_active_adapters=args.large_slots, cpu_adapter_memory=args.large_cpu_memory)
    ks = [int(k) for k in args.large_ks.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="peftserve-bench-many-") as tmp:
        store = Path(tmp) / "store"
        started = time.perf_counter()
        on_own_thread(write_lora_store, store, model.shape, max(ks))
        print(
            f"{time.strftime('%H:%M:%S')} wrote {max(ks)} adapters in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        nt, limit = args.large_new_tokens, args.time_limit
        base = on_own_thread(many_adapters.base_rate, model, store, prompts, nt, limit)
        print(f"{time.strftime('%H:%M:%S')} many adapters, no adapters: {base:.3g} tokens/s", file=sys.stderr)
        for k in ks:
            view = store if k == max(ks) else _first(store, k, Path(tmp) / f"k{k}")
            for s in (float(x) for x in args.large_zipf_s.split(",")):
                ranks = zipf_choices(len(prompts), k, s, seed=k)
                result = on_own_thread(
                    many_adapters.run_churn, model, view, prompts, ranks, k, s, nt, adapters, limit
                )
                done = f"{result.completed}/{result.requests} completed"
                print(
                    f"{time.strftime('%H:%M:%S')} K={k} s={s}: {result.tokens_per_s:.3g} tokens/s, {done}",
                    file=sys.stderr,
                )
                results.append(result)
    many_adapters.report(results, base, adapters, args)
    return {
        "base_tokens_per_s": base,
        "runs": [r.as_json() for r in results],
        "workload": {
            "requests": args.large_requests,
            "new_tokens": args.large_new_tokens,
            "slots": args.large_slots,
            "cpu_adapter_memory": args.large_cpu_memory,
        },
    }


def _first(store: Path, k: int, view: Path) -> Path:
    """A store of the first k adapters of `store`, as symbolic links to their folders."""
    view.mkdir()
    for index in range(k):
        (view / f"t{index:05d}").symlink_to(store / f"t{index:05d}", target_is_directory=True)
    return view


def run_small(args, model: LoadedModel) -> dict:
    """K up to 64 adapters of rank 16 on every linear layer, and every kind, against the baselines."""
    model_dir = Path(model.hf.name_or_path)
    pad = model.tokenizer.pad_token_id
    ks = [int(k) for k in args.ks.split(",")]
    prompts = make_prompts(args.requests, model.shape.vocab_size, seed=1)
    results: dict[str, float] = Progress()
    with tempfile.TemporaryDirectory(prefix="peftserve-bench-") as tmp:
        lora_store, mix_store, mix_names = on_own_thread(build_stores, Path(tmp), model, max(ks))
        nt, settings = args.new_tokens, AdapterSettings(lowrank_path=args.lowrank_path)

        def timed(store: Path, adapters: list[str | None]) -> float:
            return engine_median(
                model, store, prompts, adapters, nt, args.repeats, settings, args.decode_graphs
            )

        results["engine, no adapters"] = timed(lora_store, [None] * len(prompts))
        for k in ks:
            names = [f"lora-{i:02d}" for i in zipf_choices(len(prompts), k, args.zipf_s, seed=k)]
            results[f"engine K={k}"] = timed(lora_store, names)
        mix = [mix_names[i] for i in zipf_choices(len(prompts), len(mix_names), args.zipf_s, seed=99)]
        results["engine, all kinds"] = timed(mix_store, mix)
        for kind in NEW_METHODS:
            alone = [f"{kind}-{i}" for i in zipf_choices(len(prompts), ALONE_K, args.zipf_s, seed=7)]
            results[f"engine, {ALONE_K} {kind}"] = timed(Path(tmp) / f"only-{kind}", alone)
        # Last, as it changes the model's weights: lora-00 folded in, served as the base (--merge-adapter).
        on_own_thread(lambda: fold_into(model, folder_loader(model, 64)(lora_store / "lora-00")))
        results["engine, lora-00 merged (--merge-adapter)"] = timed(lora_store, [None] * len(prompts))
        sample = [f"lora-{i:02d}" for i in range(min(9, max(ks)))]
        results["adapter load (s, median)"] = adapter_load_median(model, lora_store, sample)
        if args.no_baselines:
            return report(results, args, model)
        k = max(ks)
        names = [f"lora-{i:02d}" for i in zipf_choices(len(prompts), k, args.zipf_s, seed=k)]
        results["plain generate, no adapters"] = plain_generate(
            model_dir, model.dtype, prompts, pad, nt, args.batch
        )
        peft = peft_model(model_dir, model.dtype, lora_store, [f"lora-{i:02d}" for i in range(k)])
        few = args.baseline_requests
        results["PEFT set_adapter + generate"] = peft_per_request(peft, prompts[:few], names[:few], pad, nt)
        results["PEFT adapter_names batch"] = peft_mixed_batches(peft, prompts, names, pad, nt, args.batch)
    return report(results, args, model)


def report(results: dict[str, float], args, model: LoadedModel) -> dict:
    base = results["engine, no adapters"]
    print(
        f"\n{args.requests} requests, 32-128 prompt tokens, {args.new_tokens} new tokens each, "
        f"Zipf s={args.zipf_s}, {str(model.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, --lowrank-path {args.lowrank_path}, "
        f"--decode-graphs {args.decode_graphs}\n"
    )
    print("| configuration | tokens/s | vs engine, no adapters |")
    print("| --- | --- | --- |")
    for name, value in results.items():
        if name.startswith("adapter load"):
            continue
        print(f"| {name} | {value:.1f} | {value / base:.2f} |")
    load_ms = results["adapter load (s, median)"] * 1000
    print(f"\nLoading a rank-16 all-linear adapter from disk into a slot: {load_ms:.0f} ms (median)\n")
    print("| target | measured | goal |")
    print("| --- | --- | --- |")
    ratios = {}
    k_max = f"engine K={max(int(k) for k in args.ks.split(','))}"
    for num, den, goal in TARGETS:
        num = k_max if num == "engine K=max" else num
        if num not in results or den not in results:  # left out of this run (--ks, --no-baselines)
            continue
        label = f"{num} / {den}"
        ratio = results[num] / results[den]
        ratios[label] = ratio
        verdict = "(no target)" if goal is None else f">= {goal} {'ok' if ratio >= goal else 'MISSED'}"
        print(f"| {label} | {ratio:.2f} | {verdict} |")
    return {
        "tokens_per_s": {k: v for k, v in results.items() if not k.startswith("adapter load")},
        "adapter_load_seconds_median": results["adapter load (s, median)"],
        "ratios": ratios,
        "workload": {
            "requests": args.requests,
            "new_tokens": args.new_tokens,
            "zipf_s": args.zipf_s,
            "ks": args.ks,
            "dtype": str(model.dtype),
            "threads": torch.get_num_threads(),
            "lowrank_path": args.lowrank_path,
            "decode_graphs": args.decode_graphs,
            "machine": platform.processor() or platform.machine(),
        },
    }


if __name__ == "__main__":
    main()
