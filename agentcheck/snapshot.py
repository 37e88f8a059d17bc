"""One plain-data view of the fleet, shared by /api/v1/agents, /health, the dashboard, /metrics and StatsD."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentcheck.haproxy_runtime import SparePool
from agentcheck.model import FleetModel, Origin, Role

Snapshot = Callable[[], dict[str, Any]]


def fleet_snapshot(model: FleetModel, reply_for: Callable[[str], str | None], requests_buffered: int | None,
                   in_balancer: Callable[[str], bool], spares: SparePool | None = None) -> dict[str, Any]:
    """Per-backend rows plus fleet totals over ready backends (a drained or leaving backend's idle
    slots do not count: nothing new will be sent there). ``in_balancer``: whether Envoy has applied an
    endpoint list naming the backend (agentcheck.eds); until then the picker sends it nothing. With
    HAProxy's spare servers, which one each backend is on (None: its own server line, or none, see
    ``spare_servers.unplaced``)."""
    agents = []
    totals = {"slots_idle": 0, "slots_processing": 0, "slots_total": 0}
    for member in model:
        status = member.status
        ready = member.ready
        agents.append({
            "name": member.name,
            "address": str(member.backend.address),
            "standby": member.role is Role.STANDBY,
            "state": status.state.value,
            "reason": status.reason,
            "drained": member.drained,
            "leaving": member.leaving,
            "registered": member.origin is Origin.REGISTERED,
            "in_balancer": in_balancer(member.name),
            "slots_idle": status.slots_idle if ready else 0,
            "slots_processing": status.slots_processing if ready else 0,
            "slots_total": status.slots_total if ready else 0,
            "slot_source": status.slot_source.value if ready and status.slot_source else None,
            "model": status.model,
            "last_update": member.updated_at,
            "poll_seconds": member.poll.seconds if member.poll else None,
            "agent_check_reply": (reply_for(member.name) or "").rstrip("\n"),
            "spare_server": spares.server_of(member.name) if spares else None,
        })
        if ready:
            totals["slots_idle"] += status.slots_idle if member.usable else 0
            totals["slots_processing"] += status.slots_processing
            totals["slots_total"] += status.slots_total
    usable = any(member.usable for member in model)
    snapshot = {"agents": agents, "totals": totals, "usable": usable, "requests_buffered": requests_buffered}
    if spares is not None:
        snapshot["spare_servers"] = spares.summary()
    return snapshot


def health(usable: bool, slots_idle: int, slots_processing: int,
           requests_buffered: int | None) -> tuple[dict[str, Any], int]:
    """Paddler's aggregated /health body and its HTTP status: 200 while any backend can take work."""
    body: dict[str, Any] = {"status": "ok" if usable else "unavailable", "slots_idle": slots_idle,
                            "slots_processing": slots_processing}
    if requests_buffered is not None:
        body["requests_buffered"] = requests_buffered
    return body, 200 if usable else 503
