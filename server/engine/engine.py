"""The step loop: iteration-level (continuous) batching in its own thread.

Each step the scheduler may admit waiting requests; they are prefilled and join the running
batch, which then decodes one token for every running sequence. Finished sequences leave
between steps. The batch is never drained to admit new work.

The asyncio side talks to this thread only through `submit`/`cancel` (an inbox queue) and
the per-request handles it pushes events into.

The loop sleeps only when nothing runs and the scheduler, asked again, would neither admit
nor load anything; then only a submit, a cancel, a finished adapter load or a stop can change
that, and each of them wakes it. Every request ends with exactly one Finished event.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jinja2
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from server.adapters.common import AdapterRef
from server.adapters.context import BatchContext
from server.adapters.loader import folder_loader
from server.adapters.slots import SlotTable
from server.base_model import LoadedModel
from server.config import AdapterSettings, EngineSettings
from server.engine.detokenizer import Detokenizer
from server.engine.kv_cache import KVCache
from server.engine.model import Decoder, StepInputs
from server.engine.request import (
    ContextLengthError,
    Delta,
    EngineStopped,
    Event,
    Finished,
    FinishReason,
    InvalidRequest,
    QueueFull,
    RequestHandle,
    UnknownModel,
)
from server.engine.sampler import SamplingParams, new_generator, sample
from server.engine.scheduler import Limits, Plan, PlanError, Waiting, schedule
from server.engine.tiers import AdapterTiers
from server.metrics import EngineSnapshot, Metrics

log = logging.getLogger("peftserve.engine")


class EngineInvariantError(RuntimeError):
    """The engine's own bookkeeping broke (a bug): rows, queue counts or a request's life."""


class AdapterSource(Protocol):
    """Where adapter names are resolved (the registry)."""

    def resolve(self, name: str) -> AdapterRef:
        """The adapter version a `model` field names; KeyError if none."""

    def verified_path(self, ref: AdapterRef) -> Path:
        """The folder to load `ref` from, its files checked; raises if they no longer match."""


@dataclass
class Sequence:
    """One request inside the engine thread."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    handle: RequestHandle
    generator: torch.Generator
    detok: Detokenizer
    arrival: float
    """time.monotonic() at submit."""
    last_token_at: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0
    """Positions of this sequence's cache row that hold keys and values."""
    slot: int = -1
    """Device slot of its adapter while running; -1 for the base model."""
    done: bool = False
    """Set by the one `_finish` call that ended it."""

    @property
    def virtual_tokens(self) -> int:
        return self.adapter.virtual_tokens if self.adapter else 0

    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass
class StepReport:
    """What one step did, for callers that drive the engine by hand."""

    plan: Plan
    running: list[int]
    finished: list[int]


class Engine:
    """Owns the model, the cache and the running batch; `step` is the only mutator of all three."""

    def __init__(
        self,
        model: LoadedModel,
        settings: EngineSettings,
        adapters: AdapterSettings | None = None,
        source: AdapterSource | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.adapter_settings = adapters or AdapterSettings()
        self.source = source
        self.metrics = metrics or Metrics()
        self.metrics.describe(model.name, str(model.dtype).removeprefix("torch."), model.quantize)
        self.decoder = Decoder(model.hf, model.shape)
        shape = model.shape
        self.cache = KVCache(
            shape.num_layers,
            settings.max_batch_size,
            shape.num_kv_heads,
            model.max_model_len,
            shape.head_dim,
            model.dtype,
            model.device,
        )
        self.limits = Limits(settings.max_batch_size, settings.max_prefill_tokens, settings.adapter_aging)
        self._waiting: OrderedDict[int, Sequence] = OrderedDict()  # in arrival order
        self._running: list[Sequence] = []  # index = cache row
        self._admitting: list[Sequence] = []  # left the queue this step, not yet all in rows
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count(1)
        # Guards the counts below and the refusal flags, so a submit never slips past a stop.
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted (in the inbox or waiting)
        self._unfinished = 0  # submitted, not yet finished
        self._draining = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled_since: float | None = None
        self.slots = SlotTable(self.adapter_settings.max_active_adapters, shape, model.dtype, model.device)
        load = folder_loader(model, self.adapter_settings.max_lora_rank)
        self.tiers = AdapterTiers(
            self.slots,
            self.adapter_settings.cpu_adapter_memory,
            lambda ref: load(self.source.verified_path(ref) if self.source else ref.path),
            self._wake.set,
            self.metrics,
        )
        self._snapshot = self._take_snapshot()
        self.metrics.watch(lambda: self._snapshot)

    # ---- the caller's side (any thread) ----

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render messages with the tokenizer's chat template, ready for the assistant's turn."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template rejected these messages: {exc}") from exc

    def resolve_model(self, name: str) -> AdapterRef | None:
        """The adapter a `model` field names, None for the base model; raises UnknownModel."""
        if name == self.model.name:
            return None
        if self.source is None:
            raise UnknownModel(name)
        try:
            return self.source.resolve(name)
        except KeyError:
            raise UnknownModel(name) from None

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterRef | None = None
    ) -> RequestHandle:
        """Queue a request; its events arrive on the returned handle, ending with exactly one Finished."""
        limit = self.model.max_model_len
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.shape.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        prompt_tokens = len(prompt_ids) + (adapter.virtual_tokens if adapter else 0)
        if prompt_tokens + params.max_tokens > limit:
            raise ContextLengthError(prompt_tokens, params.max_tokens, limit)
        try:
            generator = new_generator(params.seed)
        except (ValueError, OverflowError, RuntimeError) as exc:
            raise InvalidRequest(
                "seed", f"seed must be an integer in [-2**63, 2**64), got {params.seed}"
            ) from exc
        with self._lock:
            if self._stopping.is_set() or self._draining:
                raise EngineStopped("the server is shutting down; retry on another replica or later")
            if self._queued >= self.settings.max_queue:
                raise QueueFull(self.settings.max_queue)
            self._queued += 1
            self._unfinished += 1
            handle = RequestHandle(next(self._ids), self.cancel)
            self._inbox.put(
                ("submit", handle, list(prompt_ids), params, adapter, generator, time.monotonic())
            )
        self._wake.set()
        return handle

    def cancel(self, request_id: int) -> None:
        """Stop a request; it ends with reason "abort" within one step."""
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="peftserve-engine", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to `timeout` s for those accepted to finish; True if they did."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._unfinished == 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def stop(self, reason: str = "the server is shutting down") -> None:
        """End the step loop; every request still in flight ends with "abort" and `reason`. Idempotent."""
        with self._lock:
            self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._take_inbox()
        self._end_all("abort", reason)
        self.tiers.shutdown()

    @property
    def draining(self) -> bool:
        """True once new requests are refused (a drain or a stop began)."""
        return self._draining or self._stopping.is_set()

    def stalled_for(self) -> float:
        """Seconds the oldest waiting request has waited with nothing running, as of the last step."""
        since = self._stalled_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def snapshot(self) -> EngineSnapshot:
        """The state after the last step (the gauges read it; callers may too)."""
        return self._snapshot

    # ---- the engine thread ----

    @property
    def alive(self) -> bool:
        """True while the step loop runs (or was never started, for callers that drive it by hand)."""
        return self._thread is None or self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before the step: a wake-up that comes during it is kept
            try:
                self.step()
                busy = self._could_progress()
            except Exception as exc:  # a bug outside the forward pass: end what is in flight, keep serving
                log.exception("engine step failed")
                self._end_all("error", f"internal error: {exc}")
                busy = False
            if not busy:
                # Only a submit, a cancel, a finished adapter load or a stop can change anything now.
                # Spinning instead would starve the loader thread of the GIL.
                self._wake.wait()

    def _could_progress(self) -> bool:
        """True if a step now would change something without an outside event."""
        if self._running:
            return True
        if not self._waiting:
            return False
        try:
            return self._schedule().acts
        except PlanError:
            return True  # the next step ends the requests it concerns

    def step(self) -> StepReport:
        """Admit what the scheduler allows, prefill it, decode one token for every running sequence."""
        self._take_inbox()
        finished = self._fail_loads()
        plan = self._plan(finished)
        refs = {s.adapter.key: s.adapter for s in self._waiting.values() if s.adapter}
        for slot, key in plan.load:
            try:
                self.tiers.start_load(slot, refs[key])
            except Exception as exc:  # only the requests for this adapter fail
                log.exception("adapter %s could not be placed into slot %d", key, slot)
                wanting = [i for i, s in self._waiting.items() if s.adapter and s.adapter.key == key]
                for seq in self._dequeue(wanting):
                    self._finish(seq, "error", error=f"adapter {refs[key].name} could not be loaded: {exc}")
                    finished.append(seq.request_id)
        self._admitting = admitted = self._dequeue(plan.admit)
        now = time.monotonic()
        for seq in admitted:
            self.metrics.queue_time.observe(now - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            if seq.adapter is not None:
                seq.slot = self.tiers.slot_of(seq.adapter.key)
                self.tiers.acquire(seq.slot)
        try:
            if admitted:
                finished += self._prefill(admitted)
            if self._running:
                finished += self._decode()
        except Exception as exc:  # a bug or an out-of-memory: fail this batch, keep serving
            log.exception("engine step failed")
            for seq in {id(s): s for s in [*admitted, *self._running]}.values():
                if not seq.done:
                    self._finish(seq, "error", error=f"internal error: {exc}")
                    finished.append(seq.request_id)
            self._running.clear()
        self._admitting = []
        self._snapshot = self._take_snapshot()
        return StepReport(plan, [s.request_id for s in self._running], finished)

    def _schedule(self) -> Plan:
        now = time.monotonic()
        waiting = [
            Waiting(
                s.request_id,
                s.adapter.key if s.adapter else None,
                len(s.prompt_ids) + s.virtual_tokens,
                now - s.arrival,
            )
            for s in self._waiting.values()
        ]
        return schedule(waiting, len(self._running), self.tiers.states(), self.limits)

    def _plan(self, finished: list[int]) -> Plan:
        """This step's plan; a broken one ends only the waiting requests it concerns, then plans again."""
        while True:
            try:
                return self._schedule()
            except PlanError as exc:
                log.error("scheduler: %s; ending the requests it concerns", exc)
                concerned = [i for i in exc.request_ids if i in self._waiting] or list(self._waiting)
                for seq in self._dequeue(concerned):
                    self._finish(seq, "error", error=f"internal error: {exc}")
                    finished.append(seq.request_id)

    def _dequeue(self, request_ids: list[int]) -> list[Sequence]:
        """Take these requests out of the queue, giving their queue places back."""
        seqs = [self._waiting.pop(i) for i in request_ids]
        with self._lock:
            self._queued -= len(seqs)
            if self._queued < 0:
                raise EngineInvariantError(f"queue count went below zero ({self._queued})")
        return seqs

    def _end_all(self, reason: FinishReason, error: str) -> None:
        """End every request in flight, each exactly once: waiting, being admitted, running."""
        seqs = [*self._dequeue(list(self._waiting)), *self._admitting, *self._running]
        for seq in {id(s): s for s in seqs}.values():
            if not seq.done:
                self._finish(seq, reason, error=error)
        self._admitting = []
        self._running.clear()

    def _take_snapshot(self) -> EngineSnapshot:
        slots = self.tiers.slots
        resident = {s.ref.key: s.ref.name for s in slots if s.ref is not None and s.ready}
        waiting = [s.adapter for s in self._waiting.values() if s.adapter and s.adapter.key not in resident]
        oldest = next(iter(self._waiting.values()), None)
        self._stalled_since = oldest.arrival if oldest is not None and not self._running else None
        return EngineSnapshot(
            running=len(self._running),
            waiting=self._queued,
            kv_cache_usage=sum(s.cached for s in self._running) / (self.cache.rows * self.cache.max_len),
            slots=len(slots),
            slots_used=sum(s.ref is not None for s in slots),
            cached_adapters=len(self.tiers.cpu),
            running_adapters=tuple(dict.fromkeys(resident.values())),
            waiting_adapters=tuple(dict.fromkeys(ref.name for ref in waiting)),
            taken_at=time.time(),
            resident=self._residency(),
        )

    def _residency(self) -> tuple[tuple[str, int, str], ...]:
        """(name, version, tier) per adapter version held, for routers telling warm from cold."""
        device = {s.ref.key: s.ref for s in self.tiers.slots if s.ref is not None and s.ready}
        held = [(ref.name, ref.version, "device") for ref in device.values()]
        for key in self.tiers.cpu:
            if key not in device:
                name, _, rest = key.partition("@")  # AdapterRef.key: name@version#digest
                held.append((name, int(rest.partition("#")[0]), "cpu"))
        return tuple(held)

    def _fail_loads(self) -> list[int]:
        """Requests waiting for an adapter that failed to load end with its error."""
        failed: list[int] = []
        for failure in self.tiers.poll():
            for seq in self._dequeue([i for i, s in self._waiting.items() if s.adapter == failure.ref]):
                self._finish(
                    seq, "error", error=f"adapter {failure.ref.name} could not be loaded: {failure.error}"
                )
                failed.append(seq.request_id)
        return failed

    def _take_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "submit":
                _, handle, prompt_ids, params, adapter, generator, arrival = message
                self._waiting[handle.request_id] = Sequence(
                    request_id=handle.request_id,
                    prompt_ids=prompt_ids,
                    params=params,
                    adapter=adapter,
                    handle=handle,
                    generator=generator,
                    detok=Detokenizer(self.tokenizer, prompt_ids, params.stop),
                    arrival=arrival,
                )
            else:
                self._abort(message[1])

    def _abort(self, request_id: int) -> None:
        if request_id in self._waiting:
            self._finish(self._dequeue([request_id])[0], "abort")
            return
        for row, seq in enumerate(self._running):
            if seq.request_id == request_id:
                self._finish(seq, "abort")
                self._release_rows([row])
                return

    def _prefill(self, admitted: list[Sequence]) -> list[int]:
        """Prefill in chunks of similar length, each within the prefill token budget."""
        finished: list[int] = []
        admitted = sorted(admitted, key=lambda s: len(s.prompt_ids))
        chunk: list[Sequence] = []
        for seq in admitted:
            longest = (
                max(len(seq.prompt_ids), *(len(s.prompt_ids) for s in chunk))
                if chunk
                else len(seq.prompt_ids)
            )
            if chunk and longest * (len(chunk) + 1) > self.limits.max_prefill_tokens:
                finished += self._prefill_chunk(chunk)
                chunk = []
            chunk.append(seq)
        if chunk:
            finished += self._prefill_chunk(chunk)
        return finished

    def _prefill_chunk(self, chunk: list[Sequence]) -> list[int]:
        """Prefill new sequences into rows after the running ones; sample each one's first token.

        Prompt-tuning rows get their virtual tokens in front of the prompt's embeddings;
        prefix-tuning rows get their keys and values written at positions 0..n-1, and the
        prompt starts at position n.
        """
        device, slots = self.model.device, self.slots
        first_row = len(self._running)
        if first_row + len(chunk) > self.cache.rows:
            raise EngineInvariantError(
                f"{first_row} rows run; {len(chunk)} more do not fit {self.cache.rows}"
            )
        kinds = [slots.kinds[s.slot] if s.slot >= 0 else None for s in chunk]
        prompt_virtual = [
            s.virtual_tokens if k == "prompt_tuning" or k == "p_tuning" else 0
            for s, k in zip(chunk, kinds, strict=True)
        ]
        starts = [s.virtual_tokens if k == "prefix_tuning" else 0 for s, k in zip(chunk, kinds, strict=True)]
        lengths = [v + len(s.prompt_ids) for s, v in zip(chunk, prompt_virtual, strict=True)]
        width = max(lengths)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, seq in enumerate(chunk):
            ids[i, prompt_virtual[i] : lengths[i]] = torch.tensor(seq.prompt_ids)
        embeds = self.decoder.embed(ids.to(device))  # (B, T, hidden)
        for i, seq in enumerate(chunk):
            if prompt_virtual[i]:
                embeds[i, : prompt_virtual[i]] = slots.prompts[seq.slot]
            if starts[i]:
                self.cache.write_prefix(first_row + i, *slots.prefixes[seq.slot])
        token_slots = torch.tensor([s.slot for s in chunk], device=device).repeat_interleave(width)
        step = StepInputs(
            first_row=first_row,
            positions=(torch.tensor(starts).unsqueeze(1) + torch.arange(width)).to(device),
            lengths=torch.tensor(lengths, device=device),
            adapters=BatchContext(slots, token_slots),
        )
        logits = self.decoder.forward(embeds, step, self.cache)
        for seq, start, length in zip(chunk, starts, lengths, strict=True):
            seq.cached = start + length
        self._running.extend(chunk)
        return self._accept(list(range(first_row, first_row + len(chunk))), logits)

    def _decode(self) -> list[int]:
        device = self.model.device
        batch = self._running
        tokens = torch.tensor([[s.last_token()] for s in batch], device=device)
        step = StepInputs(
            first_row=0,
            positions=torch.tensor([[s.cached] for s in batch], device=device),
            lengths=torch.ones(len(batch), dtype=torch.long, device=device),
            adapters=BatchContext(self.slots, torch.tensor([s.slot for s in batch], device=device)),
        )
        logits = self.decoder.forward(self.decoder.embed(tokens), step, self.cache)
        self.metrics.batch_size.observe(len(batch))
        for seq in batch:
            seq.cached += 1
        return self._accept(list(range(len(batch))), logits)

    def _accept(self, rows: list[int], logits: torch.Tensor) -> list[int]:
        """Sample one token for each of these cache rows; finish and release the sequences that end."""
        seqs = [self._running[r] for r in rows]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        done_rows: list[int] = []
        done_ids: list[int] = []
        for row, seq, token in zip(rows, seqs, tokens, strict=True):
            reason = self._append(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                done_rows.append(row)
                done_ids.append(seq.request_id)
        self._release_rows(done_rows)
        return done_ids

    def _append(self, seq: Sequence, token: int) -> FinishReason | None:
        """Record one generated token; the reason the sequence ends, if it does."""
        now = time.monotonic()
        if seq.output_ids:
            self.metrics.itl.observe(now - seq.last_token_at)
        else:
            self.metrics.ttft.observe(now - seq.arrival)
        seq.last_token_at = now
        seq.output_ids.append(token)
        self.metrics.generation_tokens.inc()
        if token in self.model.eos_token_ids and not seq.params.ignore_eos:
            return "stop"
        text = seq.detok.add(token)
        if text or not seq.detok.stopped:
            seq.handle.push(Delta(text, (token,)))
        if seq.detok.stopped:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End a request: its one Finished event, its one count in the metrics, its slot given back."""
        if seq.done:
            raise EngineInvariantError(f"request {seq.request_id} finished twice")
        seq.done = True
        with self._lock:
            self._unfinished -= 1
            if self._unfinished < 0:
                raise EngineInvariantError(f"unfinished count went below zero ({self._unfinished})")
        if reason in ("stop", "length"):
            self.metrics.request_success.labels(finish_reason=reason).inc()
            self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        else:
            self.metrics.request_failure.labels(reason="cancelled" if reason == "abort" else "error").inc()
        tail = seq.detok.finish() if reason in ("stop", "length") else ""
        if tail:
            seq.handle.push(Delta(tail, ()))
        event: Event = Finished(reason, len(seq.prompt_ids), len(seq.output_ids), error)
        seq.handle.push(event)
        if seq.slot >= 0:
            slot, seq.slot = seq.slot, -1
            self.tiers.release(slot)

    def _release_rows(self, rows: list[int]) -> None:
        """Remove finished rows, moving the last rows into the holes so rows stay dense."""
        if len(set(rows)) != len(rows) or not all(0 <= r < len(self._running) for r in rows):
            raise EngineInvariantError(f"releasing rows {rows} of {len(self._running)}")
        for row in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if row != last:
                moved = self._running[last]
                self.cache.move_row(last, row, moved.cached)
                self._running[row] = moved
            self._running.pop()
