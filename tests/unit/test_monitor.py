"""agentcheck.monitor: the status table and its replies, and per-backend polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from agentcheck.monitor import FleetState, Monitor
from agentcheck.policy import WeightFormula, agent_reply
from agentcheck.status import PENDING, BackendStatus, SlotSource, State
from fleet import Address, Backend

GPU1 = Backend("gpu1", Address("127.0.0.1", 8081))
GPU2 = Backend("gpu2", Address("127.0.0.1", 8082))


def ready(total: int, processing: int = 0) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS)


# --- FleetState -----------------------------------------------------------------------------


def test_reply_is_pending_before_any_update() -> None:
    state = FleetState([GPU1])

    assert state.status("gpu1") == PENDING
    assert state.updated_at("gpu1") is None
    assert state.reply_for("gpu1") == "down #awaiting first poll\n"


def test_reply_for_a_name_outside_the_fleet_is_none() -> None:
    assert FleetState([GPU1]).reply_for("gpu9") is None


def test_update_to_ready_changes_the_reply() -> None:
    state = FleetState([GPU1])
    state.reply_for("gpu1")  # cache the pending reply

    state.update("gpu1", ready(4, 1), now=123.0)

    assert state.status("gpu1") == ready(4, 1)
    assert state.updated_at("gpu1") == 123.0
    assert state.reply_for("gpu1") == "up ready 75% maxconn:4 #idle=3 processing=1 via slots\n"


def test_busy_slot_change_changes_the_reply() -> None:
    state = FleetState([GPU1])
    state.update("gpu1", ready(4, 0), now=1.0)
    state.reply_for("gpu1")

    state.update("gpu1", ready(4, 3), now=2.0)

    assert state.reply_for("gpu1") == agent_reply(ready(4, 3), 4)


def test_going_down_after_ready_changes_the_reply() -> None:
    state = FleetState([GPU1])
    state.update("gpu1", ready(4), now=1.0)
    state.reply_for("gpu1")

    state.update("gpu1", BackendStatus.down(State.LOADING, ""), now=2.0)

    assert state.reply_for("gpu1") == "down #loading\n"


def test_with_capacity_weights_a_new_larger_backend_rescales_the_others() -> None:
    state = FleetState([GPU1, GPU2], WeightFormula.CAPACITY)
    state.update("gpu1", ready(2), now=1.0)
    assert state.reply_for("gpu1") == "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"

    state.update("gpu2", ready(4), now=2.0)

    assert state.reply_for("gpu1") == "up ready 50% maxconn:2 #idle=2 processing=0 via slots\n"
    assert state.reply_for("gpu2") == "up ready 100% maxconn:4 #idle=4 processing=0 via slots\n"


# --- Monitor.poll_once ----------------------------------------------------------------------


async def test_poll_that_takes_longer_than_poll_timeout_is_unreachable() -> None:
    async def slow(_backend: Backend) -> BackendStatus:
        await asyncio.sleep(10)
        return ready(4)

    state = FleetState([GPU1])
    monitor = Monitor([GPU1], state, slow, interval=1.0, poll_timeout=0.05)

    async with asyncio.timeout(5):
        status = await monitor.poll_once(GPU1)

    assert status == BackendStatus.down(State.UNREACHABLE, "no answer within 0.05s")
    assert state.status("gpu1") == status
    assert state.reply_for("gpu1") == "down #unreachable: no answer within 0.05s\n"


async def test_poller_that_raises_becomes_an_error_status_not_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(_backend: Backend) -> BackendStatus:
        raise RuntimeError("bug in the poller")

    state = FleetState([GPU1])
    monitor = Monitor([GPU1], state, broken, interval=1.0, poll_timeout=0.5)

    with caplog.at_level(logging.ERROR, logger="paddler.agent"):
        status = await monitor.poll_once(GPU1)

    assert status == BackendStatus.down(State.ERROR, "agent error while polling (RuntimeError)")
    assert state.status("gpu1") == status
    assert any("gpu1" in record.getMessage() and record.exc_info for record in caplog.records)


async def test_poll_all_polls_every_backend_concurrently() -> None:
    both_started = asyncio.Event()
    started: set[str] = set()

    async def needs_the_other(backend: Backend) -> BackendStatus:
        started.add(backend.name)
        if len(started) == 2:
            both_started.set()
        await both_started.wait()  # deadlocks unless both polls run at the same time
        return ready(2)

    state = FleetState([GPU1, GPU2])
    monitor = Monitor([GPU1, GPU2], state, needs_the_other, interval=1.0, poll_timeout=2.0)

    async with asyncio.timeout(5):
        await monitor.poll_all()

    assert state.status("gpu1") == ready(2)
    assert state.status("gpu2") == ready(2)


# --- Monitor.run ----------------------------------------------------------------------------


async def test_a_hanging_backend_never_delays_polling_of_the_others() -> None:
    hang_forever = asyncio.Event()  # never set
    quick_calls = 0
    quick_polled_three_times = asyncio.Event()
    hanging_calls = 0

    async def poll(backend: Backend) -> BackendStatus:
        nonlocal quick_calls, hanging_calls
        if backend is GPU1:
            hanging_calls += 1
            await hang_forever.wait()
        quick_calls += 1
        if quick_calls >= 3:
            quick_polled_three_times.set()
        return ready(2)

    state = FleetState([GPU1, GPU2])
    # poll_timeout far beyond the wait below: the quick backend can only reach three polls
    # in time if the hanging one is polled on its own schedule.
    monitor = Monitor([GPU1, GPU2], state, poll, interval=0.02, poll_timeout=60.0)
    run = asyncio.create_task(monitor.run())
    try:
        await asyncio.wait_for(quick_polled_three_times.wait(), timeout=2.0)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    assert quick_calls >= 3
    assert hanging_calls == 1
    assert state.status("gpu2") == ready(2)
    assert state.status("gpu1") == PENDING


async def test_a_raising_backend_does_not_stop_polling() -> None:
    calls = 0
    polled_three_times = asyncio.Event()

    async def broken(_backend: Backend) -> BackendStatus:
        nonlocal calls
        calls += 1
        if calls >= 3:
            polled_three_times.set()
        raise RuntimeError("bug in the poller")

    state = FleetState([GPU1])
    monitor = Monitor([GPU1], state, broken, interval=0.01, poll_timeout=0.5)
    run = asyncio.create_task(monitor.run())
    try:
        await asyncio.wait_for(polled_three_times.wait(), timeout=2.0)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    assert state.status("gpu1").state is State.ERROR
