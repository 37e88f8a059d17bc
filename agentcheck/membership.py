"""Who is in the fleet while the agent runs: registrations, heartbeats, graceful leaving, SIGHUP re-reads.

The one writer of membership in the model (``FleetModel.add``/``set_leaving``/``remove``). A backend
that leaves first stops getting new requests (the agent answers it ``drain``), and is removed only
once llama-server itself, polled after the leaving began, reports nothing running there, or it is
down: the server's own count also sees streams that another proxy process placed.

No I/O here: the management API and the signal handler call in, a periodic ``sweep`` (each poll
interval) expires missed heartbeats and removes backends that have finished leaving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agentcheck.model import FleetModel, Member, Origin, Role
from fleet import Backend, Fleet, FleetError, parse_backend
from fleet.schema import socket_key

log = logging.getLogger("paddler.agent")

# What a registration may carry: an api_key_env would make the agent send any of its own environment
# variables (the operator token, say) to an address the caller chose.
REGISTRATION_KEYS = frozenset({"name", "address", "slots", "api_key", "models"})


class Refused(Exception):
    """A registration change that was not made: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Registered:
    member: Member
    created: bool  # False: a heartbeat for a registration that already existed


class Membership:
    def __init__(self, model: FleetModel, fleet: Fleet, clock: Callable[[], float] = time.monotonic) -> None:
        self._model = model
        self._fleet = fleet
        self._clock = clock
        self._expires: dict[str, float] = {}  # registered backend → when it leaves without a heartbeat
        self._leaving_since: dict[str, float] = {}

    @property
    def fleet(self) -> Fleet:
        """The fleet file as last read (at start or on SIGHUP)."""
        return self._fleet

    def expires_in(self, name: str) -> float | None:
        deadline = self._expires.get(name)
        return None if deadline is None else max(0.0, deadline - self._clock())

    def register(self, data: Any, name: str | None = None) -> Registered:
        """Add a backend, or refresh its heartbeat when it is already registered with that address.
        ``name`` is the one in the URL, if any; the body may repeat it."""
        backend = self._parse(data, name)
        existing = self._model.get(backend.name)
        if existing is not None:
            if existing.origin is not Origin.REGISTERED:
                raise Refused(409, f"{backend.name!r} is in the fleet file; change it there")
            if existing.backend != backend:
                raise Refused(409, f"{backend.name!r} is registered with {existing.backend.address}; "
                                   "deregister it first")
            self._expires[backend.name] = self._clock() + self._fleet.agent.registration_timeout
            if existing.leaving:
                self._leaving_since.pop(backend.name, None)
                existing = self._model.set_leaving(backend.name, False, "registered again")
            return Registered(existing, created=False)
        self._refuse_taken_address(backend)
        limit = self._fleet.agent.max_registered_backends
        if sum(member.origin is Origin.REGISTERED for member in self._model) >= limit:
            raise Refused(409, f"at most {limit} registered backends (agent.max_registered_backends)")
        member = self._model.add(backend, Origin.REGISTERED)
        self._expires[backend.name] = self._clock() + self._fleet.agent.registration_timeout
        return Registered(member, created=True)

    def deregister(self, name: str) -> Member:
        member = self._model.get(name)
        if member is None:
            raise Refused(404, f"no backend named {name!r}")
        if member.origin is not Origin.REGISTERED:
            raise Refused(409, f"{name!r} is in the fleet file; remove it there and send the agent SIGHUP")
        self._expires.pop(name, None)
        return self._leave(name, "deregistered")

    def reload(self, fleet: Fleet) -> list[str]:
        """Take the fleet file's backends as re-read (SIGHUP): new ones join, missing ones leave. What
        cannot change while running is logged and left as it is; returns those warnings."""
        warnings = []
        if (fleet.agent, fleet.balancer, fleet.statsd) != (self._fleet.agent, self._fleet.balancer,
                                                             self._fleet.statsd):
            warnings.append("agent, balancer and statsd settings take effect at the next restart")
        wanted = {backend.name: (backend, role) for role, group in ((Role.PRIMARY, fleet.backends),
                                                                    (Role.STANDBY, fleet.standby))
                  for backend in group}
        for current in list(self._model):
            if current.origin is Origin.FLEET_FILE and current.name not in wanted:
                self._leave(current.name, "removed from the fleet file")
        for name, (backend, role) in wanted.items():
            member = self._model.get(name)
            if member is None:
                self._model.add(backend, Origin.FLEET_FILE, role)
            elif member.origin is Origin.REGISTERED:
                warnings.append(f"{name!r} is registered: deregister it before it can come from the file")
            elif (member.backend, member.role) != (backend, role):
                warnings.append(f"{name!r} changed (address, role or keys): remove it, reload, then add it back")
            elif member.leaving:
                self._leaving_since.pop(name, None)
                self._model.set_leaving(name, False, "back in the fleet file")
        self._fleet = fleet
        for warning in warnings:
            log.warning("fleet reload: %s", warning)
        return warnings

    def sweep(self) -> None:
        """Registrations whose heartbeat stopped start leaving; leavers that have finished are removed."""
        now = self._clock()
        for name, deadline in list(self._expires.items()):
            if deadline <= now:
                del self._expires[name]
                self._leave(name, f"no heartbeat for {self._fleet.agent.registration_timeout:g}s")
        for name, since in list(self._leaving_since.items()):
            member = self._model.get(name)
            if member is None:
                del self._leaving_since[name]
            elif finished_leaving(member, since):
                del self._leaving_since[name]
                self._model.remove(name)

    def _leave(self, name: str, reason: str) -> Member:
        self._leaving_since.setdefault(name, self._clock())
        return self._model.set_leaving(name, True, reason)

    def _parse(self, data: Any, name: str | None) -> Backend:
        if not isinstance(data, Mapping):
            raise Refused(400, "expected a JSON object like {\"name\": \"gpu7\", \"address\": \"10.0.0.17:8080\"}")
        unknown = sorted(str(key) for key in data if key not in REGISTRATION_KEYS)
        if unknown:
            raise Refused(400, f"{unknown[0]}: not allowed in a registration "
                               f"(allowed: {', '.join(sorted(REGISTRATION_KEYS))})")
        if name is not None:
            if data.get("name", name) != name:
                raise Refused(400, "name: the body names another backend than the URL")
            data = {**data, "name": name}
        try:
            return parse_backend(data, source="registration", path="backend")
        except FleetError as exc:
            raise Refused(400, f"{exc.key}: {exc.problem}") from None

    def _refuse_taken_address(self, backend: Backend) -> None:
        key = socket_key(backend.address)
        for member in self._model:
            if socket_key(member.backend.address) == key:
                raise Refused(409, f"{backend.address} is already backend {member.name!r}")
        agent, balancer = self._fleet.agent, self._fleet.balancer
        for what, address in (("agent.listen", agent.listen), ("agent.management", agent.management),
                              ("balancer.listen", balancer.listen), ("balancer.metrics_listen",
                                                                     balancer.metrics_listen)):
            if address is not None and socket_key(address) == key:
                raise Refused(409, f"{backend.address} is this fleet's {what}")


def finished_leaving(member: Member, since: float) -> bool:
    """Nothing more can run there: the server is not ready, or a poll that started after the leaving
    began found no slot processing (streams placed before are either seen running or over)."""
    if not member.ready:
        return True
    return member.poll is not None and member.poll.started > since and member.status.slots_processing == 0
