"""Far more adapters than slots and than the CPU cache, through the threaded engine: all complete, right."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from tests.adapter_factory import reference_tokens
from tests.conftest import MANY_ADAPTERS
from tests.helpers import token_ids, wait_finished

TOKENS = 5
SAMPLE = [0, 7, 63, 127, 199]  # adapters whose outputs are compared with the reference


def zipf_names(count: int, seed: int = 0) -> list[str]:
    """Every adapter once, then `count` more drawn with P(rank k) proportional to 1/k (Zipf, s = 1)."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(MANY_ADAPTERS)]
    extra = rng.choices(range(MANY_ADAPTERS), weights, k=count)
    order = [*range(MANY_ADAPTERS), *extra]
    rng.shuffle(order)
    return [f"l{i:03d}" for i in order]


def cache_bytes_for(store: Path, count: int) -> int:
    """A CPU cache budget that holds about `count` of the store's adapters (of median size)."""
    return count * int(statistics.median(p.stat().st_size for p in store.glob("*/adapter_model.safetensors")))


def test_200_adapters_over_4_slots_and_16_cached(tiny_model, tiny_model_dir, many_lora_store):
    settings = EngineSettings(max_batch_size=16, max_queue=1024)
    adapters = AdapterSettings(max_active_adapters=4, cpu_adapter_memory=cache_bytes_for(many_lora_store, 16))
    engine = Engine(tiny_model, settings, adapters, Store(many_lora_store))
    prompt = engine.encode_text("The quick brown fox")
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    names = zipf_names(100)
    engine.start()
    try:
        handles = [engine.submit(prompt, params, engine.resolve_model(n)) for n in names]
        base = engine.submit(prompt, params)
        *results, base_events = wait_finished([*handles, base], timeout=120)
    finally:
        engine.stop()
    assert all(r[-1].reason == "length" for r in results), [
        r[-1] for r in results if r[-1].reason != "length"
    ]
    by_name = {n: token_ids(r) for n, r in zip(names, results, strict=True)}
    base = token_ids(base_events)
    for i in SAMPLE:
        name = f"l{i:03d}"
        assert by_name[name] == reference_tokens(tiny_model_dir, many_lora_store / name, prompt, TOKENS), name
    assert any(by_name[f"l{i:03d}"] != base for i in SAMPLE), "the adapters do not change the output"
    loads = engine.metrics.registry.get_sample_value
    assert (loads("peftserve_adapter_loads_total", {"source": "disk"}) or 0) >= MANY_ADAPTERS - 16
