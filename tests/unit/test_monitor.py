"""agentcheck.monitor: per-backend polling into the fleet model, bounded and isolated per backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from agentcheck.model import FleetModel
from agentcheck.monitor import Monitor
from agentcheck.status import PENDING, BackendStatus, SlotSource, State
from fleet import Address, Backend

GPU1 = Backend("gpu1", Address("127.0.0.1", 8081))
GPU2 = Backend("gpu2", Address("127.0.0.1", 8082))


def ready(total: int, processing: int = 0) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS)


# --- Monitor.poll_once ----------------------------------------------------------------------


async def test_poll_that_takes_longer_than_poll_timeout_is_unreachable() -> None:
    async def slow(_backend: Backend) -> BackendStatus:
        await asyncio.sleep(10)
        return ready(4)

    model = FleetModel([GPU1])
    monitor = Monitor(model, slow, interval=1.0, poll_timeout=0.05)

    async with asyncio.timeout(5):
        status = await monitor.poll_once(GPU1)

    assert status == BackendStatus.down(State.UNREACHABLE, "no answer within 0.05s")
    assert model["gpu1"].status == status
    assert monitor.counters.failures == {("gpu1", "unreachable"): 1}


async def test_a_ready_backend_is_down_only_after_two_polls_in_a_row_time_out() -> None:
    answers = ["ready", "slow", "ready", "slow", "slow"]

    async def poll(_backend: Backend) -> BackendStatus:
        if answers.pop(0) == "slow":
            await asyncio.sleep(10)
        return ready(4, 1)

    model = FleetModel([GPU1])
    monitor = Monitor(model, poll, interval=1.0, poll_timeout=0.05)
    async with asyncio.timeout(5):
        seen = [(await monitor.poll_once(GPU1)).state for _ in range(5)]

    assert seen == [State.READY, State.READY, State.READY, State.READY, State.UNREACHABLE]
    assert model["gpu1"].status == BackendStatus.down(State.UNREACHABLE, "no answer within 0.05s")
    assert monitor.counters.failures == {("gpu1", "late"): 2, ("gpu1", "unreachable"): 1}
    assert monitor.counters.polls["gpu1"] == 5


async def test_poller_that_raises_becomes_an_error_status_not_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(_backend: Backend) -> BackendStatus:
        raise RuntimeError("bug in the poller")

    model = FleetModel([GPU1])
    monitor = Monitor(model, broken, interval=1.0, poll_timeout=0.5)

    with caplog.at_level(logging.ERROR, logger="paddler.agent"):
        status = await monitor.poll_once(GPU1)

    assert status == BackendStatus.down(State.ERROR, "agent error while polling (RuntimeError)")
    assert model["gpu1"].status == status
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

    model = FleetModel([GPU1, GPU2])
    monitor = Monitor(model, needs_the_other, interval=1.0, poll_timeout=2.0)

    async with asyncio.timeout(5):
        await monitor.poll_all()

    assert model["gpu1"].status == ready(2)
    assert model["gpu2"].status == ready(2)


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

    model = FleetModel([GPU1, GPU2])
    # poll_timeout far beyond the wait below: the quick backend can only reach three polls
    # in time if the hanging one is polled on its own schedule.
    monitor = Monitor(model, poll, interval=0.02, poll_timeout=60.0)
    run = asyncio.create_task(monitor.run())
    try:
        await asyncio.wait_for(quick_polled_three_times.wait(), timeout=2.0)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    assert quick_calls >= 3
    assert hanging_calls == 1
    assert model["gpu2"].status == ready(2)
    assert model["gpu1"].status == PENDING


async def test_a_raising_backend_does_not_stop_polling() -> None:
    calls = 0
    polled_three_times = asyncio.Event()

    async def broken(_backend: Backend) -> BackendStatus:
        nonlocal calls
        calls += 1
        if calls >= 3:
            polled_three_times.set()
        raise RuntimeError("bug in the poller")

    model = FleetModel([GPU1])
    monitor = Monitor(model, broken, interval=0.01, poll_timeout=0.5)
    run = asyncio.create_task(monitor.run())
    try:
        await asyncio.wait_for(polled_three_times.wait(), timeout=2.0)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    assert model["gpu1"].status.state is State.ERROR


async def test_each_poll_is_counted_with_its_window() -> None:
    async def quick(_backend: Backend) -> BackendStatus:
        return ready(2)

    model = FleetModel([GPU1])
    monitor = Monitor(model, quick, interval=1.0, poll_timeout=0.5)

    await monitor.poll_once(GPU1)
    await monitor.poll_once(GPU1)

    assert monitor.counters.polls == {"gpu1": 2}
    assert monitor.counters.failures == {}
    window = model["gpu1"].poll
    assert window is not None and 0 <= window.seconds < 0.5


class PollLog:
    """When each poll ended, and a way to await the n-th."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._changed = asyncio.Condition()

    async def record(self) -> None:
        self.times.append(asyncio.get_running_loop().time())
        async with self._changed:
            self._changed.notify_all()

    async def reach(self, count: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.times) >= count), timeout=2.0)


async def test_poll_soon_polls_out_of_turn_one_poll_at_a_time_and_keeps_the_schedule() -> None:
    """An interval of a minute: every poll after the first is one asked for; one asked for while a poll runs
    follows it, never beside it."""
    running = 0
    overlapped = False
    polls = PollLog()
    release_poll = asyncio.Event()
    hanging = asyncio.Event()

    async def poll(_backend: Backend) -> BackendStatus:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        if len(polls.times) == 1:
            hanging.set()
            await release_poll.wait()  # the second poll hangs until told: poll_soon meanwhile must wait for it
        running -= 1
        await polls.record()
        return ready(2)

    model = FleetModel([GPU1])
    monitor = Monitor(model, poll, interval=60.0, poll_timeout=30.0)
    run = asyncio.create_task(monitor.run())
    try:
        await polls.reach(1)
        monitor.poll_soon("gpu1")  # the second poll starts and hangs
        await asyncio.wait_for(hanging.wait(), timeout=2.0)
        monitor.poll_soon("gpu1")  # asked while it runs: a third poll, after it
        release_poll.set()
        await polls.reach(3)
        monitor.poll_soon("unknown")  # a backend the monitor does not poll: nothing happens
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    assert len(polls.times) == 3
    assert not overlapped
    assert model["gpu1"].status == ready(2)


async def test_poll_soon_with_a_delay_polls_once_that_delay_has_passed() -> None:
    """An interval of a minute: the second poll is the one asked for, no sooner than its delay."""
    polls = PollLog()

    async def poll(_backend: Backend) -> BackendStatus:
        await polls.record()
        return ready(2)

    monitor = Monitor(FleetModel([GPU1]), poll, interval=60.0, poll_timeout=30.0)
    run = asyncio.create_task(monitor.run())
    try:
        await polls.reach(1)
        asked_at = asyncio.get_running_loop().time()
        monitor.poll_soon("gpu1", 0.2)
        await polls.reach(2)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    assert polls.times[1] - asked_at >= 0.2
