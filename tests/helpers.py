"""Plain helpers shared by tests."""

from __future__ import annotations

import faulthandler
import time

import torch

from server.engine.engine import Engine
from server.engine.request import Delta, Event, Finished, RequestHandle


def run_until_done(engine: Engine, handles: list[RequestHandle], timeout: float = 300.0) -> list[list[Event]]:
    """Drive an engine that has no thread by hand until every handle finishes; each handle's events."""
    events: list[list[Event]] = [[] for _ in handles]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, handle in enumerate(handles):
            events[i] += handle.drain()
        if all(e and isinstance(e[-1], Finished) for e in events):
            return events
        report = engine.step()
        if not (report.running or report.plan.admit):
            time.sleep(0.002)  # waiting for an adapter to load in the background
    faulthandler.dump_traceback(all_threads=True)  # where every thread was, for the failure report
    raise AssertionError("requests did not finish")


def token_ids(events: list[Event]) -> list[int]:
    return [t for e in events if isinstance(e, Delta) for t in e.token_ids]


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate`, greedy, for one prompt alone: the reference the engine must match."""
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, attention_mask=None
    )
    return out[0, len(prompt_ids) :].tolist()


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def wait_finished(handles: list[RequestHandle], timeout: float = 30.0) -> list[list[Event]]:
    """Wait for the handles of an engine that runs its own thread; each handle's events.

    A request that never finishes fails the test after `timeout` (a stall), with every thread's stack.
    """
    events: list[list[Event]] = [[] for _ in handles]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, handle in enumerate(handles):
            events[i] += handle.drain()
        if all(e and isinstance(e[-1], Finished) for e in events):
            return events
        time.sleep(0.005)
    faulthandler.dump_traceback(all_threads=True)
    stuck = [
        h.request_id for h, e in zip(handles, events, strict=True) if not (e and isinstance(e[-1], Finished))
    ]
    raise AssertionError(f"requests {stuck} did not finish within {timeout} s")
