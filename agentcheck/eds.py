"""The llama cluster's endpoints, served to Envoy over REST xDS (EDS), and which of them Envoy has applied.

Envoy asks ``POST /v3/discovery:endpoints``; the ``version_info`` of each request is the version it last
applied (REST xDS has no NACK: a rejected update just leaves the older version there). The picker places
requests only on members Envoy has applied, since override_host ignores an address its cluster does not
have and least_request would choose instead. Every member is listed, ready or not (Envoy's health checks
and the picker decide who gets requests), leaving ones too until they are removed, as their streams must
finish; the version changes only when the list does.

A request that already has the current version is held until the list changes (at most
contract.EDS_HOLD_SECONDS, then 304 Not Modified): Envoy hears of a change at once, and an unchanging
fleet costs one request per hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
from collections.abc import Callable, Iterable

from agentcheck.model import FleetModel, Member, Role
from fleet import contract

log = logging.getLogger("paddler.agent")

TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
PRIORITY = {Role.PRIMARY: 0, Role.STANDBY: 1}  # standby: used when no primary passes its health check

Endpoint = tuple[int, str, str, int]  # priority, name, host, port


def endpoint(member: Member) -> Endpoint | None:
    """What Envoy is told about a member; None for a host name, which Envoy would reject along with the
    whole update (override_host matches IP:port)."""
    address = member.backend.address
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return None
    return PRIORITY[member.role], member.name, address.host, address.port


def load_assignment(endpoints: Iterable[Endpoint]) -> dict[str, object]:
    """The ClusterLoadAssignment for these endpoints, one group per priority, as in the generated STATIC
    cluster before: the endpoint's metadata names the backend."""
    groups: dict[int, list[dict[str, object]]] = {}
    for priority, name, host, port in sorted(endpoints):
        groups.setdefault(priority, []).append({
            "endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}},
            "metadata": {"filter_metadata": {"paddler": {"name": name}}},
        })
    return {"@type": TYPE_URL, "cluster_name": contract.EDS_CLUSTER,
            "endpoints": [{"priority": priority, "lb_endpoints": lb_endpoints}
                          for priority, lb_endpoints in sorted(groups.items())]}


class EndpointDiscovery:
    """Owns the served version and what Envoy acknowledged. Versions are ``<epoch>.<counter>``, the epoch
    random per agent process, so a restarted agent never mistakes an older agent's version for its own."""

    def __init__(self, model: FleetModel) -> None:
        self._epoch = secrets.token_hex(4)
        self._counter = 0
        self._endpoints: dict[str, Endpoint] = {}
        self._since: dict[str, int] = {}  # member → the first version that lists it
        self._acknowledged: int | None = None
        self._asked = False
        self._body = b""
        self._changed = asyncio.Event()
        self._closed = False
        self._listeners: list[Callable[[], None]] = []
        for member in model:
            self._enter(member)
        self._publish()

    @property
    def version(self) -> str:
        return f"{self._epoch}.{self._counter}"

    @property
    def body(self) -> bytes:
        """The DiscoveryResponse for the current version, encoded once per version."""
        return self._body

    def when_acknowledged(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when Envoy acknowledges a new version: members it lists may now get requests."""
        self._listeners.append(listener)

    def acknowledged(self, name: str) -> bool:
        """May the picker send requests to this member: Envoy has applied a version that lists it. Until an
        Envoy first asks, every member may (a balancer that never asks has them from its own config)."""
        if not self._asked:
            return True
        since = self._since.get(name)
        return since is not None and self._acknowledged is not None and since <= self._acknowledged

    def on_member_change(self, previous: Member | None, current: Member | None) -> None:
        """The model's subscription: a join, a removal or a new address is a new version; polls are not."""
        if current is None:
            assert previous is not None
            self._endpoints.pop(previous.name, None)
            self._since.pop(previous.name, None)
        elif previous is not None and endpoint(previous) == endpoint(current):
            return
        else:
            self._enter(current)
        self._publish()

    def record_request(self, version_info: str, error_detail: bool) -> None:
        """Envoy's request says which version it has applied; one carrying an error applied nothing new."""
        self._asked = True
        if error_detail:
            return
        epoch, _, counter = version_info.partition(".")
        applied = int(counter) if epoch == self._epoch and counter.isdigit() else None
        if applied == self._acknowledged:
            return
        self._acknowledged = applied
        if applied is not None:
            for listener in self._listeners:
                listener()

    async def wait_for_change(self, version: str, timeout: float) -> bool:
        """Whether the version moved on from ``version`` within ``timeout`` seconds (False at shutdown)."""
        if version != self.version:
            return True
        changed = self._changed
        if not self._closed:
            try:
                async with asyncio.timeout(timeout):
                    await changed.wait()
            except TimeoutError:
                pass
        return version != self.version

    def close(self) -> None:
        """Answer held requests now, so that shutting the agent down does not wait for their hold to end."""
        self._closed = True
        self._changed.set()

    def _enter(self, member: Member) -> None:
        entry = endpoint(member)
        if entry is None:
            log.warning("%s: not listed for Envoy, whose endpoints must be IP addresses (%s)",
                        member.name, member.backend.address)
            self._endpoints.pop(member.name, None)
            self._since.pop(member.name, None)
            return
        self._endpoints[member.name] = entry
        self._since[member.name] = self._counter + 1

    def _publish(self) -> None:
        self._counter += 1
        self._body = json.dumps({
            "version_info": self.version,
            "resources": [load_assignment(self._endpoints.values())],
            "type_url": TYPE_URL,
            "nonce": str(self._counter),
        }).encode()
        self._changed.set()
        self._changed = asyncio.Event()
