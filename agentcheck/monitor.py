"""Per-backend polling and the shared table of what the agent currently knows.

Each backend has its own task, so a slow or hanging backend only ever delays itself; every
poll is bounded by ``poll_timeout`` (shorter than the interval) and every failure, expected
or not, becomes a status with a reason instead of an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Awaitable, Callable, Iterable

from agentcheck.policy import DEFAULT_WEIGHT_FORMULA, WeightFormula, agent_reply
from agentcheck.status import PENDING, BackendStatus, State
from fleet import Backend

log = logging.getLogger("paddler.agent")

Poller = Callable[[Backend], Awaitable[BackendStatus]]


class FleetState:
    """Latest status per backend and the agent-check reply it implies (cached: checks are hot)."""

    def __init__(self, backends: Iterable[Backend], formula: WeightFormula = DEFAULT_WEIGHT_FORMULA) -> None:
        self._formula = formula
        self._backends = {backend.name: backend for backend in backends}
        self._status: dict[str, BackendStatus] = {name: PENDING for name in self._backends}
        self._updated: dict[str, float] = {}
        self._largest_slots = 0
        self._replies: dict[str, str] = {}
        self._drained: set[str] = set()
        self.poll_seconds: dict[str, float] = {}  # duration of each backend's last poll
        self.polls: Counter[str] = Counter()  # polls per backend
        self.failed_polls: Counter[tuple[str, str]] = Counter()  # (backend, state) of polls that were not ready
        # Requests waiting in the balancer (HAProxy queue + held), from its /health; None when unknown.
        self.requests_buffered: int | None = None
        self.poll_started: dict[str, float] = {}  # monotonic start of the poll behind each status
        self.poll_finished: dict[str, float] = {}  # ... and its end
        # Called with the backend's name after every poll result and operator change.
        self.on_change: list[Callable[[str], None]] = []

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def backend(self, name: str) -> Backend:
        return self._backends[name]

    def is_drained(self, name: str) -> bool:
        return name in self._drained

    def set_drained(self, name: str, drained: bool) -> None:
        """Operator drain (or undo): HAProxy gets ``drain`` instead of ``ready`` for this backend."""
        if name not in self._backends:
            raise KeyError(name)
        if drained != (name in self._drained):
            log.info("%s: %s by operator", name, "drained" if drained else "ready again")
        (self._drained.add if drained else self._drained.discard)(name)
        self._replies.pop(name, None)
        self._notify(name)

    def status(self, name: str) -> BackendStatus:
        return self._status[name]

    def updated_at(self, name: str) -> float | None:
        """Wall-clock time of the last poll result, None before the first."""
        return self._updated.get(name)

    def update(self, name: str, status: BackendStatus, now: float, poll_seconds: float = 0.0,
               poll_started: float | None = None) -> None:
        previous = self._status[name]
        self._status[name] = status
        self._updated[name] = now
        self.poll_seconds[name] = poll_seconds
        if poll_started is not None:
            self.poll_started[name] = poll_started
            self.poll_finished[name] = poll_started + poll_seconds
        self.polls[name] += 1
        if status.state is not State.READY:
            self.failed_polls[name, status.state.value] += 1
        if previous != status:
            self._replies.pop(name, None)
        if status.state is State.READY and status.slots_total > self._largest_slots:
            # Weights are relative to the largest backend ever seen; a new maximum rescales all.
            self._largest_slots = status.slots_total
            self._replies.clear()
        if previous.state is not status.state or previous.reason != status.reason:
            log.info("%s: %s -> %s%s", name, previous.state.value, status.state.value,
                     f" ({status.reason})" if status.reason else "")
        self._notify(name)

    def _notify(self, name: str) -> None:
        for listener in self.on_change:
            listener(name)

    def reply_for(self, name: str) -> str | None:
        """The agent-check line for a backend, or None when the name is not in the fleet."""
        reply = self._replies.get(name)
        if reply is None:
            status = self._status.get(name)
            if status is None:
                return None
            reply = self._replies[name] = agent_reply(status, self._largest_slots, self._formula,
                                                      drained=name in self._drained)
        return reply


class Monitor:
    def __init__(self, backends: Iterable[Backend], state: FleetState, poll: Poller,
                 interval: float, poll_timeout: float) -> None:
        self._backends = list(backends)
        self._state = state
        self._poll = poll
        self._interval = interval
        self._poll_timeout = poll_timeout

    async def poll_once(self, backend: Backend) -> BackendStatus:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._poll_timeout):
                status = await self._poll(backend)
        except TimeoutError:
            status = BackendStatus.down(State.UNREACHABLE, f"no answer within {self._poll_timeout:g}s")
        except Exception as exc:  # a bug here must cost one backend one poll, never the agent
            log.exception("%s: unexpected error while polling", backend.name)
            status = BackendStatus.down(State.ERROR, f"agent error while polling ({type(exc).__name__})")
        self._state.update(backend.name, status, time.time(), poll_seconds=time.monotonic() - started,
                           poll_started=started)
        return status

    async def poll_all(self) -> None:
        """One round over the whole fleet, concurrently; used before the agent starts answering."""
        await asyncio.gather(*(self.poll_once(backend) for backend in self._backends))

    async def run(self) -> None:
        """Poll every backend forever, each on its own schedule, spread across the interval."""
        count = max(1, len(self._backends))
        async with asyncio.TaskGroup() as group:
            for index, backend in enumerate(self._backends):
                group.create_task(self._poll_forever(backend, offset=self._interval * index / count),
                                  name=f"poll-{backend.name}")

    async def _poll_forever(self, backend: Backend, offset: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + offset
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            await self.poll_once(backend)
            next_at += self._interval
            if next_at < loop.time():  # fell behind (suspended host): skip, don't burst
                next_at = loop.time() + self._interval
