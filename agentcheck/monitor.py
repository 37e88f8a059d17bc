"""Per-backend polling and the shared table of what the agent currently knows.

Each backend has its own task, so a slow or hanging backend only ever delays itself; every
poll is bounded by ``poll_timeout`` (shorter than the interval) and every failure, expected
or not, becomes a status with a reason instead of an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
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

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def status(self, name: str) -> BackendStatus:
        return self._status[name]

    def updated_at(self, name: str) -> float | None:
        """Wall-clock time of the last poll result, None before the first."""
        return self._updated.get(name)

    def update(self, name: str, status: BackendStatus, now: float) -> None:
        previous = self._status[name]
        self._status[name] = status
        self._updated[name] = now
        if previous != status:
            self._replies.pop(name, None)
        if status.state is State.READY and status.slots_total > self._largest_slots:
            # Weights are relative to the largest backend ever seen; a new maximum rescales all.
            self._largest_slots = status.slots_total
            self._replies.clear()
        if previous.state is not status.state or previous.reason != status.reason:
            log.info("%s: %s -> %s%s", name, previous.state.value, status.state.value,
                     f" ({status.reason})" if status.reason else "")

    def reply_for(self, name: str) -> str | None:
        """The agent-check line for a backend, or None when the name is not in the fleet."""
        reply = self._replies.get(name)
        if reply is None:
            status = self._status.get(name)
            if status is None:
                return None
            reply = self._replies[name] = agent_reply(status, self._largest_slots, self._formula)
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
        try:
            async with asyncio.timeout(self._poll_timeout):
                status = await self._poll(backend)
        except TimeoutError:
            status = BackendStatus.down(State.UNREACHABLE, f"no answer within {self._poll_timeout:g}s")
        except Exception as exc:  # a bug here must cost one backend one poll, never the agent
            log.exception("%s: unexpected error while polling", backend.name)
            status = BackendStatus.down(State.ERROR, f"agent error while polling ({type(exc).__name__})")
        self._state.update(backend.name, status, time.time())
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
