"""The near-tie comparison that the 16-bit reference tests rest on (tests/helpers.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import compare_up_to_near_ties, margin_drift

STEPS = [(5, 3.0, 20.0), (7, 0.2, 20.0), (9, 2.5, 20.0), (None, 4.0, 20.0)]
"""(token, float32 top-2 margin, max |logit|): clear, a near tie for a drift of 0.5, clear, EOS."""


def test_float32_is_plain_equality():
    assert compare_up_to_near_ties([5, 7, 9], STEPS, "row") == 4
    with pytest.raises(AssertionError, match="step 1 served 8"):
        compare_up_to_near_ties([5, 8, 9], STEPS, "row")


def test_a_near_tie_taken_the_other_way_ends_the_comparison():
    assert compare_up_to_near_ties([5, 8, 1, 2], STEPS, "row", drift=0.5) == 1


def test_a_near_tie_taken_the_same_way_keeps_comparing():
    assert compare_up_to_near_ties([5, 7, 9], STEPS, "row", drift=0.5) == 3  # the tie is not counted
    with pytest.raises(AssertionError, match="step 2 served 1"):
        compare_up_to_near_ties([5, 7, 1], STEPS, "row", drift=0.5)


def test_margin_drift_follows_margins_not_a_common_shift():
    exact = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0, -2.0]])
    assert margin_drift(exact, exact + 5.0) == 0.0
    moved = exact.clone()
    moved[0, 1] += 0.75  # the runner-up closes in: the top-2 margin moves by 0.75
    assert margin_drift(exact, moved) == pytest.approx(0.75)
    moved[0, 5] += 10.0  # outside the float32 top 5: not followed
    assert margin_drift(exact, moved) == pytest.approx(0.75)
    assert margin_drift(exact, torch.full_like(exact, math.nan)) == math.inf
