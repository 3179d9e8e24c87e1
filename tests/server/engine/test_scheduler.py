"""The scheduling policy, on plain data."""

from __future__ import annotations

import pytest

from server.engine.scheduler import Limits, Plan, PlanError, Slot, Waiting, check, schedule

LIMITS = Limits(max_batch_size=4, max_prefill_tokens=100)


def waiting(*specs: tuple[str | None, int]) -> list[Waiting]:
    return [Waiting(i, adapter, tokens) for i, (adapter, tokens) in enumerate(specs)]


def test_admits_in_order_up_to_free_rows():
    plan = schedule(waiting(*[(None, 10)] * 6), running=1, slots=[], limits=LIMITS)
    assert plan.admit == [0, 1, 2]
    assert plan.load == []


def test_prefill_budget_keeps_queue_order():
    plan = schedule(waiting((None, 60), (None, 50), (None, 10)), running=0, slots=[], limits=LIMITS)
    # The 50-token prompt does not fit after the 60-token one; the short one may not overtake it.
    assert plan.admit == [0]


def test_a_prompt_larger_than_the_budget_still_runs_alone():
    plan = schedule(waiting((None, 500), (None, 5)), running=0, slots=[], limits=LIMITS)
    assert plan.admit == [0]


def test_waiting_adapter_is_loaded_and_others_go_ahead():
    slots = [Slot(), Slot()]
    plan = schedule(waiting(("a", 10), (None, 10)), running=0, slots=slots, limits=LIMITS)
    assert plan.admit == [1]
    assert plan.load == [(0, "a")]


def test_loading_adapter_is_not_loaded_twice_and_waits():
    slots = [Slot("a", ready=False), Slot()]
    plan = schedule(waiting(("a", 10), ("a", 10)), running=0, slots=slots, limits=LIMITS)
    assert plan.admit == []
    assert plan.load == []


def test_ready_adapter_admits():
    slots = [Slot("a", ready=True), Slot()]
    plan = schedule(waiting(("a", 10), ("b", 10), ("a", 5)), running=0, slots=slots, limits=LIMITS)
    assert plan.admit == [0, 2]
    assert plan.load == [(1, "b")]


def test_evicts_least_recently_used_idle_adapter_only():
    slots = [
        Slot("busy", True, users=2, last_used=1),
        Slot("old", True, last_used=3),
        Slot("new", True, last_used=9),
    ]
    plan = schedule(waiting(("x", 10)), running=2, slots=slots, limits=LIMITS)
    assert plan.load == [(1, "x")]


def test_never_evicts_an_adapter_wanted_earlier_in_the_queue():
    slots = [Slot("a", True, last_used=1), Slot("b", True, last_used=2)]
    # Batch full: nothing is admitted, but "a" is wanted by the head of the queue and must stay.
    plan = schedule(waiting(("a", 10), ("x", 10)), running=4, slots=slots, limits=LIMITS)
    assert plan.admit == []
    assert plan.load == [(1, "x")]


def test_an_adapter_wanted_later_in_the_queue_stays_and_its_request_runs():
    # "old" is resident and idle, but request 1 wants it: "x" waits rather than evict it (no thrash).
    slots = [Slot("old", True, last_used=1)]
    plan = schedule(waiting(("x", 10), ("old", 10)), running=0, slots=slots, limits=LIMITS)
    assert plan.load == []
    assert plan.admit == [1]


def test_no_slot_available_means_waiting():
    slots = [Slot("a", True, users=1), Slot("b", False)]
    plan = schedule(waiting(("x", 10)), running=1, slots=slots, limits=LIMITS)
    assert plan.load == [] and plan.admit == []


def test_prefetches_while_the_batch_is_full():
    plan = schedule(waiting(("a", 10)), running=4, slots=[Slot()], limits=LIMITS)
    assert plan.admit == []
    assert plan.load == [(0, "a")]


def test_a_slot_in_use_is_never_loaded_over():
    plan = schedule(waiting(("a", 10)), running=0, slots=[Slot(None, users=1)], limits=LIMITS)
    assert plan.load == []


@pytest.mark.parametrize(
    "plan, slots",
    [
        (Plan(admit=[0]), [Slot("a", ready=False)]),  # admitted before its adapter is ready
        (Plan(load=[(0, "a")]), [Slot("b", True, users=1)]),  # evicts an adapter in use
        (Plan(load=[(0, "a"), (1, "a")]), [Slot(), Slot()]),  # one adapter loaded twice
        (Plan(load=[(1, "a")]), [Slot("a", True), Slot()]),  # a second load of a resident adapter
        (Plan(load=[(0, "a")]), [Slot("b", False)]),  # evicts a slot that is still loading
    ],
)
def test_broken_plans_fail_their_invariants(plan, slots):
    with pytest.raises(PlanError) as broken:
        check(plan, waiting(("a", 10)), 0, slots, LIMITS)
    assert broken.value.request_ids == [0]  # the request it concerns, not the whole batch


@pytest.mark.parametrize("running", [0, 3, 4])
def test_never_admits_more_than_free_rows(running):
    plan = schedule(waiting(*[(None, 1)] * 10), running=running, slots=[], limits=LIMITS)
    assert len(plan.admit) == LIMITS.max_batch_size - running


def test_an_adapter_evicted_for_one_request_is_not_loaded_again_for_a_later_one():
    # Issue 17: "x" evicted "old", then the request for "old" evicted "other" to load "old" again.
    slots = [Slot("old", True, last_used=1), Slot("other", True, last_used=2)]
    plan = schedule(waiting(("x", 10), ("old", 10)), running=0, slots=slots, limits=LIMITS)
    assert plan.load == [(1, "x")]
    assert plan.admit == [1]


def test_an_adapter_a_waiting_request_wants_is_not_evicted():
    # "a" was loaded for request 0, which waits for a row: "x" must wait for a slot instead of taking it.
    slots = [Slot("a", True, last_used=1)]
    plan = schedule(waiting(("a", 10), ("x", 10)), running=4, slots=slots, limits=LIMITS)
    assert plan.load == [] and plan.admit == []


def test_requests_for_a_loading_adapter_join_together_once_it_is_ready():
    assert schedule(waiting(("a", 5), (None, 5), ("a", 5)), 0, [Slot("a")], LIMITS).admit == [1]
    assert schedule(waiting(("a", 5), (None, 5), ("a", 5)), 0, [Slot("a", True)], LIMITS).admit == [0, 1, 2]


def test_an_aged_request_drains_the_slot_with_fewest_users_then_takes_it():
    aged = Limits(8, 100, aging=5.0)
    slots = [Slot("p", True, users=3), Slot("q", True, users=1)]
    queue = [Waiting(0, "rare", 10, waited=6.0), Waiting(1, "q", 10, waited=1.0), Waiting(2, "p", 10)]
    plan = schedule(queue, running=4, slots=slots, limits=aged)
    # "q" takes no new sequences (request 1 waits) while its last one finishes; "p" goes on.
    assert plan.drain == [1] and plan.load == [] and plan.admit == [2]
    idle = [Slot("p", True, users=3), Slot("q", True, users=0)]
    plan = schedule(queue, running=3, slots=idle, limits=aged)
    assert plan.load == [(1, "rare")] and plan.admit == [2]


def test_a_young_request_does_not_take_a_wanted_slot():
    slots = [Slot("q", True, users=0)]
    queue = [Waiting(0, "rare", 10, waited=1.0), Waiting(1, "q", 10)]
    plan = schedule(queue, running=4, slots=slots, limits=Limits(4, 100, aging=5.0))
    assert plan.load == [] and plan.drain == []


def with_blocks(*specs: tuple[int, int]) -> list[Waiting]:
    """(prompt tokens, blocks) of base-model requests, in queue order."""
    return [Waiting(i, None, tokens, blocks=blocks) for i, (tokens, blocks) in enumerate(specs)]


def test_admits_only_what_the_free_blocks_hold_in_queue_order():
    plan = schedule(with_blocks((10, 3), (10, 4), (10, 1)), running=0, slots=[], limits=LIMITS, free_blocks=7)
    assert plan.admit == [0, 1]
    plan = schedule(with_blocks((10, 3), (10, 5), (10, 1)), running=0, slots=[], limits=LIMITS, free_blocks=7)
    assert plan.admit == [0]  # the one that fits behind the one that does not waits its turn


def test_a_request_that_needs_more_blocks_than_are_free_waits_even_first():
    plan = schedule(with_blocks((10, 8)), running=2, slots=[], limits=LIMITS, free_blocks=7)
    assert plan.admit == []


def test_a_plan_over_the_free_blocks_is_refused():
    with pytest.raises(PlanError, match="blocks"):
        check(Plan(admit=[0, 1]), with_blocks((10, 4), (10, 4)), 0, [], LIMITS, free_blocks=7)


def test_requests_that_would_compute_the_same_prefix_join_one_per_step():
    shared, other = b"system prompt", b"another prompt"
    queue = [
        Waiting(0, None, 10, prefix=shared),
        Waiting(1, None, 10, prefix=shared),
        Waiting(2, None, 10, prefix=other),
        Waiting(3, None, 10),
    ]
    plan = schedule(queue, running=0, slots=[], limits=Limits(max_batch_size=8, max_prefill_tokens=100))
    assert plan.admit == [0, 2, 3]  # 1 waits a step, then finds 0's blocks cached
    plan = schedule(queue[1:], running=3, slots=[], limits=Limits(max_batch_size=8, max_prefill_tokens=100))
    assert plan.admit == [1, 2, 3]
