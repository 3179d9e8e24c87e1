"""Scheduling policy: who joins the batch this step, and which adapters to load where.

Pure policy over plain data, no torch: the engine describes its state, this returns a plan,
and the plan is checked before it is handed back; a broken plan raises PlanError naming the
requests it concerns, so the engine can end those alone.

The policy:
- First come, first served without head-of-line blocking: requests are taken in queue order;
  one whose adapter is not in a slot yet waits while it loads, and those behind it that can run
  do. Requests for an adapter that is loading all join together once it is ready.
- Adapters are loaded ahead of need (even while the batch is full), in queue order, into a free
  slot, else into the least recently used slot that no running sequence uses and no waiting
  request wants. So an adapter loaded for a waiting request stays until that request runs (no
  thrash), and an adapter evicted by a plan is never loaded again by the same plan.
- Memory: a request joins only if the KV cache blocks it needs (its prompt, less the blocks it
  shares through the prefix cache) are available after those admitted before it; if not, it and
  those behind it wait, so a long prompt is not overtaken for ever by short ones.
- One prefill per shared prefix: of the requests that would compute the same uncached prefix
  (`Waiting.prefix`), only the first joins in a step; the others join a step later and find
  that prefix in the cache instead of computing it again beside it (as SGLang's in-batch
  prefix check does).
- Aging: a request that has waited `Limits.aging` seconds or more may take a slot that younger
  requests still want. Of the slots no older request wants, the one with the fewest running
  sequences (then the lowest index, so the choice is stable from step to step) takes no new
  sequences and is evicted for it once they finish. So no request waits beyond a bound, however
  unpopular its adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    """A request waiting for a batch row."""

    request_id: int
    adapter: str | None
    prompt_tokens: int
    """Tokens its prefill computes (those found in the prefix cache excluded)."""
    waited: float = 0.0
    """Seconds since it arrived."""
    blocks: int = 0
    """KV cache blocks it takes from the available ones when it joins."""
    prefix: bytes | None = None
    """Names the uncached prefix its prefill would compute and cache, if that is long enough to share."""


@dataclass(frozen=True)
class Slot:
    """One device adapter slot as the engine sees it."""

    adapter: str | None = None
    """The adapter it holds or is loading; None when free."""

    ready: bool = False
    """True once the weights are in place."""

    users: int = 0
    """Running sequences that use it."""

    last_used: int = 0
    """Step at which a sequence last used it, for LRU eviction."""


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_prefill_tokens: int
    aging: float = math.inf
    """Seconds of waiting after which a request may take a slot that younger requests want."""


@dataclass
class Plan:
    admit: list[int] = field(default_factory=list)
    """Request ids to prefill this step, in queue order."""

    load: list[tuple[int, str]] = field(default_factory=list)
    """(slot, adapter) loads to start; whatever the slot held is evicted."""

    drain: list[int] = field(default_factory=list)
    """Slots that take no new sequences: each is evicted for an aged request once its sequences finish."""

    @property
    def acts(self) -> bool:
        """True if carrying it out changes the engine's state."""
        return bool(self.admit or self.load)


class PlanError(RuntimeError):
    """A plan broke an invariant; `request_ids` are the waiting requests it concerns."""

    def __init__(self, message: str, request_ids: Iterable[int]) -> None:
        self.request_ids = sorted(set(request_ids))
        super().__init__(f"{message} (requests {self.request_ids})")


def schedule(
    waiting: Sequence[Waiting],
    running: int,
    slots: Sequence[Slot],
    limits: Limits,
    free_blocks: float = math.inf,
) -> Plan:
    """Plan one step. `waiting` is in queue (arrival) order; `running` counts sequences decoding;
    `free_blocks` is what the KV cache can give now."""
    plan = Plan()
    held = {s.adapter: i for i, s in enumerate(slots) if s.adapter is not None}
    ready = {s.adapter for s in slots if s.ready}
    wanted = {w.adapter for w in waiting}
    spare = [i for i, s in enumerate(slots) if s.adapter is None and s.users == 0]
    spare += sorted(
        (i for i, s in enumerate(slots) if s.ready and s.users == 0 and s.adapter not in wanted),
        key=lambda i: (slots[i].last_used, i),
    )
    evicted: set[str] = set()  # by this plan: requests for them wait for a later reload
    closed: set[str] = set()  # draining for an aged request: no new sequences
    draining_for: set[str] = set()  # aged requests' adapters that wait for a draining slot
    claimed: set[int] = set()  # slots this plan loads into or drains
    older: set[str | None] = set()  # adapters of the requests ahead in the queue
    free_rows = limits.max_batch_size - running
    budget = limits.max_prefill_tokens
    budget_closed = False
    blocks_left = free_blocks
    computing: set[bytes] = set()  # uncached prefixes that requests admitted by this plan compute
    for request in waiting:
        name = request.adapter
        if name is not None and name not in held and name not in evicted and name not in draining_for:
            target = next((i for i in spare if i not in claimed), None)
            if target is None and request.waited >= limits.aging:
                victim = _victim(slots, claimed, older)
                if victim is not None and slots[victim].users == 0:
                    target = victim
                elif victim is not None:
                    claimed.add(victim)
                    closed.add(slots[victim].adapter)  # type: ignore[arg-type]
                    draining_for.add(name)
                    plan.drain.append(victim)
            if target is not None:
                gone = slots[target].adapter
                if gone is not None:
                    evicted.add(gone)
                    ready.discard(gone)
                plan.load.append((target, name))
                held[name] = target
                claimed.add(target)
        older.add(name)
        if name is not None and (name not in ready or name in closed):
            continue
        if budget_closed or free_rows == 0 or request.prefix in computing:
            continue
        if (plan.admit and request.prompt_tokens > budget) or request.blocks > blocks_left:
            # Keep queue order for prompt budget and memory: later, smaller requests do not overtake this one.
            budget_closed = True
            continue
        plan.admit.append(request.request_id)
        if request.prefix is not None:
            computing.add(request.prefix)
        budget -= request.prompt_tokens
        blocks_left -= request.blocks
        free_rows -= 1
    check(plan, waiting, running, slots, limits, free_blocks)
    return plan


def _victim(slots: Sequence[Slot], claimed: set[int], older: set[str | None]) -> int | None:
    """The slot an aged request takes: ready, wanted by no older request, fewest running sequences."""
    candidates = [i for i, s in enumerate(slots) if s.ready and i not in claimed and s.adapter not in older]
    return min(candidates, key=lambda i: (slots[i].users, i), default=None)


def check(
    plan: Plan,
    waiting: Sequence[Waiting],
    running: int,
    slots: Sequence[Slot],
    limits: Limits,
    free_blocks: float = math.inf,
) -> None:
    """Raise PlanError if the plan would corrupt data: a row, a slot, or an adapter's weights."""
    by_id = {w.request_id: w for w in waiting}
    stray = [i for i in plan.admit if i not in by_id]
    if stray:
        raise PlanError("admitted a request that is not waiting", stray)
    if len(set(plan.admit)) != len(plan.admit):
        raise PlanError("a request admitted twice", [i for i in plan.admit if plan.admit.count(i) > 1])
    if len(plan.admit) > limits.max_batch_size - running:
        raise PlanError("admitted more rows than are free", plan.admit)
    admitted = [by_id[i] for i in plan.admit]
    if len(admitted) > 1 and sum(w.prompt_tokens for w in admitted) > limits.max_prefill_tokens:
        raise PlanError("prefill budget exceeded", plan.admit)
    if sum(w.blocks for w in admitted) > free_blocks:
        raise PlanError("admitted more KV cache blocks than are free", plan.admit)

    def waiting_for(name: str | None) -> list[int]:
        return [w.request_id for w in waiting if w.adapter == name]

    held = {s.adapter for s in slots if s.adapter is not None}
    targets: set[int] = set()
    loaded: set[str] = set()
    for slot, name in plan.load:
        if not 0 <= slot < len(slots):
            raise PlanError(f"load of {name} into slot {slot}, which does not exist", waiting_for(name))
        if slot in targets:
            raise PlanError(f"two loads into slot {slot}", waiting_for(name))
        if name in held or name in loaded:
            raise PlanError(f"{name} loaded twice", waiting_for(name))
        if not waiting_for(name):
            raise PlanError(f"{name} loaded for no waiting request", [])
        old = slots[slot]
        if old.users > 0:
            raise PlanError(f"evicting {old.adapter} from slot {slot} while in use", waiting_for(name))
        if old.adapter is not None and not old.ready:
            raise PlanError(f"evicting {old.adapter} from slot {slot} while it loads", waiting_for(name))
        targets.add(slot)
        loaded.add(name)
    evicted = {slots[slot].adapter for slot, _ in plan.load} - {None}
    resident = {s.adapter for s in slots if s.ready} - evicted
    for request in admitted:
        if request.adapter is not None and request.adapter not in resident:
            raise PlanError(f"admitted before {request.adapter} is ready in a slot", [request.request_id])
