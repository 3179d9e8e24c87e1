"""The in-process closed loop runs both sides on a live engine thread, and its adapter side serves them."""

from __future__ import annotations

import argparse

from bench.adapters import write_lora
from bench.closed_loop import alternate
from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.registry.store import Store


def test_no_adapters_then_adapters_on_the_engine_thread(tiny_model, tmp_path):
    names = ["lora-00", "lora-01", "lora-02"]
    for seed, name in enumerate(names):
        write_lora(tmp_path / name, tiny_model.shape, rank=4, seed=seed)
    engine = Engine(tiny_model, EngineSettings(), AdapterSettings(), Store(tmp_path))
    engine.start()
    try:
        args = argparse.Namespace(
            users=3, duration=0.4, rounds=2, zipf_s=1.0, min_tokens=2, max_tokens=4, temperature=1.0
        )
        base, adapted = alternate(engine, names, args)
    finally:
        engine.stop()
    assert len(base) == len(adapted) == 2 and min(base + adapted) > 0
    get = engine.metrics.registry.get_sample_value
    assert get("peftserve_adapter_loads_total", {"source": "disk"}) >= 1
    assert get("peftserve_request_success_total", {"finish_reason": "length"}) >= 4 * args.users
