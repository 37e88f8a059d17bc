"""The benchmark's measure of a balancer's hand-off: slot-seconds during which a request was held while a slot
was free (bench.routing.simulator.held_while_free)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.routing.simulator import held_while_free

SLOTS = {"a": 1, "b": 2}


def test_nothing_held_costs_nothing() -> None:
    assert held_while_free([], [(1.0, "a", 0)], SLOTS) == 0.0


def test_a_request_held_while_a_slot_is_free_costs_its_whole_hold() -> None:
    assert held_while_free([(1.0, 1.5)], [], SLOTS) == pytest.approx(0.5)


def test_a_hold_counts_only_while_some_slot_is_free() -> None:
    # Every slot is taken from 0 to 2; a's frees at 2: the hold from 1 to 3 costs 1 s, not 2.
    free = [(0.0, "a", 0), (0.0, "b", 0), (2.0, "a", 1)]
    assert held_while_free([(1.0, 3.0)], free, SLOTS) == pytest.approx(1.0)


def test_several_held_count_up_to_the_free_slots() -> None:
    # Three held for 1 s while b's two slots are free (a is full): 2 slot-seconds, the third had no slot to take.
    free = [(0.0, "a", 0)]
    assert held_while_free([(1.0, 2.0)] * 3, free, SLOTS) == pytest.approx(2.0)


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), max_size=20),
       st.lists(st.tuples(st.floats(0, 10), st.sampled_from(["a", "b"]), st.integers(0, 2)), max_size=20))
def test_never_more_than_the_holds_themselves(held: list[tuple[float, float]],
                                              free: list[tuple[float, str, int]]) -> None:
    total = held_while_free(held, free, SLOTS)
    assert 0.0 <= total <= sum(max(0.0, end - start) for start, end in held) + 1e-9
