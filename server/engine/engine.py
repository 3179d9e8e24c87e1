"""The step loop: iteration-level (continuous) batching in its own thread.

Each step the scheduler may admit waiting requests; they are prefilled in the same forward pass
that decodes one token for every running sequence, and join the running batch. Finished
sequences leave between steps. The batch is never drained to admit new work.

Keys and values live in a paged cache (kv_cache.py): a sequence takes blocks as it grows and
gives them back when it ends. A prompt whose first full blocks are cached under the same adapter
(blocks.py) shares them and prefills only the rest. When a running sequence needs a block and
none is left, the newest running sequence is preempted: its blocks go back, it returns to the
front of the queue, and when it runs again its prompt and the tokens it already streamed are
recomputed (most often found in the prefix cache), so its stream goes on with the next token.

The asyncio side talks to this thread only through `submit`/`cancel` (an inbox queue) and
the per-request handles it pushes events into.

The loop sleeps only when nothing runs and the scheduler, asked again, would neither admit
nor load anything; then only a submit, a cancel, a finished adapter load or a stop can change
that, and each of them wakes it. Every request ends with exactly one Finished event.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
import weakref
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
from server.adapters.method import Hook
from server.adapters.slots import SlotTable
from server.base_model import LoadedModel
from server.config import AdapterSettings, EngineSettings
from server.engine.blocks import NULL_BLOCK, BlockPool, block_hashes, chain_hash, root_hash
from server.engine.detokenizer import Detokenizer
from server.engine.grammar import GrammarCompiler, RowControl, apply_controls
from server.engine.graphs import DecodeGraphs, GraphCaptureError
from server.engine.kv_cache import PagedKVCache, bytes_per_token, choose_budget
from server.engine.logprobs import MAX_LOGPROBS, prompt_logprobs, token_logprobs
from server.engine.model import Decoder, StepInputs
from server.engine.request import (
    ContextLengthError,
    Delta,
    EngineStopped,
    Event,
    Finished,
    FinishReason,
    InvalidRequest,
    PromptLogprobs,
    QueueFull,
    RequestHandle,
    TokenLogprob,
    UnknownModel,
)
from server.engine.sampler import SamplingParams, new_generator, sample
from server.engine.scheduler import Limits, Plan, PlanError, Waiting, schedule
from server.engine.tiers import AdapterTiers
from server.metrics import EngineSnapshot, Metrics

log = logging.getLogger("peftserve.engine")

SHARED_PREFIX_BLOCKS = 4
"""Waiting requests that would compute this many identical uncached blocks prefill one at a time."""


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
    """Positions of this sequence that hold keys and values in its blocks."""
    blocks: list[int] = field(default_factory=list)
    """Its block table: the cache blocks holding positions 0, block_size, 2 * block_size, ..."""
    hashes: list[bytes] = field(default_factory=list)
    """Prefix hashes of its first full blocks (as far as they are sealed)."""
    slot: int = -1
    """Device slot of its adapter while running; -1 for the base model."""
    preemptions: int = 0
    """Times it gave its blocks back to be recomputed later."""
    done: bool = False
    """Set by the one `_finish` call that ended it."""
    lookup: tuple[int, list[bytes]] = (0, [])
    """(tokens, hashes of its full blocks but the last token's) from the last prefix cache lookup."""
    control: RowControl | None = None
    """Its logit_bias and grammar state, if it has either."""
    prompt_scored: bool = False
    """Its prompt log-probabilities went out (a recompute after preemption does not repeat them)."""

    @property
    def wants_prompt_logprobs(self) -> bool:
        """It still needs every prompt position's logits: its prefill must compute them all."""
        return self.params.prompt_logprobs is not None and not self.prompt_scored

    @property
    def virtual_tokens(self) -> int:
        return self.adapter.virtual_tokens if self.adapter else 0

    @property
    def identity(self) -> str:
        """What its keys and values depend on besides the tokens: the adapter version, if any."""
        return self.adapter.key if self.adapter else ""

    def tokens(self) -> list[int]:
        """What fills its positions: virtual tokens (as -1, -2, ...), the prompt, the generated tokens."""
        return [-1 - i for i in range(self.virtual_tokens)] + self.prompt_ids + self.output_ids

    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass
class StepReport:
    """What one step did, for callers that drive the engine by hand."""

    plan: Plan
    running: list[int]
    finished: list[int]


@dataclass
class Prefill:
    """A chunk of new sequences placed in the cache, ready for the forward pass."""

    seqs: list[Sequence]
    tokens: list[list[int]]
    """Each one's tokens (Sequence.tokens())."""
    starts: list[int]
    """The first position each one computes."""
    lengths: list[int]
    """Tokens each one computes."""
    ids: torch.Tensor
    """(B, T) their token ids from `starts` on, on the host, padded with 0."""
    step: StepInputs
    """Its inputs, on the host."""


class Engine:
    """Owns the model, the cache and the running batch; `step` is the only mutator of all three."""

    def __init__(
        self,
        model: LoadedModel,
        settings: EngineSettings,
        adapters: AdapterSettings | None = None,
        source: AdapterSource | None = None,
        metrics: Metrics | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.model = model
        self.chat_template = chat_template
        """Overrides the tokenizer's chat template (--chat-template)."""
        self.settings = settings
        self.adapter_settings = adapters or AdapterSettings()
        self.source = source
        self.metrics = metrics or Metrics()
        self.metrics.describe(model.name, str(model.dtype).removeprefix("torch."), model.quantize)
        self.decoder = Decoder(model.hf, model.shape)
        shape = model.shape
        self.cache = self._make_cache()
        self.blocks = BlockPool(self.cache.num_blocks, settings.enable_prefix_caching)
        self.metrics.describe_cache(self.cache.block_size, self.cache.num_blocks)
        self.limits = Limits(settings.max_batch_size, settings.max_prefill_tokens, settings.adapter_aging)
        self._waiting: OrderedDict[int, Sequence] = OrderedDict()  # in arrival order
        self._running: list[Sequence] = []  # in the order they joined
        self._admitting: list[Sequence] = []  # left the queue this step, not yet all running
        self._to_compute: dict[int, int] = {}  # request id -> tokens its prefill computes, as last planned
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
        self.slots = SlotTable(
            self.adapter_settings.max_active_adapters,
            shape,
            model.dtype,
            model.device,
            max_rank=self.adapter_settings.max_lora_rank,
            lowrank_path=self.adapter_settings.lowrank_path,
        )
        # The callbacks handed out below must not reach back to self: a dropped engine then frees
        # its KV cache and slot tables at once, not whenever the cycle collector runs.
        load = folder_loader(
            model,
            self.adapter_settings.max_lora_rank,
            own=False,
            max_copy_bytes=self.adapter_settings.max_module_copy_bytes,
        )
        self.tiers = AdapterTiers(
            self.slots,
            self.adapter_settings.cpu_adapter_memory,
            lambda ref: load(source.verified_path(ref) if source else ref.path),
            self._wake.set,
            self.metrics,
        )
        self.graphs = self._make_graphs()
        self._snapshot = self._take_snapshot()
        engine = weakref.ref(self)
        self.metrics.watch(lambda: (e := engine()) and e._snapshot)
        self.grammars = GrammarCompiler(model.tokenizer, model.shape.vocab_size, model.eos_token_ids)

    # ---- the caller's side (any thread) ----

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Render messages (and tools) with the chat template, ready for the assistant's turn."""
        template = self.chat_template or self.tokenizer.chat_template
        if not template:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=template,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template rejected these messages: {exc}") from exc

    @functools.cached_property
    def template_renders_tools(self) -> bool:
        """Whether the chat template shows tools to the model: a probe renders differently with one."""
        probe = [{"role": "user", "content": "hi"}]
        tool = {"type": "function", "function": {"name": "probe_tool", "parameters": {"type": "object"}}}
        try:
            return self.encode_chat(probe, [tool]) != self.encode_chat(probe)
        except ValueError:
            return False

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
        for param in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, param)
            if asked is not None and not 0 <= asked <= MAX_LOGPROBS:
                raise InvalidRequest(param, f"{param} must be in [0, {MAX_LOGPROBS}], got {asked}")
        if params.max_tokens < 0:
            raise InvalidRequest("max_tokens", f"max_tokens must be at least 0, got {params.max_tokens}")
        prompt_tokens = len(prompt_ids) + (adapter.virtual_tokens if adapter else 0)
        limit = min(limit, self.cache_tokens)  # one sequence never needs more blocks than there are
        if prompt_tokens + params.max_tokens > limit:
            raise ContextLengthError(prompt_tokens, params.max_tokens, limit)
        try:
            generator = new_generator(params.seed)
        except (ValueError, OverflowError, RuntimeError) as exc:
            raise InvalidRequest(
                "seed", f"seed must be an integer in [-2**63, 2**64), got {params.seed}"
            ) from exc
        control = self._control(params)
        with self._lock:
            if self._stopping.is_set() or self._draining:
                raise EngineStopped("the server is shutting down; retry on another replica or later")
            if self._queued >= self.settings.max_queue:
                raise QueueFull(self.settings.max_queue)
            self._queued += 1
            self._unfinished += 1
            handle = RequestHandle(next(self._ids), self.cancel)
            self._inbox.put(
                ("submit", handle, list(prompt_ids), params, adapter, generator, control, time.monotonic())
            )
        self._wake.set()
        return handle

    def _control(self, params: SamplingParams) -> RowControl | None:
        """A request's logits processing; compiles its grammar unless cached (callers on an event
        loop compile it first with `self.grammars.compile`, in a worker thread)."""
        vocab = self.model.shape.vocab_size
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise InvalidRequest("logit_bias", f"logit_bias token ids must be in [0, {vocab})")
        if not params.logit_bias and params.grammar is None:
            return None
        grammar = None if params.grammar is None else self.grammars.compile(params.grammar)
        return RowControl(params.logit_bias, grammar)

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
            if not seq.preemptions:
                self.metrics.queue_time.observe(now - seq.arrival)
                self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            if seq.adapter is not None:
                seq.slot = self.tiers.slot_of(seq.adapter.key)
                self.tiers.acquire(seq.slot)
        try:
            if admitted or self._running:
                finished += self._forward_all(admitted)
        except Exception as exc:  # a bug or an out-of-memory: fail this batch, keep serving
            log.exception("engine step failed")
            requeued = [s.request_id for s in admitted if s.request_id in self._waiting]
            for seq in {id(s): s for s in [*admitted, *self._running, *self._dequeue(requeued)]}.values():
                self._free_blocks(seq)
                if not seq.done:
                    self._finish(seq, "error", error=f"internal error: {exc}")
                    finished.append(seq.request_id)
            self._running.clear()
        self._admitting = []
        self._snapshot = self._take_snapshot()
        return StepReport(plan, [s.request_id for s in self._running], finished)

    def _schedule(self) -> Plan:
        now = time.monotonic()
        waiting = [self._waiting_entry(s, now) for s in self._waiting.values()]
        self._to_compute = {w.request_id: w.prompt_tokens for w in waiting}
        return schedule(waiting, len(self._running), self.tiers.states(), self.limits, self.blocks.available)

    def _waiting_entry(self, seq: Sequence, now: float) -> Waiting:
        """A waiting sequence as the scheduler sees it: what it would compute and the blocks it would take."""
        tokens = seq.tokens()
        hashes = self._lookup_hashes(seq, tokens)
        size = self.cache.block_size
        taken, hit = self.blocks.cost(hashes, -(-len(tokens) // size))
        shared = hit + SHARED_PREFIX_BLOCKS - 1  # the prefix it computes, if at least this long
        return Waiting(
            seq.request_id,
            seq.adapter.key if seq.adapter else None,
            len(tokens) - hit * size,
            now - seq.arrival,
            taken,
            hashes[shared] if shared < len(hashes) else None,
        )

    def _lookup_hashes(self, seq: Sequence, tokens: list[int]) -> list[bytes]:
        """Hashes of the full blocks before the last token (which is always computed, for its logits).
        None for a sequence that still needs its prompt's log-probabilities: cached blocks hold no logits."""
        if not self.blocks.prefix_caching or seq.wants_prompt_logprobs:
            return []
        if seq.lookup[0] != len(tokens):
            seq.lookup = (len(tokens), block_hashes(seq.identity, tokens[:-1], self.cache.block_size))
        return seq.lookup[1]

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
            self._free_blocks(seq)
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
            kv_cache_usage=self.blocks.used / self.blocks.capacity,
            slots=len(slots),
            slots_used=sum(s.ref is not None for s in slots),
            cached_adapters=len(self.tiers.cached()),
            running_adapters=tuple(dict.fromkeys(resident.values())),
            waiting_adapters=tuple(dict.fromkeys(ref.name for ref in waiting)),
            taken_at=time.time(),
            resident=self._residency(),
        )

    def _residency(self) -> tuple[tuple[str, int, str], ...]:
        """(name, version, tier) per adapter version held, for routers telling warm from cold."""
        device = {s.ref.key: s.ref for s in self.tiers.slots if s.ref is not None and s.ready}
        held = [(ref.name, ref.version, "device") for ref in device.values()]
        for key in self.tiers.cached():
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

    def _make_cache(self) -> PagedKVCache:
        """The paged cache, as many blocks as the memory budget holds; logs what fits."""
        settings, model, shape = self.settings, self.model, self.model.shape
        size, per_token = settings.block_size, bytes_per_token(shape, model.dtype)
        per_block = size * per_token
        worst = (settings.max_batch_size * -(-model.max_model_len // size) + 1) * per_block
        budget = choose_budget(
            model.device,
            None if settings.kv_cache_memory is None else int(settings.kv_cache_memory),
            settings.gpu_memory_utilization,
            worst,
        )
        num_blocks = budget.bytes // per_block
        if num_blocks < 2:
            raise ValueError(
                f"a KV cache budget of {budget.bytes} bytes ({budget.source}) holds no block of "
                f"{per_block} bytes; raise --kv-cache-memory"
            )
        cache = PagedKVCache(
            shape.num_layers, num_blocks, size, shape.num_kv_heads, shape.head_dim, model.dtype, model.device
        )
        tokens = (num_blocks - 1) * size
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens in %.2f GiB (%s), %.1f sequences of "
            "--max-model-len %d at once; prefix caching %s",
            num_blocks - 1,
            size,
            tokens,
            cache.nbytes / 1024**3,
            budget.source,
            tokens / model.max_model_len,
            model.max_model_len,
            "on" if settings.enable_prefix_caching else "off",
        )
        return cache

    @property
    def cache_tokens(self) -> int:
        """Tokens the KV cache holds in all."""
        return self.blocks.capacity * self.cache.block_size

    def _take_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "submit":
                _, handle, prompt_ids, params, adapter, generator, control, arrival = message
                self._waiting[handle.request_id] = Sequence(
                    request_id=handle.request_id,
                    prompt_ids=prompt_ids,
                    params=params,
                    adapter=adapter,
                    handle=handle,
                    generator=generator,
                    detok=Detokenizer(self.tokenizer, prompt_ids, params.stop),
                    arrival=arrival,
                    control=control,
                )
            else:
                self._abort(message[1])

    def _abort(self, request_id: int) -> None:
        if request_id in self._waiting:
            self._finish(self._dequeue([request_id])[0], "abort")
            return
        for seq in self._running:
            if seq.request_id == request_id:
                self._finish(seq, "abort")
                self._leave([seq])
                return

    def _forward_all(self, admitted: list[Sequence]) -> list[int]:
        """Prefill the admitted sequences and decode one token for every running one.

        The running batch rides along with the first prefill chunk: one forward pass, so every
        weight (and every adapter's) is read once for both, not once for each. The sequences
        prefilled here decode from the next step on.
        """
        self._grow()
        batch = list(self._running)
        finished: list[int] = []
        for chunk in self._chunks(admitted):
            prefill = self._prefill_inputs(chunk)
            if prefill is None and not batch:
                continue
            finished += self._forward(prefill, batch)
            batch = []
        if batch:
            finished += self._forward(None, batch)
        return finished

    def _chunks(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """Admitted sequences in chunks of similar length, each within the prefill token budget."""
        cost = {s.request_id: self._to_compute.get(s.request_id, len(s.tokens())) for s in admitted}
        chunks: list[list[Sequence]] = []
        chunk: list[Sequence] = []
        for seq in sorted(admitted, key=lambda s: cost[s.request_id]):
            longest = max(cost[seq.request_id], *(cost[s.request_id] for s in chunk)) if chunk else 0
            if chunk and longest * (len(chunk) + 1) > self.limits.max_prefill_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(seq)
        if chunk:
            chunks.append(chunk)
        return chunks

    def _place(self, seq: Sequence) -> bool:
        """Give a sequence its blocks: cached ones for its prefix, new ones for the rest; False if short."""
        tokens = seq.tokens()
        hit = self.blocks.hits(self._lookup_hashes(seq, tokens))
        self.blocks.take(hit)
        size = self.cache.block_size
        seq.blocks, seq.hashes, seq.cached = list(hit), seq.lookup[1][: len(hit)], len(hit) * size
        while len(seq.blocks) * size < len(tokens):
            block = self.blocks.allocate()
            if block is None:
                self._free_blocks(seq)
                return False
            seq.blocks.append(block)
        if self.blocks.prefix_caching:
            self.metrics.prefix_lookup(len(tokens), len(hit) * size)
        return True

    def _prefill_inputs(self, chunk: list[Sequence]) -> Prefill | None:
        """A chunk of new sequences, from their first uncached position, ready for the forward pass.

        Prefix-tuning rows get their virtual tokens' keys and values written here, and the pass
        starts at position n. A sequence whose blocks cannot all be found goes back to the front
        of the queue; None if none is left.
        """
        placed = []
        for seq in chunk:
            if self._place(seq):
                placed.append(seq)
            else:
                self._requeue(seq)
        if not placed:
            return None
        size, slots = self.cache.block_size, self.slots
        all_tokens = [s.tokens() for s in placed]
        starts = []
        for seq in placed:
            start = seq.cached
            prefix = slots.slot_data(seq.slot, Hook.KV_PREFIX)  # (keys, values) or None
            if prefix is not None and start < seq.virtual_tokens:
                keys, values = prefix  # (layers, kv_heads, n, head_dim)
                where = self._slots_of(seq, range(start, seq.virtual_tokens))
                self.cache.write_prefix(where, keys[:, :, start:], values[:, :, start:])
                start = seq.virtual_tokens
            starts.append(start)
        lengths = [len(t) - start for t, start in zip(all_tokens, starts, strict=True)]
        width = max(lengths)
        ids = torch.zeros(len(placed), width, dtype=torch.long)
        for i, (tokens, start) in enumerate(zip(all_tokens, starts, strict=True)):
            ids[i, : lengths[i]] = torch.tensor(tokens[start:]).clamp(min=0)
        positions = torch.tensor(starts).unsqueeze(1) + torch.arange(width)  # (B, T)
        table = self._block_table(placed, -(-(max(starts) + width) // size))
        real = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
        where = table.gather(1, positions // size) * size + positions % size
        where = torch.where(real, where, NULL_BLOCK * size)
        step = StepInputs(positions, table, where, span=max(starts) + width)
        return Prefill(placed, all_tokens, starts, lengths, ids, step)

    def _make_graphs(self) -> DecodeGraphs | None:
        """The captured decode steps --decode-graphs asks for; auto: on CUDA, and not over a
        bitsandbytes base, whose layers have not been checked under capture."""
        mode, model = self.settings.decode_graphs, self.model
        if mode == "off" or (mode == "auto" and (model.device.type != "cuda" or model.quantize != "none")):
            return None
        return DecodeGraphs(
            self.decoder, self.cache, self.slots, self.settings.max_batch_size, self.max_model_len
        )

    def _forward(self, prefill: Prefill | None, batch: list[Sequence]) -> list[int]:
        """One forward pass over a prefill chunk and (or) the running batch; samples a token for each
        of their sequences."""
        logits = self._replay(batch) if prefill is None and self.graphs is not None else None
        if logits is None:
            logits = self._pass(prefill, batch)
        seqs = []
        if prefill is not None:
            for seq, tokens in zip(prefill.seqs, prefill.tokens, strict=True):
                seq.cached = len(tokens)
                self._seal(seq, tokens)
            self._running.extend(prefill.seqs)
            seqs += prefill.seqs
        if batch:
            self.metrics.batch_size.observe(len(batch))
            size = self.cache.block_size
            for seq in batch:
                seq.cached += 1
                if seq.cached % size == 0:
                    self._seal(seq, seq.tokens())
            seqs += batch
        return self._accept(seqs, logits)

    def _replay(self, batch: list[Sequence]) -> torch.Tensor | None:
        """The running batch's logits from a decode graph; None if a row's adapter keeps the step
        eager, or if the step cannot be captured (and graphs stay off from then on)."""
        slot_of = [s.slot for s in batch]
        if not self.graphs.takes(slot_of):
            return None
        try:
            return self.graphs.decode([s.last_token() for s in batch], self._decode_inputs(batch), slot_of)
        except GraphCaptureError as e:
            log.warning("decode steps run uncaptured from now on: %s", e)
            self.graphs = None
            return None

    def _pass(self, prefill: Prefill | None, batch: list[Sequence]) -> torch.Tensor:
        """The eager forward pass of `_forward`: (rows, vocab) logits of each prefill row's last real
        token, then of every decode row. Prompt-tuning rows get their virtual tokens' embeddings at
        positions 0..n-1; prefill rows that asked for their prompt's log-probabilities get them."""
        parts, ids, token_slots, last = [], [], [], []
        if prefill is not None:
            width = prefill.ids.shape[1]
            parts.append(prefill.step)
            ids.append(prefill.ids.view(-1))
            token_slots += [s.slot for s in prefill.seqs for _ in range(width)]
            last += [i * width + n - 1 for i, n in enumerate(prefill.lengths)]
        if batch:
            decode = self._decode_inputs(batch)
            parts.append(decode)
            ids.append(torch.tensor([s.last_token() for s in batch]))
            start = len(token_slots)
            token_slots += [s.slot for s in batch]
            last += range(start, start + len(batch))
        adapters = BatchContext(self.slots, token_slots)  # (N,) host
        # Everything the pass reads, built on the host and copied in one transfer.
        fields = ("positions", "block_table", "slots")
        host = [getattr(part, f) for part in parts for f in fields]
        moved = iter(to_device(self.model.device, *host, torch.cat(ids), torch.tensor(last)))
        parts = [dataclasses.replace(part, **{f: next(moved) for f in fields}) for part in parts]
        ids_d, last_d = moved  # (N,), (rows,)
        embeds = self.decoder.embed(ids_d.unsqueeze(0), adapters)[0]  # (N, hidden)
        if prefill is not None:
            self._soft_prompts(prefill, embeds)
        hidden = self.decoder.hidden(embeds, parts, adapters, self.cache)  # (N, hidden)
        if prefill is None:
            logits = self.decoder.logits(hidden, adapters)  # (B, vocab)
        else:  # the last real token of each prefill row, then every decode row
            logits = self.decoder.logits(hidden.index_select(0, last_d), adapters.rows(last))
        if prefill is not None:
            rows = hidden[: prefill.ids.numel()].view(*prefill.ids.shape, -1)  # (B, T, hidden)
            for i, (seq, start) in enumerate(zip(prefill.seqs, prefill.starts, strict=True)):
                if seq.wants_prompt_logprobs:
                    self._score_prompt(seq, rows[i], start)
        return logits

    def _soft_prompts(self, prefill: Prefill, embeds: torch.Tensor) -> None:
        """Put each prompt-tuning row's virtual tokens' embeddings (from its start on) into `embeds`
        (N, hidden), whose first rows are the chunk's (B * T) tokens."""
        width = prefill.ids.shape[1]
        for i, (seq, start) in enumerate(zip(prefill.seqs, prefill.starts, strict=True)):
            prompt = self.slots.slot_data(seq.slot, Hook.INPUT_EMBEDDINGS)  # (n, hidden) or None
            if prompt is not None and start < seq.virtual_tokens:
                embeds[i * width : i * width + seq.virtual_tokens - start] = prompt[start:]

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, start: int) -> None:
        """Send a sequence's prompt log-probabilities from its prefill's (T, hidden) states, from `start`."""
        first = seq.virtual_tokens  # the position of the prompt's first token
        if start > first:
            raise EngineInvariantError(
                f"request {seq.request_id} needs its prompt's logits but its prefill starts at {start}"
            )
        states = hidden[first - start : first - start + len(seq.prompt_ids)]  # (P, hidden)

        def head(
            h: torch.Tensor,
        ) -> torch.Tensor:  # (n, hidden) -> (n, vocab), the sequence's adapter on each
            return self.decoder.logits(h, BatchContext(self.slots, [seq.slot] * h.shape[0]))

        scored = prompt_logprobs(states, head, seq.prompt_ids, seq.params.prompt_logprobs)
        seq.handle.push(PromptLogprobs(scored))
        seq.prompt_scored = True

    def _slots_of(self, seq: Sequence, positions: range) -> torch.Tensor:
        """(n,) flat cache slots of these positions of a sequence."""
        size = self.cache.block_size
        return torch.tensor(
            [seq.blocks[p // size] * size + p % size for p in positions], device=self.model.device
        )

    def _block_table(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        """(B, width) block tables, padded with the null block (CPU, int64)."""
        table = torch.full((len(seqs), width), NULL_BLOCK, dtype=torch.long)
        for i, seq in enumerate(seqs):
            table[i, : len(seq.blocks)] = torch.tensor(seq.blocks[:width])
        return table

    def _seal(self, seq: Sequence, tokens: list[int]) -> None:
        """Register the sequence's newly full blocks in the prefix cache."""
        if not self.blocks.prefix_caching:
            return
        size = self.cache.block_size
        while len(seq.hashes) < seq.cached // size:
            index = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else root_hash(seq.identity)
            seq.hashes.append(chain_hash(parent, tokens[index * size : (index + 1) * size]))
            self.blocks.register(seq.blocks[index], seq.hashes[-1])

    def _grow(self) -> None:
        """Give every running sequence room for one more token, oldest first; when no block is left,
        preempt the newest running sequence (perhaps the one that asked)."""
        size, index = self.cache.block_size, 0
        while index < len(self._running):
            seq = self._running[index]
            if seq.cached < len(seq.blocks) * size:
                index += 1
                continue
            block = self.blocks.allocate()
            if block is not None:
                seq.blocks.append(block)
                index += 1
                continue
            self._preempt(self._running[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence out: its blocks go back and it waits at the front of the queue."""
        log.info("preempting request %d: the KV cache is full", seq.request_id)
        self._running.remove(seq)
        self.metrics.preempted()
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Put a sequence that holds no blocks back at the front of the queue, its adapter slot given back."""
        self._free_blocks(seq)
        seq.preemptions += 1
        if seq.slot >= 0:
            slot, seq.slot = seq.slot, -1
            self.tiers.release(slot)
        with self._lock:
            self._queued += 1
        self._waiting[seq.request_id] = seq
        self._waiting.move_to_end(seq.request_id, last=False)

    def _free_blocks(self, seq: Sequence) -> None:
        blocks, seq.blocks, seq.hashes, seq.cached = seq.blocks, [], [], 0
        self.blocks.release(blocks)

    def _decode_inputs(self, batch: list[Sequence]) -> StepInputs:
        """The running batch's next token (on the host): one row each, at the position after its last one."""
        size = self.cache.block_size
        positions = torch.tensor([[s.cached] for s in batch])  # (B, 1)
        table = self._block_table(batch, max(len(s.blocks) for s in batch))
        where = table.gather(1, positions // size) * size + positions % size
        return StepInputs(positions, table, where, span=max(s.cached for s in batch) + 1)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Sample one token for each of these running sequences (rows of `logits`); those that end leave.
        Only the rows that asked for log-probabilities pay for them, computed from the raw logits:
        logit_bias and grammar masks shape the choice, not the reported distribution."""
        controlled = apply_controls(logits, [s.control for s in seqs])
        tokens = sample(controlled, [s.params for s in seqs], [s.generator for s in seqs])
        scored = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and s.params.max_tokens]
        logprobs: dict[int, TokenLogprob] = {}
        if scored:
            rows = logits.index_select(0, torch.tensor(scored, device=logits.device))  # (R, vocab)
            values = token_logprobs(
                rows, [tokens[i] for i in scored], [seqs[i].params.logprobs for i in scored]
            )
            logprobs = dict(zip(scored, values, strict=True))
        done: list[Sequence] = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.params.max_tokens == 0:  # scoring the prompt only
                reason: FinishReason | None = "length"
            else:
                reason = self._append(seq, token, logprobs.get(i))
            if reason is not None:
                error = "no token satisfies the request's grammar here" if reason == "error" else None
                self._finish(seq, reason, error=error)
                done.append(seq)
        self._leave(done)
        return [s.request_id for s in done]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> FinishReason | None:
        """Record one generated token (and its log-probability, if asked); the reason the sequence ends."""
        now = time.monotonic()
        if seq.output_ids:
            self.metrics.itl.observe(now - seq.last_token_at)
        else:
            self.metrics.ttft.observe(now - seq.arrival)
        seq.last_token_at = now
        seq.output_ids.append(token)
        self.metrics.generation_tokens.inc()
        if seq.control is not None and not seq.control.accept(token):
            return "error"  # the grammar left no token to pick (it cannot be matched in this vocabulary)
        ended = seq.control is not None and seq.control.ended
        scored = () if logprob is None else (logprob,)
        if token in self.model.eos_token_ids and (ended or not seq.params.ignore_eos):
            if scored:
                seq.handle.push(Delta("", (), scored))
            return "stop"
        text = seq.detok.add(token)
        if text or not seq.detok.stopped:
            seq.handle.push(Delta(text, (token,), scored))
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

    def _leave(self, seqs: list[Sequence]) -> None:
        """Finished sequences leave the running batch and give their blocks back."""
        gone = {id(s) for s in seqs}
        if len(gone) != len(seqs) or any(not s.done for s in seqs):
            raise EngineInvariantError(
                f"releasing requests {[s.request_id for s in seqs]} that are not all done"
            )
        for seq in seqs:
            self._free_blocks(seq)
        self._running = [s for s in self._running if id(s) not in gone]


def to_device(device: torch.device, *host: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """int64 host tensors on `device` in one transfer instead of one per tensor; on the CPU, as they are."""
    if device.type == "cpu":
        return host
    flat = torch.cat([t.reshape(-1) for t in host]).to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in host])
    return tuple(part.view(t.shape) for part, t in zip(parts, host, strict=True))
