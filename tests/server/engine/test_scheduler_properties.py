"""The scheduler over thousands of random states: every plan keeps every invariant and the policy.

States are drawn as the engine can produce them: distinct adapters per slot, users only on ready
slots and never more than the running sequences, the queue in arrival order (oldest first).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.scheduler import Limits, Plan, Slot, Waiting, schedule

ADAPTERS = [f"a{i}" for i in range(10)]
MANY = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def states(draw) -> tuple[list[Waiting], int, list[Slot], Limits]:
    count = draw(st.integers(0, 6))
    names = draw(st.permutations(ADAPTERS))[:count]
    slots = []
    for name in names:
        held = draw(st.booleans())
        ready = held and draw(st.booleans())
        slots.append(
            Slot(
                name if held else None,
                ready,
                draw(st.integers(0, 3)) if ready else 0,
                draw(st.integers(0, 50)),
            )
        )
    users = sum(s.users for s in slots)
    limits = Limits(
        max_batch_size=draw(st.integers(max(1, users), max(8, users))),
        max_prefill_tokens=draw(st.integers(16, 200)),
        aging=draw(st.sampled_from([0.0, 2.0, 10.0, float("inf")])),
    )
    running = draw(st.integers(users, limits.max_batch_size))
    ages = sorted(draw(st.lists(st.floats(0, 20), max_size=24)), reverse=True)
    waiting = [
        Waiting(i, draw(st.sampled_from([None, *ADAPTERS])), draw(st.integers(1, 150)), age)
        for i, age in enumerate(ages)
    ]
    return waiting, running, slots, limits


def invariants(plan: Plan, waiting: list[Waiting], running: int, slots: list[Slot], limits: Limits) -> None:
    """Written apart from the scheduler's own check, so a bug in one is caught by the other."""
    by_id = {w.request_id: w for w in waiting}
    assert len(set(plan.admit)) == len(plan.admit) and set(plan.admit) <= set(by_id)
    assert plan.admit == sorted(plan.admit, key=[w.request_id for w in waiting].index)
    assert len(plan.admit) <= limits.max_batch_size - running
    admitted = [by_id[i] for i in plan.admit]
    assert len(admitted) <= 1 or sum(w.prompt_tokens for w in admitted) <= limits.max_prefill_tokens
    targets = [slot for slot, _ in plan.load]
    names = [name for _, name in plan.load]
    assert len(set(targets)) == len(targets), "two loads into one slot"
    assert len(set(names)) == len(names), "one adapter loaded twice"
    held = {s.adapter for s in slots}
    for slot, name in plan.load:
        assert name not in held, f"{name} is resident or loading, or evicted by this very plan"
        assert slots[slot].users == 0, "evicting an adapter in use"
        assert slots[slot].adapter is None or slots[slot].ready, "evicting an adapter still loading"
        assert any(w.adapter == name for w in waiting), "loading an adapter nobody waits for"
    evicted = {slots[slot].adapter for slot in targets} - {None}
    resident = {s.adapter for s in slots if s.ready} - evicted
    assert all(w.adapter is None or w.adapter in resident for w in admitted)
    assert not set(plan.drain) & set(targets)


def no_thrash(state) -> None:
    """An adapter a waiting request wants is evicted only for an aged request older than all of them."""
    waiting, _running, slots, limits = state
    plan = schedule(*state)
    order = [w.request_id for w in waiting]
    for slot, name in plan.load:
        gone = slots[slot].adapter
        wanting = [w for w in waiting if w.adapter == gone]
        if gone is None or not wanting:
            continue
        taker = next(w for w in waiting if w.adapter == name)
        assert taker.waited >= limits.aging
        assert all(order.index(taker.request_id) < order.index(w.request_id) for w in wanting)


def first_come_first_served(state) -> None:
    """A request is passed over by a later one only while its adapter is not ready or is draining."""
    waiting, _running, slots, _limits = state
    plan = schedule(*state)
    if not plan.admit:
        return
    last = [w.request_id for w in waiting].index(plan.admit[-1])
    evicted = {slots[slot].adapter for slot, _ in plan.load}
    resident = {s.adapter for s in slots if s.ready} - evicted
    draining = {slots[slot].adapter for slot in plan.drain}
    for w in waiting[:last]:
        if w.request_id not in plan.admit:
            assert w.adapter is not None and (w.adapter not in resident or w.adapter in draining)


def nothing_running_means_the_plan_acts_unless_only_loads_are_awaited(state) -> None:
    """No stall: with nothing running, a plan that does nothing leaves every request waiting for a load."""
    waiting, _, slots, limits = state
    slots = [Slot(s.adapter, s.ready, 0, s.last_used) for s in slots]
    plan = schedule(waiting, 0, slots, limits)
    if plan.acts or not waiting:
        return
    loading = {s.adapter for s in slots if s.adapter is not None and not s.ready}
    every_slot_loading = all(s.adapter is not None and not s.ready for s in slots)
    for w in waiting:
        assert w.adapter in loading or every_slot_loading, (w, slots, plan)


def the_oldest_request_is_served_once_aged(state) -> None:
    """Aged, the head of the queue gets a slot now or drains one for itself, unless every slot loads."""
    waiting, _running, slots, limits = state
    if not waiting or waiting[0].waited < limits.aging or waiting[0].adapter is None:
        return
    head = waiting[0]
    plan = schedule(*state)
    if head.adapter in {s.adapter for s in slots} or not slots:
        return
    if any(name == head.adapter for _, name in plan.load) or plan.drain:
        return
    assert all(s.adapter is not None and not s.ready for s in slots), (slots, plan)


def all_ready_requests_that_fit_join_together(state) -> None:
    waiting, running, slots, limits = state
    resident = {s.adapter for s in slots if s.ready}
    fits = len(waiting) <= limits.max_batch_size - running and (
        len(waiting) <= 1 or sum(w.prompt_tokens for w in waiting) <= limits.max_prefill_tokens
    )
    if not fits or not all(w.adapter is None or w.adapter in resident for w in waiting):
        return
    plan = schedule(*state)
    assert plan.admit == [w.request_id for w in waiting]


@MANY
@given(states())
def test_every_plan_keeps_every_invariant_and_the_policy(state):
    invariants(schedule(*state), *state)
    no_thrash(state)
    first_come_first_served(state)
    nothing_running_means_the_plan_acts_unless_only_loads_are_awaited(state)
    the_oldest_request_is_served_once_aged(state)
    all_ready_requests_that_fit_join_together(state)
