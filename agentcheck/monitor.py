"""Per-backend polling: each result goes into the fleet model.

Each backend has its own task, so a slow or hanging backend only ever delays itself; every
poll is bounded by ``poll_timeout`` (shorter than the interval) and every failure, expected
or not, becomes a status with a reason instead of an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from agentcheck.model import FleetModel, Member, PollWindow
from agentcheck.status import BackendStatus, ModelLoad, State
from fleet import Backend

log = logging.getLogger("paddler.agent")

Poller = Callable[[Backend], Awaitable[BackendStatus]]

# Polls due within this many seconds of each other start together, so that one wake-up of the
# process serves several polls and their answers: spread one by one, 1,000 backends woke the
# agent ~900 times a second, which cost more CPU than the polls' own work (docs/agent.md).
POLL_BATCH = 0.01
# A ready backend that does not answer one poll in time keeps its last status; the second poll in a row
# that times out takes it down. A busy server on a saturated host can answer late once (the health
# check's own `fall 1` took alive servers out the same way); a crashed one refuses the connection,
# which takes it down at the first poll, and a stalled one is down after two intervals.
LATE_POLLS_BEFORE_DOWN = 2
# Polls asked for out of turn (poll_soon) start at least this far apart on one backend: a burst of requests
# ending costs a few polls, not one each.
SOON_SPACING = 0.01


class PollCounters:
    """Polls per backend, those that did not find it ready, by state, and the cold loads seen on each (a model
    that a poll showed unloaded and a later one loading or loaded: a request named it): the monitor's own
    metrics."""

    def __init__(self) -> None:
        self.polls: Counter[str] = Counter()
        self.failures: Counter[tuple[str, str]] = Counter()  # (backend, state)
        self.cold_loads: Counter[tuple[str, str]] = Counter()  # (backend, model)
        self._loads: dict[str, dict[str, ModelLoad]] = {}  # backend → model → load at its last ready poll

    def count(self, name: str, status: BackendStatus) -> None:
        self.polls[name] += 1
        if status.state is not State.READY:
            self.failures[name, status.state.value] += 1
            return
        before = self._loads.get(name, {})
        for model in status.models:
            if before.get(model.name) is ModelLoad.UNLOADED and model.load is not ModelLoad.UNLOADED:
                self.cold_loads[name, model.name] += 1
        self._loads[name] = {model.name: model.load for model in status.models}

    def count_late(self, name: str) -> None:
        """A poll that timed out but left a ready backend ready (see LATE_POLLS_BEFORE_DOWN)."""
        self.polls[name] += 1
        self.failures[name, "late"] += 1

    def forget(self, name: str) -> None:
        """A backend that left the fleet: its series end with it."""
        self.polls.pop(name, None)
        self._loads.pop(name, None)
        for counter in (self.failures, self.cold_loads):
            for key in [key for key in counter if key[0] == name]:
                del counter[key]


class Monitor:
    def __init__(self, model: FleetModel, poll: Poller, interval: float, poll_timeout: float) -> None:
        self._model = model
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._soon: dict[str, asyncio.Event] = {}  # backend → a poll out of turn is wanted
        self._late: Counter[str] = Counter()  # backend → polls in a row that timed out
        self._group: asyncio.TaskGroup | None = None
        self.counters = PollCounters()
        self._poll = poll
        self._interval = interval
        self._poll_timeout = poll_timeout

    async def poll_once(self, backend: Backend) -> BackendStatus:
        started = time.monotonic()
        late = 0
        try:
            async with asyncio.timeout(self._poll_timeout):
                status = await self._poll(backend)
        except TimeoutError:
            self._late[backend.name] += 1
            late = self._late[backend.name]
            member = self._model.get(backend.name)
            if member is not None and member.ready and late < LATE_POLLS_BEFORE_DOWN:
                log.info("%s: no answer within %gs; still ready until the next poll", backend.name,
                         self._poll_timeout)
                self.counters.count_late(backend.name)
                return member.status
            status = BackendStatus.down(State.UNREACHABLE, f"no answer within {self._poll_timeout:g}s")
        except Exception as exc:  # a bug here must cost one backend one poll, never the agent
            log.exception("%s: unexpected error while polling", backend.name)
            status = BackendStatus.down(State.ERROR, f"agent error while polling ({type(exc).__name__})")
        if backend.name not in self._model:  # left the fleet while this poll ran
            return status
        if not late:
            self._late.pop(backend.name, None)
        self.counters.count(backend.name, status)
        self._model.record_poll(backend.name, status, time.time(), PollWindow(started, time.monotonic()))
        return status

    async def poll_all(self) -> None:
        """One round over the whole fleet, concurrently; used before the agent starts answering."""
        await asyncio.gather(*(self.poll_once(member.backend) for member in self._model))

    async def run(self) -> None:
        """Poll every backend forever, each on its own schedule, spread across the interval in steps of
        ``POLL_BATCH``."""
        backends = [member.backend for member in self._model]
        count = max(1, len(backends))
        async with asyncio.TaskGroup() as group:
            self._group = group
            for index, backend in enumerate(backends):
                offset = self._interval * index / count
                self._start(backend, offset=offset - offset % POLL_BATCH)

    def poll_soon(self, name: str, delay: float = 0.0) -> None:
        """Poll this backend now, or in ``delay`` seconds, instead of at its turn (the picker cannot tell
        whether the last poll counted a request that has ended since, or one that began just before it); a
        poll under way is followed by another. Never two at once."""
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.poll_soon, name)
            return
        soon = self._soon.get(name)
        if soon is not None:
            soon.set()

    def on_member_change(self, previous: Member | None, current: Member | None) -> None:
        """The model's subscription: a backend that joins is polled at once, one removed no more."""
        if previous is None and current is not None and self._group is not None:
            self._start(current.backend, offset=0.0)
        elif current is None and previous is not None:
            task = self._tasks.pop(previous.name, None)
            if task is not None:
                task.cancel()
            self._soon.pop(previous.name, None)
            self.counters.forget(previous.name)
            self._late.pop(previous.name, None)

    def _start(self, backend: Backend, offset: float) -> None:
        assert self._group is not None
        self._tasks[backend.name] = self._group.create_task(self._poll_forever(backend, offset=offset),
                                                            name=f"poll-{backend.name}")

    async def _poll_forever(self, backend: Backend, offset: float) -> None:
        loop = asyncio.get_running_loop()
        soon = self._soon[backend.name] = asyncio.Event()
        next_at = loop.time() + offset
        last_started = float("-inf")
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await soon.wait()
                    await asyncio.sleep(max(0.0, last_started + SOON_SPACING - loop.time()))
            except TimeoutError:
                pass
            soon.clear()
            last_started = loop.time()
            await self.poll_once(backend)
            if loop.time() >= next_at:  # a poll out of turn keeps the schedule
                next_at += self._interval
                if next_at < loop.time():  # fell behind (suspended host): skip, don't burst
                    next_at = loop.time() + self._interval
