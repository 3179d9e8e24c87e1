"""The threaded engine never stalls: every request finishes without an outside event to wake it.

Each test drives the real step loop (engine.start()), as the server does, with a short timeout:
a request the loop forgets fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
import time

import pytest

from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.request import Finished, InvalidRequest, QueueFull
from server.engine.sampler import SamplingParams
from server.registry.store import Store
from tests.helpers import wait_finished, wait_until

PROMPTS = ["Hello there", "The capital of", "a", "zebra crossing at night", "One two three"]


def params(n: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kwargs)


def started(model, store=None, **settings) -> Engine:
    adapter_settings = AdapterSettings(
        **{k: settings.pop(k) for k in list(settings) if k in AdapterSettings.model_fields}
    )
    engine = Engine(model, EngineSettings(**settings), adapter_settings, store)
    engine.start()
    return engine


def assert_all_completed(results, n: int = 8) -> None:
    for events in results:
        assert events[-1] == Finished("length", events[-1].prompt_tokens, n), events[-1]


def test_more_requests_than_rows(tiny_model):
    # 3 requests, 2 rows: the third waits for a row the others free, then runs without a new submit.
    engine = started(tiny_model, max_batch_size=2)
    try:
        handles = [engine.submit(engine.encode_text(p), params()) for p in PROMPTS[:3]]
        assert_all_completed(wait_finished(handles))
    finally:
        engine.stop()


def test_batch_size_one_with_ten_requests(tiny_model):
    engine = started(tiny_model, max_batch_size=1)
    try:
        handles = [engine.submit(engine.encode_text(PROMPTS[i % 5]), params(4)) for i in range(10)]
        assert_all_completed(wait_finished(handles), 4)
    finally:
        engine.stop()


def test_queue_limit_reached_and_freed(tiny_model):
    # One row, one queue place: submits are refused while the queue is full and taken once it frees.
    engine = started(tiny_model, max_batch_size=1, max_queue=1)
    try:
        prompt = engine.encode_text(PROMPTS[0])
        accepted = []
        deadline = time.monotonic() + 30
        while len(accepted) < 6:
            assert time.monotonic() < deadline, "the queue never freed"
            try:
                accepted.append(engine.submit(prompt, params(3)))
            except QueueFull:
                time.sleep(0.005)
        assert_all_completed(wait_finished(accepted), 3)
    finally:
        engine.stop()


def test_eight_kinds_over_four_slots(tiny_model, kinds_store):
    # 2 requests per adapter plus 3 base: half the adapters must wait for an eviction.
    engine = started(tiny_model, Store(kinds_store), max_active_adapters=4)
    try:
        prompt = engine.encode_text(PROMPTS[1])
        names = [*sorted(p.name for p in kinds_store.iterdir()) * 2, None, None, None]
        handles = [engine.submit(prompt, params(), engine.resolve_model(n) if n else None) for n in names]
        assert_all_completed(wait_finished(handles))
    finally:
        engine.stop()


def test_one_request_per_adapter_arriving_at_once(tiny_model, kinds_store):
    engine = started(tiny_model, Store(kinds_store), max_active_adapters=1)
    try:
        prompt = engine.encode_text(PROMPTS[2])
        refs = [engine.resolve_model(p.name) for p in sorted(kinds_store.iterdir())]
        assert_all_completed(wait_finished([engine.submit(prompt, params(), r) for r in refs]))
    finally:
        engine.stop()


def test_one_slot_alternating_adapters_from_the_cpu_cache(tiny_model, kinds_store):
    # x, y, x, y one after another: the third comes back from the CPU cache inside a step.
    engine = started(tiny_model, Store(kinds_store), max_active_adapters=1)
    try:
        prompt = engine.encode_text(PROMPTS[0])
        for name in ["lora", "ia3", "lora", "ia3"]:
            assert_all_completed(
                wait_finished([engine.submit(prompt, params(3), engine.resolve_model(name))]), 3
            )
    finally:
        engine.stop()


def test_a_seed_beyond_64_bits_is_refused_at_submit_and_takes_no_queue_place(tiny_model):
    engine = started(tiny_model, max_queue=1)
    try:
        prompt = engine.encode_text(PROMPTS[0])
        for _ in range(3):
            with pytest.raises(InvalidRequest, match="seed") as refused:
                engine.submit(prompt, params(seed=2**70))
            assert refused.value.param == "seed"
        assert_all_completed(wait_finished([engine.submit(prompt, params(seed=2**64 - 1))]))
    finally:
        engine.stop()


def test_a_rare_adapter_is_served_while_a_popular_one_keeps_its_slot_busy(tiny_model, kinds_store):
    # One slot, always in use by a stream of "lora" requests: only aging gets "ia3" a turn.
    engine = started(tiny_model, Store(kinds_store), max_active_adapters=1, adapter_aging=0.3)
    popular, stop_feeding = [], threading.Event()
    prompt = engine.encode_text(PROMPTS[0])

    def feed() -> None:
        lora = engine.resolve_model("lora")
        while not stop_feeding.is_set():
            if engine.snapshot.waiting < 4:
                popular.append(engine.submit(prompt, params(6), lora))
            time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        wait_until(lambda: engine.snapshot.running > 0)
        rare = engine.submit(prompt, params(3), engine.resolve_model("ia3"))
        assert_all_completed(wait_finished([rare]), 3)
        # Its requests queue while its slot drains for the rare one, then run again: some are in either place.
        snapshot = engine.snapshot
        assert feeder.is_alive() and snapshot.waiting + snapshot.running > 0, "the popular adapter ran dry"
        stop_feeding.set()
        feeder.join()
        assert_all_completed(wait_finished(popular), 6)
    finally:
        stop_feeding.set()
        engine.stop()
