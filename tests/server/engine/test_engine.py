"""The engine against `generate`, and its batching, limits and cancellation."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest
import torch

from server.config import AdapterSettings, EngineSettings
from server.engine.engine import Engine
from server.engine.request import ContextLengthError, Finished, QueueFull
from server.engine.sampler import SamplingParams
from server.metrics import Metrics
from server.registry.store import Store
from tests.adapter_factory import make_peft_adapter
from tests.helpers import reference_greedy, run_until_done, text_of, token_ids, wait_finished
from tests.server.test_metrics import scrape

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [
    "Hello there, how are",
    "The capital of",
    "One two three four five six seven eight nine ten eleven twelve",
    "a",
    "zebra crossing at night",
]


def make_engine(model, **settings) -> Engine:
    return Engine(model, EngineSettings(**settings))


def test_concurrent_greedy_equals_generate_alone(tiny_model):
    # 5 requests, 4 rows, a small prefill budget: queueing, chunked prefill and rows leaving mid-batch.
    engine = make_engine(tiny_model, max_batch_size=4, max_prefill_tokens=24)
    prompts = [engine.encode_text(p) for p in PROMPTS]
    lengths = [12, 5, 9, 12, 7]
    handles = [
        engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    results = run_until_done(engine, handles)
    for prompt, n, events in zip(prompts, lengths, results, strict=True):
        expected = reference_greedy(tiny_model.hf, prompt, n)
        assert token_ids(events) == expected
        assert events[-1] == Finished("length", len(prompt), n)


@pytest.mark.slow
def test_default_model_concurrent_greedy_equals_generate(default_model):
    engine = make_engine(default_model, max_batch_size=8)
    questions = ["What is the capital of France?", "Name three colours.", "Say hi.", "Count to five."]
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in questions]
    handles = [engine.submit(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in prompts]
    for prompt, events in zip(prompts, run_until_done(engine, handles), strict=True):
        expected = reference_greedy(default_model.hf, prompt, 24)
        # generate stops at EOS and does not return tokens after it; the engine never emits EOS.
        expected = expected[
            : next((i for i, t in enumerate(expected) if t in default_model.eos_token_ids), None)
        ]
        assert token_ids(events) == expected
    assert "Paris" in text_of(run_until_done(engine, [engine.submit(prompts[0], GREEDY)])[0])


def test_new_requests_join_the_running_batch(tiny_model):
    engine = make_engine(tiny_model, max_batch_size=8)
    encode = engine.encode_text
    first = [engine.submit(encode(p), SamplingParams(max_tokens=20, temperature=0.0)) for p in PROMPTS[:2]]
    report = engine.step()
    assert report.plan.admit == [h.request_id for h in first]
    engine.step()
    late = engine.submit(encode(PROMPTS[2]), SamplingParams(max_tokens=5, temperature=0.0))
    report = engine.step()
    # The late request is admitted while the first two keep decoding: the batch was not drained.
    assert report.plan.admit == [late.request_id]
    assert set(report.running) == {first[0].request_id, first[1].request_id, late.request_id}
    run_until_done(engine, [*first, late])


def test_a_prefill_and_the_running_batch_share_one_forward_pass(tiny_model):
    engine = make_engine(tiny_model, max_batch_size=8)
    encode, greedy = engine.encode_text, SamplingParams(max_tokens=6, temperature=0.0)
    first = engine.submit(encode(PROMPTS[0]), greedy)
    engine.step()
    passes = []
    hidden = engine.decoder.hidden

    def counted(embeds, parts, adapters, cache):
        passes.append([tuple(p.positions.shape) for p in parts])
        return hidden(embeds, parts, adapters, cache)

    engine.decoder.hidden = counted
    late = engine.submit(encode(PROMPTS[1]), greedy)
    engine.step()
    prompt = len(encode(PROMPTS[1]))
    assert passes == [[(1, prompt), (1, 1)]], "the new prompt's rows, then the running row, in one pass"
    served = [token_ids(events) for events in run_until_done(engine, [first, late])]
    assert served == [reference_greedy(tiny_model.hf, encode(p), 6) for p in PROMPTS[:2]]


def test_rows_beyond_the_batch_wait_for_a_free_row(tiny_model):
    engine = make_engine(tiny_model, max_batch_size=2)
    handles = [
        engine.submit(engine.encode_text(p), SamplingParams(max_tokens=3, temperature=0.0)) for p in PROMPTS
    ]
    report = engine.step()
    assert len(report.running) == 2
    results = run_until_done(engine, handles)
    assert all(r[-1].reason == "length" for r in results)


def test_same_seed_same_output_whatever_the_batch(tiny_model):
    engine = make_engine(tiny_model)
    prompt = engine.encode_text(PROMPTS[0])
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = token_ids(run_until_done(engine, [engine.submit(prompt, params)])[0])
    others = [engine.submit(engine.encode_text(p), SamplingParams(max_tokens=16, seed=7)) for p in PROMPTS]
    crowded = engine.submit(prompt, params)
    results = run_until_done(engine, [*others, crowded])
    assert token_ids(results[-1]) == alone
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99)
    assert token_ids(run_until_done(engine, [engine.submit(prompt, other_seed)])[0]) != alone


def test_stop_string_ends_the_request_and_is_not_returned(tiny_model):
    engine = make_engine(tiny_model)
    prompt = engine.encode_text(PROMPTS[1])
    full = text_of(
        run_until_done(engine, [engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0))])[0]
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"generated text too short to pick a stop string: {full!r}"
    events = run_until_done(
        engine, [engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0, stop=(stop,)))]
    )[0]
    assert text_of(events) == full[: full.index(stop)]
    assert events[-1].reason == "stop"


def test_eos_ends_the_request(tiny_model):
    engine = make_engine(tiny_model)
    prompt = engine.encode_text(PROMPTS[0])
    eos = next(iter(tiny_model.eos_token_ids))
    # Make EOS the most likely token by boosting its output row: greedy decoding must stop on it.
    lm_head = tiny_model.hf.lm_head.weight
    saved = lm_head[eos].clone()
    try:
        with torch.no_grad():
            lm_head[eos] = tiny_model.hf.model.norm.weight.sign() * 10
        events = run_until_done(engine, [engine.submit(prompt, GREEDY)])[0]
    finally:
        with torch.no_grad():
            lm_head[eos] = saved
    assert events[-1].reason == "stop" and events[-1].completion_tokens == 1
    assert token_ids(events) == []


def test_cancel_waiting_and_running(tiny_model):
    engine = make_engine(tiny_model, max_batch_size=1)
    running = engine.submit(engine.encode_text(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=0))
    waiting = engine.submit(engine.encode_text(PROMPTS[1]), SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    assert engine.snapshot.running == 1
    waiting.cancel()
    running.cancel()
    report = engine.step()
    assert report.running == []
    assert running.drain()[-1].reason == "abort"
    assert waiting.drain()[-1].reason == "abort"
    snapshot = engine.snapshot
    assert (snapshot.running, snapshot.waiting, snapshot.kv_cache_usage) == (0, 0, 0.0)


def test_queue_bound(tiny_model):
    engine = make_engine(tiny_model, max_queue=2)
    prompt = engine.encode_text(PROMPTS[0])
    engine.submit(prompt, GREEDY)
    engine.submit(prompt, GREEDY)
    with pytest.raises(QueueFull):
        engine.submit(prompt, GREEDY)
    engine.step()  # both admitted: the queue has room again
    engine.submit(prompt, GREEDY)


def test_context_length_is_checked_at_submit(tiny_model):
    engine = make_engine(tiny_model)
    limit = tiny_model.max_model_len
    with pytest.raises(ContextLengthError, match=str(limit)):
        engine.submit([1] * 10, SamplingParams(max_tokens=limit - 9))
    engine.submit([1] * 10, SamplingParams(max_tokens=limit - 10))


def test_bad_token_ids_are_refused(tiny_model):
    engine = make_engine(tiny_model)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([tiny_model.shape.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)


def test_engine_thread_streams_to_asyncio(tiny_model):
    engine = make_engine(tiny_model)
    engine.start()
    try:

        async def main() -> list:
            handle = engine.submit(engine.encode_text(PROMPTS[0]), GREEDY)
            return [event async for event in handle]

        events = asyncio.run(main())
    finally:
        engine.stop()
    assert token_ids(events) == reference_greedy(tiny_model.hf, engine.encode_text(PROMPTS[0]), 12)
    assert events[-1].reason == "length"


def test_a_failing_step_ends_requests_and_the_loop_goes_on(tiny_model, monkeypatch):
    engine = make_engine(tiny_model)
    calls = {"n": 0}
    real = engine._take_snapshot

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:  # the first step's snapshot: outside the forward pass
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(engine, "_take_snapshot", flaky)
    engine.start()
    try:

        async def main() -> list:
            first = engine.submit(engine.encode_text(PROMPTS[0]), GREEDY)
            events = [event async for event in first]
            second = engine.submit(engine.encode_text(PROMPTS[1]), GREEDY)
            return [events[-1], [event async for event in second][-1]]

        failed, served = asyncio.run(main())
        assert engine.alive
    finally:
        engine.stop()
    assert failed.reason == "error" and "boom" in failed.error
    assert served.reason == "length"
    assert not engine.alive


def test_the_loop_sleeps_while_requests_wait_for_an_adapter_load(tiny_model, tiny_model_dir, tmp_path):
    # A spinning loop would hold the GIL the loader thread needs; it must wait to be woken instead.
    make_peft_adapter(tiny_model_dir, "lora", tmp_path / "bot")
    engine = Engine(tiny_model, EngineSettings(), AdapterSettings(), Store(tmp_path))
    load = engine.tiers._load
    loading = threading.Event()

    def slow_load(ref):
        loading.set()
        time.sleep(0.5)
        return load(ref)

    engine.tiers._load = slow_load
    steps = {"n": 0}
    step = engine.step

    def counted_step():
        steps["n"] += 1
        return step()

    engine.step = counted_step
    engine.start()
    try:

        async def main() -> list:
            handle = engine.submit(engine.encode_text(PROMPTS[0]), GREEDY, engine.resolve_model("bot"))
            return [event async for event in handle]

        events = asyncio.run(main())
    finally:
        engine.stop()
    assert loading.is_set() and events[-1].reason == "length"
    # the step that started the load, the one after it finished, then one per token at most
    assert steps["n"] <= GREEDY.max_tokens + 4


def test_a_dropped_engine_is_freed_without_the_cycle_collector(tiny_model, kinds_store):
    """Its KV cache and slot tables go when the last reference does: callbacks it hands out (the
    adapter loader, the metrics gauges) must not reach back to it. A bench of many engines held
    24 GB while each waited for the cycle collector; on a GPU each holds a share of its memory."""
    metrics = Metrics()
    greedy_3 = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = Engine(
        tiny_model,
        EngineSettings(max_batch_size=4),
        AdapterSettings(max_active_adapters=4),
        Store(kinds_store),
        metrics,
    )
    prompt = engine.encode_text("The cat sat")
    names = [None, *sorted(p.name for p in kinds_store.iterdir())]  # more kinds than slots: evictions too
    gc.collect()
    gc.disable()
    try:
        engine.start()
        handles = [engine.submit(prompt, greedy_3, engine.resolve_model(n) if n else None) for n in names]
        assert [events[-1].reason for events in wait_finished(handles, timeout=120)] == ["length"] * len(
            names
        )
        assert scrape(metrics)[("peftserve_adapter_slots", ())] == 4
        engine.stop()
        dropped, cache = weakref.ref(engine), weakref.ref(engine.cache.data)
        del engine, handles
        assert dropped() is None and cache() is None
    finally:
        gc.enable()
    assert ("peftserve_adapter_slots", ()) not in scrape(metrics), "a gone engine's gauges go with it"
    assert scrape(metrics)[("peftserve_generation_tokens_total", ())] == 3 * len(names), "the counters stay"
