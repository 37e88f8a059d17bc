"""HAProxy's runtime API (the stats socket), and the loop that keeps its spare servers filled.

The I/O around agentcheck.spares: read ``show stat`` for the backend, resolve the members' host
names, plan, publish the assignment to the agent-check replies, send the commands. It runs every
agent interval and at once when a member joins, becomes ready, leaves, is drained or is removed,
and reads HAProxy's state each time rather than trusting what it sent, so a reloaded HAProxy (every
spare disabled again) is refilled within an interval. Nothing here may stop the agent: a socket that
is missing, slow or refusing is logged, and the next round tries again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agentcheck.model import FleetModel, Member, Role
from agentcheck.replies import AgentCheckReplies
from agentcheck.spares import Use, is_ip, parse_show_stat, plan

log = logging.getLogger("paddler.agent")

COMMAND_TIMEOUT = 2.0
# A spare lost by a reload waits for its llama-server's other streams (the old worker's) at most this
# long, like paddler.lua's handover: traffic that bypasses HAProxy must not keep it empty for good.
REFILL_WAIT = 600.0
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # show stat for a 1,000-server backend is about 1.5 MB

Resolver = Callable[[str, int], Awaitable[str]]


class RuntimeAPI:
    """One command per connection (HAProxy's non-interactive mode: it answers, then closes)."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    async def command(self, line: str) -> str:
        """HAProxy's answer; OSError or TimeoutError when the socket does not give one in time."""
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_unix_connection(self.path)
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                answer = await reader.read(MAX_ANSWER_BYTES)
                while chunk := await reader.read(MAX_ANSWER_BYTES - len(answer)):
                    answer += chunk
                return answer.decode(errors="replace")
            finally:
                writer.close()


def command_failed(answer: str) -> bool:
    """HAProxy says nothing to a `set` it performed, except for addresses, which it reports as changed."""
    text = answer.strip()
    return bool(text) and "changed from" not in text and not text.startswith("no need to change")


async def resolve(host: str, port: int) -> str:
    """A DNS name's first address: HAProxy's `set server addr` takes only IPs."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return str(infos[0][4][0])


class SparePool:
    """Owns which spare server carries which member; the replies and the snapshot read it."""

    def __init__(self, model: FleetModel, replies: AgentCheckReplies, api: RuntimeAPI, backend: str,
                 spares: Sequence[str], interval: float, adopt_for: float = 0.0, resolver: Resolver = resolve,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._model = model
        self._replies = replies
        self._api = api
        self._backend = backend
        self._spares = list(spares)
        self._interval = interval
        self._resolver = resolver
        self._assignment: dict[str, Use] = {}
        self._addresses: dict[str, str] = {}  # member → the IP its spare points at, resolved once
        self._unresolved: set[str] = set()  # members whose name did not resolve (logged once each)
        self._held_since: dict[str, float] = {}  # spare → when its refill began to wait for busy slots
        self._clock = clock
        # After a start, registrations come back with their next heartbeat: until then a spare that HAProxy
        # shows carrying someone is kept for them (agentcheck.spares, ``adopting``).
        self._adopt_until = clock() + adopt_for
        self._wake = asyncio.Event()
        self._unreachable = False  # the socket failed last time: log the next failure at debug only
        self.unplaced: list[str] = []  # members with no server line in HAProxy (logged once each)

    def on_member_change(self, previous: Member | None, current: Member | None) -> None:
        """The model's subscription: a join, a first ready poll, a removal, a drain, a leaving, or slots
        freed while a refill waits for them, is reconciled now, not at the next interval."""
        if previous is None or current is None:
            if current is None and previous is not None:
                self._addresses.pop(previous.name, None)
                self._unresolved.discard(previous.name)
            self._wake.set()
        elif (previous.ready != current.ready or previous.drained != current.drained
              or previous.leaving != current.leaving
              or (self._held_since and current.status.slots_processing < previous.status.slots_processing)):
            self._wake.set()

    def server_of(self, member: str) -> str | None:
        """The spare server carrying this member, if any."""
        return next((spare for spare, use in self._assignment.items()
                     if use.member == member and not use.releasing), None)

    def summary(self) -> dict[str, Any]:
        """For the snapshot: how many spares are in use, and who has no server line in HAProxy."""
        return {"total": len(self._spares), "used": len(self._assignment), "unplaced": list(self.unplaced),
                "waiting_for_other_requests": sorted(self._held_since)}

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # a bug here must not end the loop: the next round may well succeed
                log.exception("spare servers: reconcile failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass

    async def reconcile(self) -> None:
        """One round: HAProxy's state → plan → replies → commands."""
        try:
            servers = parse_show_stat(await self._api.command(f"show stat {self._backend} 4 -1"), self._backend)
        except (OSError, TimeoutError, ValueError) as exc:
            log.log(logging.DEBUG if self._unreachable else logging.WARNING,
                    "spare servers: cannot read HAProxy's servers on %s: %s", self._api.path, _reason(exc))
            self._unreachable = True
            return
        if self._unreachable:
            log.info("spare servers: HAProxy's runtime API on %s answers again", self._api.path)
            self._unreachable = False
        members = list(self._model)
        await self._resolve([member for member in members if member.name not in servers])
        now = self._clock()
        overdue = {spare for spare, since in self._held_since.items() if now - since >= REFILL_WAIT}
        result = plan(self._backend, members, servers, self._spares, self._assignment, self._addresses, overdue,
                      adopting=now < self._adopt_until)
        for spare in result.held:
            if spare not in self._held_since:
                log.info("%s: %s is refilled once the requests another HAProxy process runs there end "
                         "(at most %gs)", result.assignment[spare].member, spare, REFILL_WAIT)
        self._held_since = {spare: self._held_since.get(spare, now) for spare in result.held}
        for spare in result.filling:
            if self._assignment.get(spare) == result.assignment[spare]:
                log.info("%s: refilling %s, which HAProxy shows empty (reloaded or restarted)",
                         result.assignment[spare].member, spare)
        self._log_changes(result.assignment, result.unplaced)
        self._assignment = result.assignment
        answered = {spare: None if use.releasing else use.member for spare, use in result.assignment.items()}
        # A spare being filled is answered as empty (0%) until it is UP at weight 0 (agentcheck.spares).
        self._replies.set_spares({spare: use for spare, use in answered.items() if spare not in result.filling})
        for command in result.commands:
            await self._send(command)
        if result.filling:
            self._replies.set_spares(answered)

    async def _resolve(self, members: list[Member]) -> None:
        for member in members:
            host, port = member.backend.address.host, member.backend.address.port
            if member.name in self._addresses:
                continue
            if is_ip(host):
                self._addresses[member.name] = host
                continue
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    self._addresses[member.name] = await self._resolver(host, port)
            except (OSError, TimeoutError, IndexError) as exc:
                if member.name not in self._unresolved:
                    log.warning("%s: cannot resolve %s for its spare server (retried every interval): %s",
                                member.name, host, _reason(exc))
                self._unresolved.add(member.name)
            else:
                self._unresolved.discard(member.name)

    async def _send(self, command: str) -> None:
        try:
            answer = await self._api.command(command)
        except (OSError, TimeoutError) as exc:
            log.warning("spare servers: %r not sent: %s", command, _reason(exc))
            return
        if command_failed(answer):
            log.warning("spare servers: HAProxy refused %r: %s", command, answer.strip()[:200])
        else:
            log.debug("spare servers: %s", command)

    def _log_changes(self, assignment: dict[str, Use], unplaced: list[str]) -> None:
        for spare, use in assignment.items():
            if self._assignment.get(spare) != use:
                log.info("%s: %s HAProxy server %s", use.member,
                         "leaving" if use.releasing else "on", spare)
        for spare, use in self._assignment.items():
            if spare not in assignment:
                log.info("%s: empty again (was %s)", spare, use.member)
        for name in unplaced:
            if name not in self.unplaced:
                log.warning("%s: no HAProxy server, so no requests through HAProxy: %s", name, self._why_unplaced(name))
        self.unplaced = unplaced

    def _why_unplaced(self, name: str) -> str:
        member = self._model.get(name)
        if member is not None and member.role is Role.STANDBY:
            return "a spare server cannot be a standby (backup) server; add it to the fleet file and reload"
        if name not in self._addresses:
            return "its address is not resolved yet"
        return f"every spare server is taken (balancer.spare_servers: {len(self._spares)})"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
