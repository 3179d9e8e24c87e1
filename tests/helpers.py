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
    """The ground truth the engine must match: greedy tokens of one prompt alone, each one from a
    full forward over the prompt and the tokens so far, without a KV cache.

    `model` is a plain HF causal LM, a PeftModel of any kind, or a model under our bottleneck
    reference. Cached `generate` is not used: for prefix- and prompt-tuning adapters PEFT's cached
    path departs from its own uncached forward (transformers 5.24). Stops at EOS without emitting
    it, as the engine does.
    """
    eos = _eos_ids(model)
    tokens = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits  # (1, T, vocab)
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
    return tokens[len(prompt_ids) :]


def _eos_ids(model) -> set[int]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = base.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
