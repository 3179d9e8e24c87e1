"""Scheduling policy: who joins the batch this step, and which adapters to load where.

Pure policy over plain data, no torch: the engine describes its state, this returns a plan,
and the plan's invariants are asserted before it is handed back.

The policy is first come, first served, without head-of-line blocking: a request whose
adapter is not in a device slot yet waits while it loads, and the requests behind it that
can run do. Adapters are loaded ahead of need (even while the batch is full), into a free
slot or else the least recently used slot that no running sequence and no earlier waiting
request needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    """A request waiting for a batch row."""

    request_id: int
    adapter: str | None
    prompt_tokens: int


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


@dataclass
class Plan:
    admit: list[int] = field(default_factory=list)
    """Request ids to prefill this step, in queue order."""

    load: list[tuple[int, str]] = field(default_factory=list)
    """(slot, adapter) loads to start; whatever the slot held is evicted."""


def schedule(waiting: Sequence[Waiting], running: int, slots: Sequence[Slot], limits: Limits) -> Plan:
    """Plan one step. `running` counts sequences already decoding."""
    plan = Plan()
    slot_of = {s.adapter: i for i, s in enumerate(slots) if s.adapter is not None}
    ready = {s.adapter for s in slots if s.ready}
    free_rows = limits.max_batch_size - running
    budget = limits.max_prefill_tokens
    # Slots that must survive this step: in use, or wanted by a request ahead in the queue.
    protected = {i for i, s in enumerate(slots) if s.users > 0}
    budget_closed = False
    for request in waiting:
        name = request.adapter
        if name is not None and name in slot_of:
            protected.add(slot_of[name])
        if name is not None and name not in slot_of:
            target = _slot_for_load(slots, protected, plan)
            if target is not None:
                evicted = slots[target].adapter
                if evicted is not None:  # gone after this step: later requests for it must wait for a reload
                    del slot_of[evicted]
                    ready.discard(evicted)
                plan.load.append((target, name))
                slot_of[name] = target
                protected.add(target)
            continue
        if (name is not None and name not in ready) or budget_closed or free_rows == 0:
            continue
        if plan.admit and request.prompt_tokens > budget:
            # Keep queue order for prompt budget: later, shorter prompts do not overtake this one.
            budget_closed = True
            continue
        plan.admit.append(request.request_id)
        budget -= request.prompt_tokens
        free_rows -= 1
    _check(plan, waiting, running, slots, limits)
    return plan


def _slot_for_load(slots: Sequence[Slot], protected: set[int], plan: Plan) -> int | None:
    taken = {slot for slot, _ in plan.load}
    candidates = [i for i, s in enumerate(slots) if i not in protected and i not in taken]
    free = [i for i in candidates if slots[i].adapter is None]
    if free:
        return free[0]
    evictable = [i for i in candidates if slots[i].ready]
    return min(evictable, key=lambda i: slots[i].last_used) if evictable else None


def _check(
    plan: Plan, waiting: Sequence[Waiting], running: int, slots: Sequence[Slot], limits: Limits
) -> None:
    by_id = {w.request_id: w for w in waiting}
    assert len(plan.admit) <= limits.max_batch_size - running, "admitted more rows than are free"
    assert len(set(plan.admit)) == len(plan.admit), "a request admitted twice"
    admitted = [by_id[i] for i in plan.admit]
    resident = {s.adapter for s in slots if s.ready}
    assert all(w.adapter is None or w.adapter in resident for w in admitted), (
        "admitted before its adapter is ready"
    )
    if len(admitted) > 1:
        assert sum(w.prompt_tokens for w in admitted) <= limits.max_prefill_tokens, "prefill budget exceeded"
    targets = [slot for slot, _ in plan.load]
    assert len(set(targets)) == len(targets), "two loads into one slot"
    held = {s.adapter for s in slots if s.adapter is not None}
    for slot, name in plan.load:
        assert name not in held, f"{name} loaded twice"
        assert slots[slot].users == 0, "evicting an adapter in use"
        assert slots[slot].adapter is None or slots[slot].ready, "evicting a slot that is still loading"
    needed = {w.adapter for w in admitted} - {None}
    assert not needed & {slots[slot].adapter for slot, _ in plan.load}, "evicting an adapter just admitted"
