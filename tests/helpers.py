"""Plain helpers shared by tests."""

from __future__ import annotations

import faulthandler
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from server import OPENMP_WAITING
from server.engine.engine import Engine
from server.engine.request import Delta, Event, Finished, RequestHandle


def env_without_openmp_waiting() -> dict[str, str]:
    """This environment less the OpenMP settings server/__init__.py defaults (the thread count
    too, which it sets under a CPU quota), for a fresh process."""
    return {k: v for k, v in os.environ.items() if k not in OPENMP_WAITING and k != "OMP_NUM_THREADS"}


def run_until_done(engine: Engine, handles: list[RequestHandle], timeout: float = 300.0) -> list[list[Event]]:
    """Drive an engine that has no thread by hand until every handle finishes; each handle's events."""

    def step() -> None:
        report = engine.step()
        if not (report.running or report.plan.admit):
            time.sleep(0.002)  # waiting for an adapter to load in the background

    return _collect(handles, timeout, step)


def token_ids(events: list[Event]) -> list[int]:
    return [t for e in events if isinstance(e, Delta) for t in e.token_ids]


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def reference_greedy(
    model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True
) -> list[int]:
    """The ground truth the engine must match: greedy tokens of one prompt alone, each one from a
    full forward over the prompt and the tokens so far, without a KV cache.

    `model` is a plain HF causal LM, a PeftModel of any kind, or a model under our bottleneck
    reference. Cached `generate` is not used: for prefix- and prompt-tuning adapters PEFT's cached
    path departs from its own uncached forward (transformers 5.24). Stops at EOS without emitting
    it, as the engine does, unless `stop_at_eos` is False (the engine's ignore_eos).
    """
    eos = _eos_ids(model) if stop_at_eos else set()
    tokens = list(prompt_ids)
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=torch.tensor([tokens], device=device), use_cache=False, logits_to_keep=1
            ).logits  # (1, 1, vocab)
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
    return tokens[len(prompt_ids) :]


NEAR_TIE_ULPS = 16
"""A step of a float32 reference is a near tie when its top-2 logit margin is below this many
float32 epsilons times the step's largest |logit|: the floor for every dtype, since another
summation order (a batch, a KV cache, another device) moves float32 logits by a few epsilons of
their scale. Served in float32 that is plain equality in practice."""

NEAR_TIE_DRIFTS = 2
"""Served in a lower-precision dtype, a step is also a near tie when its float32 margin is below
this many times the row's measured drift (`margin_drift`: the largest move of a top-k margin over
the row's steps when the row's reference model runs in that dtype instead of float32). Why 2: the
served run rounds in another order than the run the drift was measured on (batched, cached, our own
adapter kernels), so its moves are of the same size but land elsewhere, and a maximum over a few
positions understates the tail. Measured on the CPU in bfloat16 (the default model, every kind,
three prompts, 72 rows): where a served token left the reference, the margin there was at most
1.01x the row's drift (so a factor of 1 would fail falsely): 2 leaves 2x headroom. A near tie
is never a pass, only the end of what can be compared."""


TOP_K_DRIFT = 5
"""The float32 run's top-k tokens whose margins `margin_drift` follows: the candidates for greedy."""


def margin_drift(exact: torch.Tensor, low: torch.Tensor, k: int = TOP_K_DRIFT) -> float:
    """How far a lower-precision run moves the margins that decide greedy tokens: over positions,
    the largest |change| of (top-1 - top-j) logit for the float32 run's top-k tokens j. `exact` and
    `low` are (T, vocab) logits of the same tokens in float32 and in the lower dtype. A shift of
    every logit at once changes no margin and does not count; a run that overflowed (inf, NaN)
    drifts without bound."""
    top = exact.float().topk(k, dim=-1)  # (T, k)
    moved = low.float().gather(1, top.indices)  # (T, k)
    change = (moved[:, :1] - moved) - (top.values[:, :1] - top.values)
    drift = float(change.abs().max())
    return drift if math.isfinite(drift) else math.inf


def reference_steps(
    model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True
) -> list[tuple[int | None, float, float]]:
    """`reference_greedy` that keeps each step's (token, top-2 logit margin, max |logit|), so a
    caller can tell a near tie from a real difference; the EOS step it stops at is kept with token
    None (nothing emitted there). Run it on a float32 model."""
    eos = _eos_ids(model) if stop_at_eos else set()
    tokens, steps = list(prompt_ids), []
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=torch.tensor([tokens], device=device), use_cache=False, logits_to_keep=1
            ).logits[0, -1]
            logits = logits.float()
            top2 = logits.topk(2).values
            token = int(logits.argmax())
            steps.append(
                (None if token in eos else token, float(top2[0] - top2[1]), float(logits.abs().max()))
            )
            if token in eos:
                break
            tokens.append(token)
    return steps


def compare_up_to_near_ties(
    served: list[int], steps: list[tuple[int | None, float, float]], what: str, drift: float = 0.0
) -> int:
    """Tokens served against a float32 reference's steps, equal at every clear step. A step is a
    near tie when its float32 margin is below the larger of NEAR_TIE_ULPS float32 epsilons of its
    scale and NEAR_TIE_DRIFTS times `drift` (the row's measured `margin_drift` in the serving
    dtype; 0 when served in float32). At a near tie the served run may rightly take the other
    token: if it did, nothing after it is compared (the contexts differ); if it took the same
    token, the contexts are still equal and comparing goes on. Returns how many clear steps were
    compared equal (the caller checks enough were); a difference at a clear step fails, naming it."""
    eps = torch.finfo(torch.float32).eps
    expected = [t for t, _, _ in steps]
    compared = 0
    for i, (token, margin, scale) in enumerate(steps):
        got = served[i] if i < len(served) else None  # None: served stopped (EOS) here
        bound = max(NEAR_TIE_ULPS * eps * scale, NEAR_TIE_DRIFTS * drift)
        if margin < bound:
            if got != token:
                return compared
            continue
        if got != token:
            raise AssertionError(
                f"{what}: step {i} served {got}, the float32 reference {token} (None: stop) with a clear "
                f"margin {margin:.4g} (near-tie bound {bound:.4g}, drift {drift:.4g}); "
                f"served {served}, expected {expected}"
            )
        compared += 1
    return compared


def _eos_ids(model) -> set[int]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = base.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def wait_finished(handles: list[RequestHandle], timeout: float = 30.0) -> list[list[Event]]:
    """Wait for the handles of an engine that runs its own thread; each handle's events.

    A request that never finishes fails the test after `timeout` (a stall), with every thread's stack.
    """
    return _collect(handles, timeout, lambda: time.sleep(0.005))


def _collect(handles: list[RequestHandle], timeout: float, between: Callable[[], None]) -> list[list[Event]]:
    """Drain every handle, calling `between` until all have finished; fail after `timeout`."""
    events: list[list[Event]] = [[] for _ in handles]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, handle in enumerate(handles):
            events[i] += handle.drain()
        if all(e and isinstance(e[-1], Finished) for e in events):
            return events
        between()
    faulthandler.dump_traceback(all_threads=True)  # where every thread was, for the failure report
    stuck = [
        h.request_id for h, e in zip(handles, events, strict=True) if not (e and isinstance(e[-1], Finished))
    ]
    raise AssertionError(f"requests {stuck} did not finish within {timeout} s")


LINEARS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def write_random_lora(hf_model, out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    """A PEFT-format LoRA folder with random A and B, written directly (no get_peft_model: fast)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, layer in enumerate(hf_model.model.layers):
        for name in targets:
            linear = getattr(getattr(layer, LINEARS[name]), name)
            prefix = f"base_model.model.model.layers.{index}.{LINEARS[name]}.{name}"
            a = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out / "adapter_model.safetensors")
    return out
