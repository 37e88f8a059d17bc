"""The picker's prompt-cache affinity: a conversation goes back to the backend that took it while that backend
has a slot free, else wherever the picker would send it; the memory is bounded. And its speed-aware choice:
among backends with a slot free, a faster speed class first.

The fleet of tests/unit/test_picker.py: small (2 slots) and large (4 slots). Without affinity the picker sends
a request to large (most free slots), so a conversation remembered on small shows affinity at work."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from agentcheck import picker as picker_module
from agentcheck.model import FleetModel
from agentcheck.picker import Affinity, Lease, Picker
from tests.unit.test_picker import Clock, make, make_asking, poll, ready


def turn(number: int) -> Affinity:
    """Turn ``number`` of one conversation: remembered under its own key, looking up the previous turn's."""
    return Affinity(remember=(f"{number:016x}",), lookups=(f"{number - 1:016x}",))


async def placed_on_small(model: FleetModel, picker: Picker, clock: Clock, affinity: Affinity) -> None:
    """Run one request of a conversation on small (large busy with other work meanwhile), then free all."""
    poll(model, clock, large=ready(4, 4))
    lease = await picker.acquire(affinity=affinity)
    assert lease.backend == "small"
    picker.release(lease.id)
    poll(model, clock, small=ready(2), large=ready(4))


async def test_a_follow_up_goes_to_the_backend_that_took_its_previous_turn() -> None:
    model, picker, clock = make()
    await placed_on_small(model, picker, clock, turn(1))
    assert (await picker.acquire(affinity=turn(2))).backend == "small"
    assert (await picker.acquire(affinity=turn(9))).backend == "large"  # a conversation nobody has seen


async def test_the_affine_backend_is_skipped_while_it_has_no_free_slot() -> None:
    model, picker, clock = make()
    await placed_on_small(model, picker, clock, turn(1))
    held = [await picker.acquire(affinity=turn(2)) for _ in range(2)]
    assert [lease.backend for lease in held] == ["small", "small"]
    assert (await picker.acquire(affinity=turn(2))).backend == "large"  # small is full: no wait for it
    picker.release(held[0].id)
    # The conversation's turn 2 was last taken by large: turn 3 follows it there, not back to small.
    assert (await picker.acquire(affinity=turn(3))).backend == "large"


async def test_a_waiting_conversation_takes_the_first_slot_that_frees_on_its_backend() -> None:
    model, picker, clock = make(max_waiting=5)
    await placed_on_small(model, picker, clock, turn(1))
    held = [await picker.acquire() for _ in range(6)]  # every slot of small and large
    waiting = asyncio.ensure_future(picker.acquire(affinity=turn(2)))
    await asyncio.sleep(0)
    assert picker.waiting == 1
    picker.release(next(lease for lease in held if lease.backend == "small").id)
    granted = await waiting
    assert granted.backend == "small"
    for lease in (*held, granted):
        picker.release(lease.id)
    assert (await picker.acquire(affinity=turn(3))).backend == "small"  # the queued grant was remembered


async def small_full_of_its_conversation(affinity_wait: float) -> tuple[Picker, Clock, list[Lease]]:
    """Turn 1 ran on small; turn 2 twice fills small's two slots; large has four free."""
    model, picker, clock = make(affinity_wait=affinity_wait)
    await placed_on_small(model, picker, clock, turn(1))
    held = [await picker.acquire(affinity=turn(2)) for _ in range(2)]
    assert [lease.backend for lease in held] == ["small", "small"]
    return picker, clock, held


async def test_with_affinity_wait_a_turn_waits_for_its_backend_and_lets_others_pass() -> None:
    picker, _, held = await small_full_of_its_conversation(affinity_wait=1.0)
    waiting = asyncio.ensure_future(picker.acquire(affinity=turn(2)))
    await asyncio.sleep(0)
    assert not waiting.done() and picker.waiting == 1  # large has four slots free, but its history is on small
    assert (await picker.acquire()).backend == "large"  # another request does not wait behind it
    assert (await picker.acquire(affinity=turn(9))).backend == "large"  # nor does a conversation new to all
    picker.release(held[0].id)
    assert (await waiting).backend == "small"


async def test_a_turn_held_for_its_backend_goes_elsewhere_once_affinity_wait_has_run_out() -> None:
    picker, clock, _ = await small_full_of_its_conversation(affinity_wait=1.0)
    waiting = asyncio.ensure_future(picker.acquire(affinity=turn(2)))
    await asyncio.sleep(0)
    clock.now += 0.99
    picker.wake()
    assert not waiting.done()
    clock.now += 0.02
    picker.wake()  # what the timer set when it was first held does, a second later by the event loop's clock
    assert (await waiting).backend == "large"


async def test_affinity_wait_runs_only_while_another_backend_has_a_slot_free() -> None:
    picker, clock, held = await small_full_of_its_conversation(affinity_wait=1.0)
    others = [await picker.acquire() for _ in range(4)]
    assert {lease.backend for lease in others} == {"large"}
    waiting = asyncio.ensure_future(picker.acquire(affinity=turn(2)))
    await asyncio.sleep(0)
    clock.now += 2.0  # every slot busy meanwhile: an ordinary wait in the queue
    picker.release(others[0].id)
    assert not waiting.done()  # large has a slot now: from here it waits at most affinity_wait for small
    picker.release(held[0].id)
    assert (await waiting).backend == "small"


async def test_a_held_turn_stops_waiting_for_its_backend_before_its_buffered_request_timeout() -> None:
    picker, clock, _ = await small_full_of_its_conversation(affinity_wait=1.0)  # timeout 5 s
    others = [await picker.acquire() for _ in range(4)]
    waiting = asyncio.ensure_future(picker.acquire(affinity=turn(2)))
    await asyncio.sleep(0)
    clock.now += 4.5
    picker.release(others[0].id)
    assert not waiting.done()  # held, but only until 0.05 s before its 5 s are up, not for a whole second
    clock.now += 0.46
    picker.wake()
    assert (await waiting).backend == "large"


async def test_without_affinity_wait_a_full_backend_is_never_waited_for() -> None:
    picker, _, _ = await small_full_of_its_conversation(affinity_wait=0.0)
    assert (await picker.acquire(affinity=turn(2))).backend == "large"


async def test_the_memory_keeps_the_most_recent_conversations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(picker_module, "AFFINITY_ENTRIES", 3)
    model, picker, clock = make()
    for number in range(1, 6):
        await placed_on_small(model, picker, clock, Affinity((f"{number:016x}",), ("ffffffffffffffff",)))
    assert (await picker.acquire(affinity=Affinity(("aaaaaaaaaaaaaaaa",), (f"{1:016x}",)))).backend == "large"
    assert (await picker.acquire(affinity=Affinity(("bbbbbbbbbbbbbbbb",), (f"{5:016x}",)))).backend == "small"


async def test_among_backends_with_a_free_slot_the_faster_speed_class_comes_first() -> None:
    model, picker, clock = make()
    poll(model, clock, small=replace(ready(2), seconds_per_token=0.010),
         large=replace(ready(4), seconds_per_token=0.030))
    picks = [(await picker.acquire()).backend for _ in range(4)]
    assert picks == ["small", "small", "large", "large"]  # small is 3x faster: its 2 slots first, then large's

    model, picker, clock = make()
    poll(model, clock, small=replace(ready(2), seconds_per_token=0.011),
         large=replace(ready(4), seconds_per_token=0.012))  # within a quarter: equally fast, most free first
    assert (await picker.acquire()).backend == "large"


async def small_full_with_an_ended_turn(model: FleetModel, picker: Picker, clock: Clock) -> None:
    """Turn 2 of the conversation runs on small beside a request from outside the balancer. A poll right after
    turn 2 was placed counts both; busy() cannot know it counted turn 2 (the poll shows load beyond ours, so it
    may have missed turn 2 and counted two from outside). Then turn 2 ends: small has a slot free, but busy()
    still counts it."""
    await placed_on_small(model, picker, clock, turn(1))
    poll(model, clock, small=ready(2, 1), large=ready(4, 4))
    turn_two = await picker.acquire(affinity=turn(2))
    assert turn_two.backend == "small"
    poll(model, clock, in_transit=True, small=ready(2, 2), large=ready(4))
    picker.release(turn_two.id)
    assert picker.free_slots()["small"] == 0


async def test_a_request_that_ended_right_after_a_poll_that_may_count_it_asks_for_a_poll() -> None:
    model, picker, clock, asked = make_asking()
    await small_full_with_an_ended_turn(model, picker, clock)
    assert asked == [("small", 0.0)]
    lease = await picker.acquire()  # placed well after large's poll: its release is not in doubt
    poll(model, clock, small=ready(2, 1), large=ready(4, 1))
    picker.release(lease.id)
    assert asked == [("small", 0.0)]


async def test_the_next_turn_waits_for_that_poll_and_then_finds_its_backend_free() -> None:
    model, picker, clock, _ = make_asking()
    await small_full_with_an_ended_turn(model, picker, clock)
    next_turn = asyncio.ensure_future(picker.acquire(affinity=turn(3)))
    await asyncio.sleep(0)
    assert not next_turn.done()  # large has 4 free slots, but turn 3's history is on small
    poll(model, clock, small=ready(2, 1), large=ready(4))  # began after turn 2's release: settles it
    assert (await next_turn).backend == "small"


async def test_without_that_poll_the_next_turn_goes_elsewhere_after_a_bounded_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(picker_module, "AFFINE_POLL_WAIT", 0.01)
    model, picker, clock, _ = make_asking()
    await small_full_with_an_ended_turn(model, picker, clock)
    async with asyncio.timeout(1):
        assert (await picker.acquire(affinity=turn(3))).backend == "large"


async def test_an_ended_turn_on_a_backend_running_only_ours_frees_its_slot_without_a_poll() -> None:
    """The small_full_with_an_ended_turn case without the request from outside: the poll right after turn 2
    counts only turn 2, so busy() is exact and turn 2's release frees its slot at once."""
    model, picker, clock, asked = make_asking()
    await placed_on_small(model, picker, clock, turn(1))
    turn_two = await picker.acquire(affinity=turn(2))
    poll(model, clock, in_transit=True, small=ready(2, 1), large=ready(4))
    picker.release(turn_two.id)
    assert (await picker.acquire(affinity=turn(3))).backend == "small"
    assert asked == []


async def test_a_full_backend_with_no_ended_request_in_doubt_is_not_waited_for() -> None:
    model, picker, clock, asked = make_asking()
    await placed_on_small(model, picker, clock, turn(1))
    held = [await picker.acquire(affinity=turn(2)) for _ in range(2)]
    poll(model, clock, small=ready(2, 2), large=ready(4))
    assert [lease.backend for lease in held] == ["small", "small"]
    assert (await picker.acquire(affinity=turn(3))).backend == "large"  # at once: no future task
    assert asked == []
