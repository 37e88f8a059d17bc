"""The endpoint picker over a fleet model set by hand, with a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agentcheck.model import FleetModel, Origin, PollWindow
from agentcheck.picker import (
    LEASE_ID_PATTERN,
    OPEN_POLL_MARGIN,
    OPEN_SETTLE_SECONDS,
    SETTLE_SECONDS,
    BufferFull,
    BufferTimeout,
    Picker,
)
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from fleet import Address, Backend

BACKENDS = [Backend("small", Address("10.0.0.1", 8080)), Backend("large", Address("10.0.0.2", 8080))]
STANDBY = [Backend("spare", Address("10.0.0.3", 8080))]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ready(total: int, processing: int = 0) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS)


def make(max_waiting: int = 10, timeout: float = 5.0,
         poll_soon: Callable[[str, float], None] = lambda name, delay: None,
         affinity_wait: float = 0.0) -> tuple[FleetModel, Picker, Clock]:
    clock = Clock()
    model = FleetModel(BACKENDS, STANDBY)
    picker = Picker(model, max_waiting, timeout, clock, poll_soon=poll_soon, affinity_wait=affinity_wait)
    model.subscribe(picker.on_member_change)
    poll(model, clock, small=ready(2), large=ready(4), spare=ready(2))
    return model, picker, clock


def poll(model: FleetModel, clock: Clock, in_transit: bool = False, **statuses: BackendStatus) -> None:
    """A poll that started a while after the last lease (or, ``in_transit``, right after it) and
    finished a moment later."""
    if not in_transit:
        clock.now += SETTLE_SECONDS
    started = clock.now
    clock.now += 0.01
    for name, status in statuses.items():
        model.record_poll(name, status, now=clock.now, window=PollWindow(started, started))
    clock.now += 0.01


async def test_picks_the_backend_with_most_free_slots_and_counts_its_own_leases() -> None:
    _, picker, _ = make()
    picks = [(await picker.acquire()).backend for _ in range(6)]
    # large 4 free vs small 2: large, large, then tie 2/2 → the larger server, then alternate.
    assert picks == ["large", "large", "large", "small", "large", "small"]
    assert picker.free_slots() == {"small": 0, "large": 0}


async def test_a_backend_that_joins_is_picked_after_its_first_poll_and_one_removed_is_forgotten() -> None:
    model, picker, clock = make()
    for _ in range(6):
        await picker.acquire()
    model.add(Backend("gpu7", Address("10.0.0.7", 8080)), Origin.REGISTERED)
    assert "gpu7" not in picker.candidates()  # not polled yet
    poll(model, clock, gpu7=ready(2))
    lease = await picker.acquire()
    assert (lease.backend, lease.address) == ("gpu7", "10.0.0.7:8080")

    model.set_leaving("gpu7", True, "deregistered")
    assert "gpu7" not in picker.candidates()
    model.remove("gpu7")
    assert not picker.release(lease.id)  # its leases went with it
    assert not picker.failed(lease.id, served_by="10.0.0.7:8080")


async def test_after_opening_nothing_is_placed_until_every_backend_had_a_poll_that_began_later() -> None:
    model, picker, clock = make()
    picker.open(poll_interval=1.0)  # the agent just started: requests placed without it may still be in transit
    waiter = asyncio.ensure_future(picker.acquire())
    await asyncio.sleep(0)
    poll(model, clock, in_transit=True, small=ready(2, processing=1), large=ready(4))  # began too soon
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.now += OPEN_SETTLE_SECONDS
    poll(model, clock, in_transit=True, small=ready(2, processing=1))
    await asyncio.sleep(0)
    assert not waiter.done()  # large's count is not trusted yet: placing on small alone would skew
    poll(model, clock, in_transit=True, large=ready(4, processing=3))
    lease = await asyncio.wait_for(waiter, 1)
    assert lease.backend == "large" and picker.free_slots() == {"small": 1, "large": 0}


async def test_opening_asks_for_a_poll_of_every_backend_once_one_can_end_the_settle() -> None:
    """Not at each backend's turn, up to an interval later: requests wait until the last backend's poll."""
    model, picker, clock, asked = make_asking()
    picker.open(poll_interval=1.0)
    assert asked == [(name, OPEN_SETTLE_SECONDS + OPEN_POLL_MARGIN) for name in ("small", "large", "spare")]
    waiter = asyncio.ensure_future(picker.acquire())
    await asyncio.sleep(0)
    clock.now += OPEN_SETTLE_SECONDS + OPEN_POLL_MARGIN
    poll(model, clock, in_transit=True, small=ready(2), large=ready(4), spare=ready(2))
    assert (await asyncio.wait_for(waiter, 1)).backend == "large"


async def test_while_the_opening_settles_requests_that_would_get_a_slot_wait_beside_the_full_buffer() -> None:
    _, picker, _ = make(max_waiting=2)
    picker.open(poll_interval=1.0)
    waiters = [asyncio.ensure_future(picker.acquire()) for _ in range(2 + 6)]  # 6 primary slots free by the polls
    await asyncio.sleep(0)
    assert picker.waiting == 8 and not any(waiter.done() for waiter in waiters)
    with pytest.raises(BufferFull):
        await picker.acquire()
    for waiter in waiters:
        waiter.cancel()


async def test_after_opening_a_backend_that_is_never_polled_again_holds_nothing_past_one_interval() -> None:
    model, picker, clock = make()
    picker.open(poll_interval=1.0)
    clock.now += OPEN_SETTLE_SECONDS
    poll(model, clock, in_transit=True, large=ready(4))
    assert picker.free_slots() == {}
    clock.now += 1.0
    assert picker.free_slots() == {"small": 2, "large": 4}


async def test_lease_carries_the_backend_address_for_override_host() -> None:
    _, picker, _ = make()
    lease = await picker.acquire()
    assert lease.address == "10.0.0.2:8080"


async def test_a_poll_that_started_after_a_lease_supersedes_it() -> None:
    model, picker, clock = make()
    await picker.acquire()  # large
    assert picker.busy("large") == 1
    poll(model, clock, large=ready(4, 1))  # llama.cpp now reports that request itself
    assert picker.busy("large") == 1  # not 2
    poll(model, clock, large=ready(4, 0))  # it finished without a release (client went away) ...
    assert picker.busy("large") == 1  # ... or its release is still on the way
    poll(model, clock, large=ready(4, 0))  # a second poll without it: the release never came
    assert picker.busy("large") == 0


async def test_a_request_that_ended_before_its_release_came_does_not_free_an_older_ones_slot() -> None:
    model, picker, clock = make()
    first = await picker.acquire()  # large: a long answer
    second = await picker.acquire()  # large: a short one
    assert first.backend == second.backend == "large"
    poll(model, clock, large=ready(4, 2))
    poll(model, clock, large=ready(4, 1))  # the short one ended; its release is still on the way
    assert picker.release(second.id)
    assert picker.busy("large") == 1, "the long request's slot was counted free while it still runs"
    assert picker.release(first.id)  # its own release, not one the picker had already assumed


async def test_a_poll_right_after_a_lease_may_not_see_the_request_yet() -> None:
    model, picker, clock = make()
    await picker.acquire()  # large, still on its way to llama.cpp
    poll(model, clock, in_transit=True, large=ready(4, 0))
    assert picker.busy("large") == 1, "the in-transit request was forgotten: its slot could be given twice"


async def test_our_own_running_leases_bound_busy_even_when_llama_cpp_lags() -> None:
    model, picker, clock = make()
    for _ in range(3):
        await picker.acquire()  # large, large, large
    poll(model, clock, large=ready(4, 1))  # llama.cpp has picked up only one of them so far
    assert picker.busy("large") == 3


async def test_release_frees_the_slot_before_the_next_poll() -> None:
    model, picker, clock = make()
    leases = [await picker.acquire() for _ in range(6)]
    poll(model, clock, small=ready(2, 2), large=ready(4, 4))
    assert picker.free_slots() == {"small": 0, "large": 0}
    assert picker.release(leases[0].id)
    assert picker.free_slots()[leases[0].backend] == 1
    assert not picker.release(leases[0].id)  # twice is a no-op
    poll(model, clock, small=ready(2, 2), large=ready(4, 3))  # the poll now shows it too: no double count
    assert picker.free_slots() == {"small": 0, "large": 1}


def make_asking() -> tuple[FleetModel, Picker, Clock, list[tuple[str, float]]]:
    """make(), with the polls the picker asks for (Monitor.poll_soon: backend, delay) recorded."""
    asked: list[tuple[str, float]] = []
    model, picker, clock = make(poll_soon=lambda name, delay: asked.append((name, delay)))
    return model, picker, clock, asked


async def test_a_poll_right_after_leases_that_counts_only_ours_leaves_busy_at_our_own_leases() -> None:
    """llama.cpp was quick: the poll counts the requests of leases issued just before it. It shows nothing beyond
    our own, so a release frees its slot at once, as HAProxy's connection count would."""
    model, picker, clock = make()
    leases = [await picker.acquire() for _ in range(6)]
    poll(model, clock, in_transit=True, small=ready(2, 2), large=ready(4, 4))
    assert picker.free_slots() == {"small": 0, "large": 0}
    picker.release(next(lease for lease in leases if lease.backend == "large").id)
    assert picker.free_slots() == {"small": 0, "large": 1}


async def test_a_poll_right_after_a_lease_that_shows_outside_load_counts_the_lease_on_top() -> None:
    """Two running on large, one of them ours, issued just before: the poll may have missed ours and counted two
    requests from outside the balancer. A slot given twice is worse than one idle until the next poll."""
    model, picker, clock = make()
    await picker.acquire()  # large
    poll(model, clock, in_transit=True, large=ready(4, 2))
    assert picker.busy("large") == 3
    poll(model, clock, large=ready(4, 2))  # a poll well after the lease: it counts ours, and one from outside
    assert picker.busy("large") == 2


async def test_a_waiting_request_asks_for_a_poll_once_leases_the_last_poll_may_not_show_have_settled() -> None:
    """Large runs one request from outside the balancer. A poll right after large's last leases shows them
    (llama.cpp was quick), but busy() cannot know it did and counts them on top: after a release large still
    looks full. The waiting request gets that slot from a poll asked for once those leases are SETTLE_SECONDS
    old, not from the next poll in turn."""
    model, picker, clock, asked = make_asking()
    poll(model, clock, large=ready(4, 1))
    leases = [await picker.acquire() for _ in range(5)]
    issued = clock.now
    poll(model, clock, in_transit=True, small=ready(2, 2), large=ready(4, 4))
    picker.release(next(lease for lease in leases if lease.backend == "large").id)
    assert picker.free_slots()["large"] == 0, "the in-transit leases count on top of the poll"
    asked.clear()  # the release asked for a poll at once: it also began too soon to settle them
    waiter = asyncio.ensure_future(picker.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    # small's poll counts no more than our own two: its count is exact, nothing there to settle.
    assert dict(asked) == {"large": pytest.approx(issued + SETTLE_SECONDS - clock.now)}
    clock.now = issued + SETTLE_SECONDS
    poll(model, clock, in_transit=True, small=ready(2, 2), large=ready(4, 3))
    assert (await waiter).backend == "large"


async def test_no_poll_is_asked_for_while_nobody_waits_and_one_poll_serves_every_waiter() -> None:
    model, picker, clock, asked = make_asking()
    poll(model, clock, small=ready(2, 1), large=ready(4, 1))  # one request from outside the balancer on each
    [await picker.acquire() for _ in range(4)]
    poll(model, clock, in_transit=True, small=ready(2, 2), large=ready(4, 4))
    assert asked == []
    waiters = [asyncio.ensure_future(picker.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    poll(model, clock, in_transit=True, small=ready(2, 2))  # small's poll with requests waiting asks nothing new
    assert sorted(name for name, _ in asked) == ["large", "small"]
    for waiter in waiters:
        waiter.cancel()


async def test_a_poll_that_counts_only_our_own_requests_is_exact_so_nothing_asks_for_another() -> None:
    """Every slot runs one of ours and the polls right after the leases count just those: busy() is our own
    running leases. A release frees its slot at once, so neither it nor the requests that wait need a poll
    out of turn (each would be a /slots request to the server for nothing)."""
    model, picker, clock, asked = make_asking()
    leases = [await picker.acquire() for _ in range(6)]
    poll(model, clock, in_transit=True, small=ready(2, 2), large=ready(4, 4))
    waiters = [asyncio.ensure_future(picker.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert picker.release(leases[0].id)
    assert (await asyncio.wait_for(waiters[0], 1)).backend == leases[0].backend
    assert asked == []
    waiters[1].cancel()


async def test_waiters_are_served_first_come_first_served_as_slots_free() -> None:
    _model, picker, _clock = make()
    leases = [await picker.acquire() for _ in range(6)]
    waiters = [asyncio.create_task(picker.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert picker.waiting == 3
    for lease in leases[:3]:
        picker.release(lease.id)
        await asyncio.sleep(0)
    granted = [task.result().backend for task in waiters]
    assert granted == [lease.backend for lease in leases[:3]]
    assert picker.waiting == 0


async def test_a_new_request_does_not_jump_the_queue() -> None:
    _, picker, _ = make()
    leases = [await picker.acquire() for _ in range(6)]
    first = asyncio.create_task(picker.acquire())
    await asyncio.sleep(0)
    picker.release(leases[0].id)
    newcomer = asyncio.create_task(picker.acquire())
    await asyncio.sleep(0)
    assert first.done() and first.result().backend == leases[0].backend
    assert not newcomer.done(), "a late request took a slot before the queue head"
    newcomer.cancel()
    await asyncio.gather(newcomer, return_exceptions=True)


async def test_full_buffer_is_refused_at_once() -> None:
    _, picker, _ = make(max_waiting=2)
    for _ in range(6):
        await picker.acquire()
    waiters = [asyncio.create_task(picker.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BufferFull):
        await picker.acquire()
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert picker.waiting == 0


async def test_waiting_longer_than_the_timeout_fails() -> None:
    _, picker, _ = make(timeout=0.05)
    for _ in range(6):
        await picker.acquire()
    with pytest.raises(BufferTimeout):
        await picker.acquire()
    assert picker.waiting == 0


async def test_standby_only_when_no_primary_is_usable_and_drained_is_never_picked() -> None:
    model, picker, clock = make()
    model.set_drained("large", True)
    assert picker.candidates() == ["small"]
    poll(model, clock, small=BackendStatus.down(State.UNREACHABLE, "gone"))
    assert picker.candidates() == ["spare"]
    assert (await picker.acquire()).backend == "spare"


async def test_scale_from_zero_request_waits_until_a_backend_is_ready() -> None:
    model, picker, clock = make()
    poll(model, clock, **{name: BackendStatus.down(State.LOADING, "") for name in ("small", "large", "spare")})
    waiter = asyncio.create_task(picker.acquire())
    await asyncio.sleep(0)
    assert not waiter.done() and picker.waiting == 1
    poll(model, clock, small=ready(2))
    assert (await asyncio.wait_for(waiter, 1)).backend == "small"


async def test_a_lease_granted_to_an_abandoned_waiter_is_given_back() -> None:
    _model, picker, _clock = make()
    leases = [await picker.acquire() for _ in range(6)]
    waiter = asyncio.create_task(picker.acquire())
    await asyncio.sleep(0)
    picker.release(leases[0].id)  # grants the slot to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(waiter, return_exceptions=True)
    assert picker.free_slots()[leases[0].backend] == 1


async def test_lease_ids_are_unguessable_tokens_and_a_guess_frees_nothing() -> None:
    _, picker, _ = make()
    leases = [await picker.acquire() for _ in range(6)]
    assert all(LEASE_ID_PATTERN.fullmatch(lease.id) for lease in leases)
    assert len({lease.id for lease in leases}) == 6
    assert picker.free_slots() == {"small": 0, "large": 0}
    for guess in ("1", "6", "7", "AAAAAAAAAAAAAAAAAAAAAA", leases[0].id.upper() + "x"):
        assert not picker.release(guess)
    assert picker.free_slots() == {"small": 0, "large": 0}
    assert picker.release(leases[1].id)
    assert picker.free_slots() == {"small": 0, "large": 1}


# A server that refuses connections (killed): Envoy retries on the lease's alternates, the filter reports it.


async def test_a_lease_names_alternates_with_free_slots_idle_standby_first() -> None:
    _, picker, _ = make()
    lease = await picker.acquire()  # large; small and spare have free slots
    assert lease.alternates == ("10.0.0.3:8080", "10.0.0.1:8080")
    assert lease.endpoints == "10.0.0.2:8080,10.0.0.3:8080,10.0.0.1:8080"


async def test_a_free_slot_is_an_alternate_for_one_request_in_transit_at_a_time() -> None:
    model, picker, clock = make()
    poll(model, clock, spare=ready(1), small=ready(2))
    first, second = await picker.acquire(), await picker.acquire()  # large, large
    assert first.alternates == ("10.0.0.3:8080", "10.0.0.1:8080")
    assert second.alternates == ("10.0.0.1:8080", "10.0.0.3:8080")  # spare's one slot is offered to the first
    clock.now += SETTLE_SECONDS + 0.01  # the first has connected by now, or been retried
    assert (await picker.acquire()).alternates == ("10.0.0.3:8080", "10.0.0.1:8080")


async def test_with_no_slot_free_elsewhere_a_retry_still_goes_to_a_live_server_never_a_refusing_one() -> None:
    model, picker, clock = make()
    poll(model, clock, small=ready(2, processing=2), spare=ready(2, processing=2))
    lease = await picker.acquire()  # large has the only free slots
    assert lease.alternates == ("10.0.0.3:8080", "10.0.0.1:8080")  # not Envoy's fallback, which may pick large
    assert picker.failed(lease.id)
    poll(model, clock, small=ready(2, processing=1))
    assert (await picker.acquire()).alternates == ("10.0.0.3:8080",)  # small chosen; large refuses


async def test_a_refusing_server_gets_nothing_until_a_poll_that_started_after_the_refusal() -> None:
    model, picker, clock = make()
    lease = await picker.acquire()  # large
    assert picker.failed(lease.id)
    assert picker.candidates() == ["small"]
    assert picker.release(lease.id)
    assert (await picker.acquire()).backend == "small"  # large looks free again, but refused
    poll(model, clock, large=ready(4))
    assert "large" in picker.candidates()


async def test_a_refused_request_retried_elsewhere_counts_where_it_runs() -> None:
    _, picker, _ = make()
    lease = await picker.acquire()  # large
    assert picker.failed(lease.id, served_by="10.0.0.3:8080")
    assert (lease.backend, lease.address) == ("spare", "10.0.0.3:8080")
    assert picker.busy("large") == 0 and picker.busy("spare") == 1
    assert picker.release(lease.id)
    assert picker.busy("spare") == 0


async def test_a_failure_report_for_an_unknown_lease_or_elsewhere_changes_nothing() -> None:
    _, picker, _ = make()
    assert not picker.failed("AAAAAAAAAAAAAAAAAAAAAA")
    lease = await picker.acquire()  # large
    assert picker.failed(lease.id, served_by="192.0.2.1:80")  # not a fleet member: the lease stays
    assert picker.busy("large") == 1
    assert picker.candidates() == ["small"]


async def test_when_every_primary_refuses_standby_takes_over() -> None:
    _, picker, _ = make()
    for _ in range(2):
        picker.failed((await picker.acquire()).id)  # large, then small
    assert picker.candidates() == ["spare"]


# Model-aware routing: requests name a model; each backend's slots serving it are its share (model_share).

MODEL_BACKENDS = [Backend("a1", Address("10.0.1.1", 8080), models=("alpha",)),
                  Backend("a2", Address("10.0.1.2", 8080), models=("alpha",)),
                  Backend("b1", Address("10.0.1.3", 8080), models=("beta",)),
                  Backend("duo", Address("10.0.1.4", 8080), models=("alpha", "beta"))]


def make_models(limits: dict[str, tuple[int, float]] | None = None) -> tuple[FleetModel, Picker, Clock]:
    """a1, a2 serve alpha, b1 beta (2 slots each); duo (two aliases on one server) is not polled yet."""
    clock = Clock()
    model = FleetModel(MODEL_BACKENDS)
    picker = Picker(model, 10, 5.0, clock, limits=(lambda name: limits[name]) if limits else None)
    model.subscribe(picker.on_member_change)
    poll(model, clock, a1=ready(2), a2=ready(2), b1=ready(2))
    return model, picker, clock


async def test_a_request_naming_a_model_goes_only_where_it_is_served() -> None:
    _, picker, _ = make_models()
    alpha = [await picker.acquire("alpha") for _ in range(4)]
    beta = [await picker.acquire("beta") for _ in range(2)]
    assert sorted(lease.backend for lease in alpha) == ["a1", "a1", "a2", "a2"]
    assert [lease.backend for lease in beta] == ["b1", "b1"]
    assert all(lease.model == "alpha" for lease in alpha)
    assert picker.candidates("beta") == ["b1"] and picker.candidates("gamma") == []


async def test_a_burst_on_one_model_leaves_another_models_requests_immediate() -> None:
    _, picker, _ = make_models()
    burst = [asyncio.create_task(picker.acquire("alpha")) for _ in range(10)]
    await asyncio.sleep(0)
    assert picker.waiting_for("alpha") == 6 and sum(task.done() for task in burst) == 4
    for _ in range(2):
        beta = asyncio.create_task(picker.acquire("beta"))
        await asyncio.sleep(0)
        assert beta.done() and beta.result().backend == "b1", "beta waited behind alpha's burst"
    assert picker.waiting_for("beta") == 0
    for task in burst:
        task.cancel()
    await asyncio.gather(*burst, return_exceptions=True)
    assert picker.waiting == 0


async def test_a_models_excess_is_served_in_order_on_its_own_servers() -> None:
    _, picker, _ = make_models()
    leases = [await picker.acquire("alpha") for _ in range(4)]
    waiters = [asyncio.create_task(picker.acquire("alpha")) for _ in range(3)]
    beta_waiter = [await picker.acquire("beta") for _ in range(2)]
    await asyncio.sleep(0)
    for lease in beta_waiter:  # beta's slots freeing hands nothing to alpha's queue
        picker.release(lease.id)
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiters)
    for index, lease in enumerate(leases[:3]):
        picker.release(lease.id)
        await asyncio.sleep(0)
        assert [task.done() for task in waiters] == [True] * (index + 1) + [False] * (2 - index)
        assert waiters[index].result().backend == lease.backend
    assert picker.waiting == 0


async def test_each_model_has_its_own_buffer_and_timeout() -> None:
    _, picker, _ = make_models(limits={"alpha": (1, 0.05), "beta": (3, 5.0)})
    for _ in range(4):
        await picker.acquire("alpha")
    for _ in range(2):
        await picker.acquire("beta")
    alpha_waiter = asyncio.create_task(picker.acquire("alpha"))
    beta_waiters = [asyncio.create_task(picker.acquire("beta")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(BufferFull):
        await picker.acquire("alpha")  # alpha's one place is taken, beta's three are too: each its own
    with pytest.raises(BufferFull):
        await picker.acquire("beta")
    with pytest.raises(BufferTimeout):
        await alpha_waiter  # after alpha's 0.05 s, while beta's requests still wait
    assert picker.waiting_for("beta") == 3 and not any(task.done() for task in beta_waiters)
    for task in beta_waiters:
        task.cancel()
    await asyncio.gather(*beta_waiters, return_exceptions=True)


async def test_requests_naming_no_model_use_the_whole_server_and_the_balancers_limits() -> None:
    _, picker, _ = make_models(limits={"alpha": (0, 1.0)})
    picks = sorted([(await picker.acquire()).backend for _ in range(6)])
    assert picks == ["a1", "a1", "a2", "a2", "b1", "b1"]
    assert picker.free_slots("alpha") == {"a1": 0, "a2": 0}  # they run on slots every model shares
    with pytest.raises(BufferFull):
        await picker.acquire("alpha")  # alpha's buffer holds none
    waiter = asyncio.create_task(picker.acquire())
    await asyncio.sleep(0)
    assert picker.waiting_for(None) == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_a_servers_aliases_split_its_slots_so_together_they_never_exceed_it() -> None:
    model, picker, clock = make_models()
    poll(model, clock, duo=ready(4))
    for name in ("a1", "a2", "b1"):
        model.set_drained(name, True)
    alpha = [await picker.acquire("alpha") for _ in range(2)]
    beta = [await picker.acquire("beta") for _ in range(2)]
    assert [lease.backend for lease in alpha + beta] == ["duo"] * 4
    assert picker.free_slots("alpha") == {"duo": 0} and picker.free_slots("beta") == {"duo": 0}
    assert picker.busy("duo") == 4
    waiter = asyncio.create_task(picker.acquire("alpha"))
    await asyncio.sleep(0)
    assert not waiter.done()
    picker.release(beta[0].id)  # a beta slot frees: alpha's share is still full
    await asyncio.sleep(0)
    assert not waiter.done()
    picker.release(alpha[0].id)
    await asyncio.sleep(0)
    assert waiter.result().backend == "duo"


async def test_a_release_asks_for_a_poll_only_when_a_count_that_includes_it_shows_outside_load() -> None:
    """duo's two aliases split its 4 slots. llama.cpp does not say which alias a running request serves, so
    each share counts as busy as it can be (model_share). One alpha request and one naming no model run, and a
    poll right after counts both. To beta's share, which counts only the one naming no model, the other looks
    like load from outside. The whole server's count and alpha's are exact: alpha's release needs no poll, the
    other's does."""
    clock = Clock()
    asked: list[tuple[str, float]] = []
    model = FleetModel([backend for backend in MODEL_BACKENDS if backend.name == "duo"])
    picker = Picker(model, 10, 5.0, clock, poll_soon=lambda name, delay: asked.append((name, delay)))
    model.subscribe(picker.on_member_change)
    poll(model, clock, duo=ready(4))
    alpha, unnamed = await picker.acquire("alpha"), await picker.acquire()
    poll(model, clock, in_transit=True, duo=ready(4, 2))
    assert picker.release(alpha.id) and asked == []
    assert picker.release(unnamed.id) and asked == [("duo", 0.0)]


async def test_alternates_serve_the_requests_model() -> None:
    _, picker, _ = make_models()
    lease = await picker.acquire("alpha")
    assert (lease.backend, lease.alternates) in (("a1", ("10.0.1.2:8080",)), ("a2", ("10.0.1.1:8080",)))
    assert (await picker.acquire("beta")).alternates == ()


ROUTER = Backend("router", Address("10.0.2.1", 8080))


def router(load: ModelLoad, total: int = 0, processing: int = 0) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS,
                         router=True, models=(ModelStatus("alpha", load, total, processing),))


async def test_a_cold_model_gets_one_request_at_a_time_and_only_when_no_loaded_server_has_a_free_slot() -> None:
    clock = Clock()
    model = FleetModel([MODEL_BACKENDS[0], ROUTER])
    picker = Picker(model, 10, 5.0, clock)
    model.subscribe(picker.on_member_change)
    poll(model, clock, a1=ready(2), router=router(ModelLoad.UNLOADED))
    warm = [await picker.acquire("alpha") for _ in range(2)]
    assert [lease.backend for lease in warm] == ["a1", "a1"]  # never the cold router while a1 has room
    cold = await picker.acquire("alpha")
    assert cold.backend == "router"  # a1 full: this request loads alpha on the router
    waiter = asyncio.create_task(picker.acquire("alpha"))
    await asyncio.sleep(0)
    assert not waiter.done()  # one cold load at a time
    poll(model, clock, router=router(ModelLoad.LOADING))
    await asyncio.sleep(0)
    assert not waiter.done()
    picker.release(warm[0].id)  # a loaded slot frees: the waiter takes it, not a second cold request
    await asyncio.sleep(0)
    assert waiter.result().backend == "a1"
    poll(model, clock, a1=ready(2, 2), router=router(ModelLoad.LOADED, total=2, processing=1))
    assert picker.free_slots("alpha") == {"a1": 0, "router": 1}  # loaded now: its slots, the load counted
    assert (await picker.acquire("alpha")).backend == "router"


async def test_a_refused_request_moves_only_to_a_server_of_its_model() -> None:
    _, picker, _ = make_models()
    lease = await picker.acquire("alpha")
    assert picker.failed(lease.id, served_by="10.0.1.3:8080")  # b1 serves beta: not where alpha runs
    assert lease.backend in ("a1", "a2") and picker.busy("b1") == 0
