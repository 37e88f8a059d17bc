"""The fleet as the agent knows it: one owner for every backend's role, status, drain and poll window.

Everything else reads immutable ``Member`` views and hears about changes through the one
subscription the agent wires at start-up (``FleetModel.subscribe``): a member that joins comes
as ``(None, member)``, one that is removed as ``(member, None)``. Only the monitor records polls,
only the operator endpoints drain, and only the membership (agentcheck.membership) adds, marks
leaving and removes: no other module writes here.
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


class Origin(enum.Enum):
    """Where a member came from, which decides who may remove it."""

    FLEET_FILE = "fleet file"  # removed by editing the file and SIGHUP
    REGISTERED = "registered"  # by the management API; leaves on DELETE or a missed heartbeat


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
    origin: Origin = Origin.FLEET_FILE
    # Leaving the fleet (deregistered, missed heartbeats, gone from the file): no new requests;
    # removed once the server itself reports nothing running, or is down.
    leaving: bool = False

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def ready(self) -> bool:
        return self.status.state is State.READY

    @property
    def usable(self) -> bool:
        """May get new requests: ready, not drained by an operator, not leaving."""
        return self.ready and not self.drained and not self.leaving


Listener = Callable[[Member | None, Member | None], None]  # (previous, current); None: joined or removed


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
        """Call ``listener(previous, current)`` after every change to a member, in subscription order;
        ``previous`` is None for a member that joined, ``current`` None for one removed."""
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

    def add(self, backend: Backend, origin: Origin, role: Role = Role.PRIMARY) -> Member:
        """A backend joins; it gets requests after its first ready poll, like one from the fleet file."""
        if backend.name in self._members:
            raise KeyError(f"{backend.name} is already a member")
        member = self._members[backend.name] = Member(backend, role, origin=origin)
        log.info("%s: joined (%s, %s)", backend.name, origin.value, backend.address)
        self._notify(None, member)
        return member

    def set_leaving(self, name: str, leaving: bool, reason: str) -> Member:
        """No new requests for this backend from now on (``remove`` follows once it has finished), or
        (``leaving`` False) it stays after all."""
        previous = self._members[name]
        if previous.leaving == leaving:
            return previous
        log.info("%s: %s (%s)", name, "leaving" if leaving else "staying", reason)
        return self._set(previous, replace(previous, leaving=leaving))

    def remove(self, name: str) -> Member:
        member = self._members.pop(name)
        log.info("%s: removed", name)
        self._notify(member, None)
        return member

    def _set(self, previous: Member, current: Member) -> Member:
        self._members[current.name] = current
        self._notify(previous, current)
        return current

    def _notify(self, previous: Member | None, current: Member | None) -> None:
        for listener in self._listeners:
            listener(previous, current)
