"""Which of HAProxy's spare servers carries which member, and the runtime commands that make it so.

Pure: HAProxy's servers as the runtime API shows them, the members, the current assignment and
the members' resolved addresses in; the next assignment and the commands out. agentcheck.haproxy_runtime
does the I/O (docs/haproxy.md, "Servers that join without a reload", has the measurements).

* A primary member with no ``server`` line of its own (registered, or added to the fleet file by
  SIGHUP) gets a free spare once it is ready, and keeps it while it is a member. Not before: HAProxy
  agent-checks a spare even in maintenance, and a ``down`` for one makes its first weight 0%
  for the return window (agentcheck.replies), a second or more before it gets requests. A standby
  member cannot use one: a spare is never ``backup``, and that is fixed in the config.
* Filling a spare: address, maxconn (the member's slots, else 1), weight 0, then ``state ready``.
  Leaving maintenance, HAProxy 2.6 puts the server UP at once; at weight 0 it takes nothing from
  the queue uncounted (the over-commit policy.py describes), and the agent's reply for the spare's
  name gives it its weight through the counted paths. Until the commands are sent the spare is
  answered as empty (0%): a member's weight landing between ``weight 0`` and ``state ready`` would
  bring it UP weighted (seen: 2 requests deferred inside a 2-slot llama-server).
* A spare's admin state is set here and nowhere else: its agent-check replies carry its member's weight,
  maxconn and up/down but never ``ready`` or ``drain`` (policy.spare_reply), which HAProxy would apply
  to a disabled spare too. So a member drained by the operator or leaving has its spare put in
  ``state drain`` here, and back to ``state ready`` when that ends.
* Releasing one (its member removed, or given its own line by a reload): ``state drain`` while
  HAProxy shows sessions on it, then ``state maint`` and address 0.0.0.0:0, the look of an unused spare.
* Any difference between what HAProxy shows and the assignment is repaired the same way, so a
  reloaded HAProxy (all spares disabled again) is refilled at the next reconcile, but only once its
  llama-server reports no busy slot (or the wait is ``overdue``): after a reload the old worker still
  runs its streams there, and the new one, counting from zero, would fill the slots beside them
  (paddler.lua's handover does the same for the servers it has lines for).
"""

from __future__ import annotations

import csv
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from agentcheck.model import Member, Role
from fleet import SPARE_SERVER_PREFIX

EMPTY_ADDRESS = "0.0.0.0:0"


@dataclass(frozen=True)
class HAProxyServer:
    """One server of the backend as ``show stat`` lists it."""

    name: str
    status: str  # UP, DOWN, DRAIN, MAINT, "MAINT (resolution)", "UP 1/2", "no check", ...
    address: str  # addr column: 127.0.0.1:8080, [::1]:8080
    sessions: int  # scur

    @property
    def in_maintenance(self) -> bool:
        return self.status.startswith("MAINT")

    @property
    def draining(self) -> bool:
        return self.status.startswith("DRAIN")


@dataclass(frozen=True)
class Use:
    """A spare's job: carrying ``member``, or (``releasing``) letting its sessions end."""

    member: str
    releasing: bool = False


@dataclass(frozen=True)
class Plan:
    assignment: dict[str, Use]  # spare → use; spares not listed are free
    commands: list[str]
    filling: list[str]  # spares the commands fill: answered as empty until they are sent
    held: list[str]  # spares to refill once their llama-server has no busy slot (another process's streams)
    # Ready members with no server line in HAProxy: all spares taken, the address not resolved, or standby.
    unplaced: list[str]


def parse_show_stat(text: str, backend: str) -> dict[str, HAProxyServer]:
    """The backend's servers from ``show stat`` CSV (header line ``# pxname,svname,...``)."""
    lines = [line for line in text.splitlines() if line]
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not show stat output: {text[:80]!r}")
    header = lines[0][2:].split(",")
    column = {name: index for index, name in enumerate(header)}
    servers = {}
    # Real CSV: HAProxy quotes a field with a comma, such as an agent's reply comment in last_agt.
    for row in csv.reader(lines[1:]):
        if len(row) < len(header) - 1 or row[column["pxname"]] != backend:
            continue
        name = row[column["svname"]]
        if name in ("FRONTEND", "BACKEND"):
            continue
        servers[name] = HAProxyServer(name, row[column["status"]], row[column["addr"]],
                                      int(row[column["scur"]] or 0))
    return servers


def haproxy_address(ip: str, port: int) -> str:
    """An address as HAProxy's addr column writes it."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def plan(backend: str, members: Iterable[Member], servers: Mapping[str, HAProxyServer], spares: Sequence[str],
         assignment: Mapping[str, Use], addresses: Mapping[str, str | None], overdue: Collection[str] = (),
         adopting: bool = False) -> Plan:
    """The next assignment and the commands that bring HAProxy to it.

    ``addresses``: each member's host as an IP (None: not resolved yet); ``spares`` in the order
    free ones are handed out; ``overdue``: held spares to refill now, busy or not; ``adopting``: the
    agent has just started, and a spare HAProxy shows carrying an address no member has yet is left as
    it is, for its member to take back when it registers again (its streams keep their count there).
    """
    by_name = {member.name: member for member in members}
    static = {name for name in servers if not name.startswith(SPARE_SERVER_PREFIX)}
    wanted = [member for member in by_name.values()
              if member.role is Role.PRIMARY and member.name not in static and addresses.get(member.name)]
    target = {member.name: haproxy_address(addresses[member.name] or "", member.backend.address.port)
              for member in wanted}
    known = [spare for spare in spares if spare in servers]
    placed: dict[str, Use] = {}
    for spare, use in assignment.items():
        if spare not in servers:
            continue
        placed[spare] = use if not use.releasing and use.member in target else Use(use.member, releasing=True)
    # Still free: a spare that HAProxy already shows carrying a member (an agent restarted under a
    # running HAProxy) goes back to it, so its streams are not moved; then the first free one.
    free = [spare for spare in known if spare not in placed]
    carried = _carried(placed)
    for member in wanted:
        if member.name in carried or not member.ready:
            continue
        chosen = next((name for name in free if servers[name].address == target[member.name]
                       and not servers[name].in_maintenance), None) or next(iter(free), None)
        if chosen is None:
            break
        free.remove(chosen)
        placed[chosen] = Use(member.name)
        carried.add(member.name)
    commands = []
    filling = []
    held = []
    for spare in known:
        server = servers[spare]
        current = placed.get(spare)
        if current is not None and not current.releasing:
            member = by_name[current.member]
            drain = member.drained or member.leaving
            if server.address != target[current.member] or server.in_maintenance:
                if (assignment.get(spare) == current and member.ready and member.status.slots_processing > 0
                        and spare not in overdue):
                    held.append(spare)
                    continue
                filling.append(spare)
                commands += _fill(backend, spare, server, addresses[current.member] or "",
                                  member.backend.address.port, member.status.slots_total if member.ready else 0,
                                  drain)
            elif drain != server.draining:
                commands.append(f"set server {backend}/{spare} state {'drain' if drain else 'ready'}")
        elif current is not None and server.sessions > 0 and not server.in_maintenance:
            if not server.draining:
                commands.append(f"set server {backend}/{spare} state drain")
        elif adopting and current is None and not server.in_maintenance and server.address != EMPTY_ADDRESS:
            continue
        else:
            placed.pop(spare, None)
            if not server.in_maintenance or server.address != EMPTY_ADDRESS:
                commands += [f"set server {backend}/{spare} state maint",
                             f"set server {backend}/{spare} addr 0.0.0.0 port 0"]
    carried = _carried(placed)
    unplaced = [member.name for member in by_name.values()
                if member.ready and member.name not in static and member.name not in carried]
    return Plan(placed, commands, filling, held, unplaced)


def _carried(assignment: Mapping[str, Use]) -> set[str]:
    return {use.member for use in assignment.values() if not use.releasing}


def _fill(backend: str, spare: str, server: HAProxyServer, ip: str, port: int, slots: int,
          drain: bool) -> list[str]:
    server_id = f"{backend}/{spare}"
    maint = [] if server.in_maintenance else [f"set server {server_id} state maint"]
    return [*maint,
            f"set server {server_id} addr {ip} port {port}",
            f"set maxconn server {server_id} {max(slots, 1)}",
            f"set weight {server_id} 0",
            f"set server {server_id} state {'drain' if drain else 'ready'}"]
