"""The fleet as the agent knows it: one owner for every backend's role, status, drain and poll window.

Everything else reads immutable ``Member`` views and hears about changes through the one
subscription the agent wires at start-up (``FleetModel.subscribe``). Only the monitor records
polls and only the operator endpoints drain: no other module writes here.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from agentcheck.status import PENDING, BackendStatus, State
from fleet import Backend, Fleet

log = logging.getLogger("paddler.agent")


class Role(enum.Enum):
    PRIMARY = "primary"
    STANDBY = "standby"  # used only while no primary is usable


@dataclass(frozen=True)
class PollWindow:
    """When the poll behind a status ran (monotonic seconds): what it can and cannot have seen."""

    started: float
    finished: float

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class Member:
    backend: Backend
    role: Role
    status: BackendStatus = PENDING
    drained: bool = False
    updated_at: float | None = None  # wall-clock time of the last poll result
    poll: PollWindow | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def ready(self) -> bool:
        return self.status.state is State.READY

    @property
    def usable(self) -> bool:
        """May get new requests: ready and not drained by an operator."""
        return self.ready and not self.drained


Listener = Callable[[Member, Member], None]  # (previous, current)


class FleetModel:
    def __init__(self, primaries: Iterable[Backend], standby: Iterable[Backend] = ()) -> None:
        self._members: dict[str, Member] = {}
        for role, backends in ((Role.PRIMARY, primaries), (Role.STANDBY, standby)):
            for backend in backends:
                self._members[backend.name] = Member(backend, role)
        self._listeners: list[Listener] = []

    @classmethod
    def from_fleet(cls, fleet: Fleet) -> FleetModel:
        return cls(fleet.backends, fleet.standby)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(previous, current)`` after every change to a member, in subscription order."""
        self._listeners.append(listener)

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members.values())

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def get(self, name: str) -> Member | None:
        return self._members.get(name)

    def __getitem__(self, name: str) -> Member:
        return self._members[name]

    def record_poll(self, name: str, status: BackendStatus, now: float, window: PollWindow) -> None:
        previous = self._members[name]
        if previous.status.state is not status.state:
            log.info("%s: %s -> %s%s", name, previous.status.state.value, status.state.value,
                     f" ({status.reason})" if status.reason else "")
        elif previous.status.reason != status.reason:  # same state, new wording: not news at info level
            log.debug("%s: still %s (%s)", name, status.state.value, status.reason)
        self._set(previous, replace(previous, status=status, updated_at=now, poll=window))

    def set_drained(self, name: str, drained: bool) -> Member:
        """Operator drain (or undo): no new requests for this backend; running ones finish."""
        previous = self._members[name]  # KeyError for a name not in the fleet
        if drained != previous.drained:
            log.info("%s: %s by operator", name, "drained" if drained else "ready again")
        return self._set(previous, replace(previous, drained=drained))

    def _set(self, previous: Member, current: Member) -> Member:
        self._members[current.name] = current
        for listener in self._listeners:
            listener(previous, current)
        return current
