"""Every request finishes exactly once: one Finished event, one count in the metrics, whatever fails."""

from __future__ import annotations

import threading
import time

import pytest

from server.config import AdapterSettings, EngineSettings
from server.engine import engine as engine_module
from server.engine.engine import Engine
from server.engine.request import EngineStopped, Finished, QueueFull
from server.engine.sampler import SamplingParams
from server.engine.scheduler import check
from server.registry.store import Store
from tests.helpers import wait_finished


def finished_counts(engine: Engine) -> float:
    """Requests the metrics count as ended, normally or not."""
    get = engine.metrics.registry.get_sample_value
    ends = [("peftserve_request_success_total", {"finish_reason": r}) for r in ("stop", "length")]
    ends += [("peftserve_request_failure_total", {"reason": r}) for r in ("cancelled", "error")]
    return sum(get(name, labels) or 0.0 for name, labels in ends)


def finishes(events) -> list[Finished]:
    return [e for e in events if isinstance(e, Finished)]


def fail_on_call(engine: Engine, monkeypatch, number: int) -> None:
    """Make the decoder's `number`-th forward pass raise."""
    forward = engine.decoder.hidden  # prefill and decode both run through it
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == number:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.decoder, "hidden", flaky)


def test_a_later_prefill_chunk_raising_does_not_finish_an_earlier_chunk_twice(tiny_model, monkeypatch):
    # 4 + 12 prompt tokens fit a budget of 16, but padded to 12 they do not: two prefill chunks.
    engine = Engine(tiny_model, EngineSettings(max_prefill_tokens=16))
    fail_on_call(engine, monkeypatch, 2)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    handles = [engine.submit([5] * 4, one), engine.submit([6] * 12, SamplingParams(max_tokens=4))]
    engine.start()  # after both submits: the first step admits both
    try:
        results = wait_finished(handles)
    finally:
        engine.stop()
    assert [len(finishes(r)) for r in results] == [1, 1]
    assert [finishes(r)[0].reason for r in results] == ["length", "error"]
    assert finished_counts(engine) == 2


def test_a_decode_raising_after_a_prefill_finished_a_sequence(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineSettings())
    fail_on_call(engine, monkeypatch, 1 + 1)  # the prefill of both, then the first decode
    handles = [
        engine.submit([5] * 4, SamplingParams(max_tokens=1, temperature=0.0)),
        engine.submit([6] * 4, SamplingParams(max_tokens=8, temperature=0.0)),
    ]
    engine.start()
    try:
        results = wait_finished(handles)
        served = wait_finished([engine.submit([7] * 4, SamplingParams(max_tokens=3))])[0]
    finally:
        engine.stop()
    assert [[f.reason for f in finishes(r)] for r in results] == [["length"], ["error"]]
    assert finishes(served)[0].reason == "length"
    assert finished_counts(engine) == 3


class SlowInbox:
    """The engine's inbox, with a pause before each put: it widens the window a stop can slip into."""

    def __init__(self, inbox) -> None:
        self.inbox = inbox

    def put(self, message) -> None:
        time.sleep(0.1)
        self.inbox.put(message)

    def get_nowait(self):
        return self.inbox.get_nowait()


def test_submit_racing_stop(tiny_model):
    engine = Engine(tiny_model, EngineSettings(max_queue=10_000))
    engine._inbox = SlowInbox(engine._inbox)
    engine.start()
    accepted, refused = [], []
    go = threading.Event()

    def client() -> None:
        go.wait()
        for _ in range(5):
            try:
                accepted.append(engine.submit([5, 6, 7], SamplingParams(max_tokens=2)))
            except EngineStopped:
                refused.append(1)
            except QueueFull:
                pass

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    go.set()
    time.sleep(0.05)
    engine.stop()
    for thread in clients:
        thread.join()
    results = wait_finished(accepted, timeout=10)
    assert all(len(finishes(r)) == 1 for r in results)
    assert finished_counts(engine) == len(accepted)
    assert refused, "the stop came after every submit: the race was not exercised"
    with pytest.raises(EngineStopped):
        engine.submit([5], SamplingParams(max_tokens=1))


def test_a_broken_plan_ends_only_the_requests_it_concerns(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineSettings())
    victim: list[int] = []

    def broken_schedule(waiting, running, slots, limits, free_blocks):
        plan = real(waiting, running, slots, limits, free_blocks)
        if victim and victim[0] in plan.admit:
            plan.admit.append(victim[0])  # admitted twice: a bug the check must catch
            check(plan, waiting, running, slots, limits, free_blocks)
        return plan

    real = engine_module.schedule
    monkeypatch.setattr(engine_module, "schedule", broken_schedule)
    engine.start()
    try:
        first = engine.submit([5] * 4, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        victim.append(first.request_id + 1)
        second = engine.submit([6] * 4, SamplingParams(max_tokens=4))
        third = engine.submit([7] * 4, SamplingParams(max_tokens=4))
        results = wait_finished([first, second, third])
    finally:
        engine.stop()
    reasons = [finishes(r)[0].reason for r in results]
    assert reasons == ["length", "error", "length"]
    assert "admitted twice" in finishes(results[1])[0].error
    assert finished_counts(engine) == 3


def test_an_adapter_that_fails_to_install_ends_only_its_requests(tiny_model, kinds_store, monkeypatch):
    engine = Engine(tiny_model, EngineSettings(), AdapterSettings(max_active_adapters=1), Store(kinds_store))
    install = engine.slots.install
    failures = {"left": 1}

    def flaky(slot, weights):
        if failures["left"]:
            failures["left"] -= 1
            install(slot, weights)  # half-written, then the failure: the slot must be cleared again
            raise RuntimeError("install broke")
        install(slot, weights)

    monkeypatch.setattr(engine.slots, "install", flaky)
    engine.start()
    try:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        lora = engine.resolve_model("lora")
        first = [engine.submit([5, 6, 7], params, lora), engine.submit([5, 6, 7], params)]
        failed, base = wait_finished(first)
        again = wait_finished([engine.submit([5, 6, 7], params, lora)])[0]
    finally:
        engine.stop()
    assert finishes(failed)[0].reason == "error" and "install broke" in finishes(failed)[0].error
    assert finishes(base)[0].reason == "length"
    assert finishes(again)[0].reason == "length"
    assert finished_counts(engine) == 3
