"""The load test's closed loop without HTTP: no adapters against K LoRA adapters, in one process.

USERS coroutines each send a chat request straight to one engine (as the HTTP server's event
loop does), wait for its last token, then send the next, for DURATION seconds; requests still
running then finish. Each request draws its adapter by a Zipf law over K rank-RANK LoRA adapters
on every linear layer (rank 1 is lora-00), a prompt from loadtest/prompts.txt and max_tokens
from MIN..MAX, samples at the server's default temperature and ignores EOS: the workload of
`make loadtest` (loadtest/workload.py). Runs alternate, no adapters then K adapters, ROUNDS
times on the same engine, after one untimed run of each that loads the adapters; tokens/s =
generated tokens / (last finish - first send).
Comparing this with `make loadtest` separates what HTTP costs from what the workload costs.

    python -m bench.closed_loop --adapters 64 --users 32 --duration 60 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.adapters import write_lora
from loadtest.workload import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_ZIPF_S,
    ZipfChooser,
    load_prompts,
)
from server.base_model import load_base_model
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import Finished
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from server.torch_threads import on_own_thread


async def _user(
    engine: Engine, prompts: list[list[int]], chooser: ZipfChooser | None, args, rng, until
) -> int:
    """Requests one after another until `until`; the tokens generated."""
    tokens = 0
    while time.perf_counter() < until:
        params = SamplingParams(
            max_tokens=rng.randint(args.min_tokens, args.max_tokens),
            temperature=args.temperature,
            ignore_eos=True,
        )
        adapter = engine.resolve_model(chooser.choose()) if chooser else None
        handle = engine.submit(rng.choice(prompts), params, adapter)
        async for event in handle:
            if isinstance(event, Finished):
                if event.reason != "length":
                    raise RuntimeError(f"a request ended with {event.reason}: {event.error}")
                tokens += event.completion_tokens
    return tokens


async def closed_loop(engine: Engine, prompts, chooser, args, seconds: float, seed: int) -> float:
    """Generated tokens/s of `args.users` users sending requests for `seconds`."""
    rng = random.Random(seed)
    started = time.perf_counter()
    until = started + seconds
    users = [
        _user(engine, prompts, chooser, args, random.Random(rng.random()), until) for _ in range(args.users)
    ]
    tokens = sum(await asyncio.gather(*users))
    return tokens / (time.perf_counter() - started)


def alternate(engine: Engine, names: list[str], args) -> tuple[list[float], list[float]]:
    """Tokens/s with no adapters and with `names`, `args.rounds` times each in turn, after one
    untimed quarter-length run of each; each round is printed as it ends."""
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in load_prompts()]
    chooser = ZipfChooser(names, args.zipf_s, random.Random(0))

    def run(chooser_: ZipfChooser | None, seconds: float, seed: int) -> float:
        return asyncio.run(closed_loop(engine, prompts, chooser_, args, seconds, seed))

    run(None, args.duration / 4, 0)
    run(chooser, args.duration / 4, 0)
    base, adapted = [], []
    for round_ in range(args.rounds):
        base.append(run(None, args.duration, round_ + 1))
        adapted.append(run(chooser, args.duration, round_ + 1))
        print(
            f"round {round_ + 1}: no adapters {base[-1]:.1f} tokens/s, "
            f"K={len(names)} {adapted[-1]:.1f} ({adapted[-1] / base[-1]:.2f})",
            flush=True,
        )
    return base, adapted


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=64, help="LoRA adapters K")
    parser.add_argument("--rank", type=int, default=16, help="their rank (every linear layer)")
    parser.add_argument("--users", type=int, default=32, help="requests in flight")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed pairs of runs; medians are reported")
    parser.add_argument("--zipf-s", type=float, default=DEFAULT_ZIPF_S, help="Zipf exponent s (0 = uniform)")
    parser.add_argument(
        "--min-tokens", type=int, default=DEFAULT_MIN_TOKENS, help="fewest tokens per request"
    )
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens per request")
    parser.add_argument(
        "--temperature",
        type=float,
        default=SamplingParams(max_tokens=1).temperature,
        help="sampling temperature (default: the server's, which the load test's requests get; 0 is greedy)",
    )
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: as the server)")
    parser.add_argument(
        "--max-active-adapters", type=int, default=None, help="adapter slots (default: the server's)"
    )
    args = parser.parse_args()
    overrides = {"dtype": args.dtype}
    if args.max_active_adapters:
        overrides["max_active_adapters"] = args.max_active_adapters
    settings = Settings.load(overrides)
    model = on_own_thread(load_base_model, settings.model)
    with tempfile.TemporaryDirectory(prefix="peftserve-closed-loop-") as tmp:
        names = [f"lora-{k:02d}" for k in range(args.adapters)]
        for k, name in enumerate(names):
            write_lora(Path(tmp) / name, model.shape, rank=args.rank, seed=k)
        engine = on_own_thread(Engine, model, settings.engine, settings.adapters, Store(Path(tmp)))
        engine.start()
        try:
            base, adapted = alternate(engine, names, args)
        finally:
            engine.stop()
    b, a = statistics.median(base), statistics.median(adapted)
    print(f"median: no adapters {b:.1f} tokens/s, K={args.adapters} {a:.1f} tokens/s, ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
