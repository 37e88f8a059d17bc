"""One plain-data view of the fleet, shared by /api/v1/agents, /health, the dashboard, /metrics and StatsD."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentcheck.haproxy_runtime import SparePool
from agentcheck.model import FleetModel, Member, Origin, Role
from agentcheck.model_routing import model_share, served_models

Snapshot = Callable[[], dict[str, Any]]


def fleet_snapshot(model: FleetModel, reply_for: Callable[[str], str | None], requests_buffered: int | None,
                   in_balancer: Callable[[str], bool], spares: SparePool | None = None,
                   buffered_for: Callable[[str], int | None] = lambda model: None) -> dict[str, Any]:
    """Per-backend rows plus fleet totals over ready backends (a drained or leaving backend's idle
    slots do not count: nothing new will be sent there). ``in_balancer``: whether Envoy has applied an
    endpoint list naming the backend (agentcheck.eds); until then the picker sends it nothing. With
    HAProxy's spare servers, which one each backend is on (None: its own server line, or none, see
    ``spare_servers.unplaced``). ``models``: per model, the slots of the backends that serve it (see
    ``_served``), whether any of them can take a request for it, and the requests waiting for it
    (``buffered_for``; None while unknown)."""
    agents = []
    totals = {"slots_idle": 0, "slots_processing": 0, "slots_total": 0}
    models: dict[str, dict[str, Any]] = {}
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
            "router": status.router,
            "models_declared": member.backend.models is not None,
            "models": _models(member),
            "last_update": member.updated_at,
            "poll_seconds": member.poll.seconds if member.poll else None,
            "agent_check_reply": (reply_for(member.name) or "").rstrip("\n"),
            "spare_server": spares.server_of(member.name) if spares else None,
        })
        if ready:
            totals["slots_idle"] += status.slots_idle if member.usable else 0
            totals["slots_processing"] += status.slots_processing
            totals["slots_total"] += status.slots_total
        for name, (total, processing, usable) in _served(member).items():
            row = models.setdefault(name, {"slots_idle": 0, "slots_processing": 0, "slots_total": 0, "usable": False})
            row["slots_idle"] += max(0, total - processing) if usable else 0
            row["slots_processing"] += processing
            row["slots_total"] += total
            row["usable"] = row["usable"] or usable
    for name, row in models.items():
        row["requests_buffered"] = buffered_for(name)
    usable = any(member.usable for member in model)
    snapshot = {"agents": agents, "totals": totals, "usable": usable, "requests_buffered": requests_buffered,
                "models": models}
    if spares is not None:
        snapshot["spare_servers"] = spares.summary()
    return snapshot


def _models(member: Member) -> list[dict[str, Any]]:
    """A backend's models: those the fleet declares for it (``backend.models``) in their order, then those it
    serves that are not declared. ``declared`` and ``discovered`` tell the two lists apart; a model's load
    state and slots come only from discovery (a down backend discovers nothing)."""
    discovered = {found.name: found for found in member.status.models} if member.ready else {}
    declared = member.backend.models or ()
    rows = []
    for name in (*declared, *(name for name in discovered if name not in declared)):
        found = discovered.get(name)
        rows.append({
            "name": name,
            "load": found.load.value if found else None,
            "slots_idle": found.slots_idle if found else 0,
            "slots_processing": found.slots_processing if found else 0,
            "slots_total": found.slots_total if found else 0,
            "declared": name in declared,
            "discovered": found is not None,
        })
    return rows


def _served(member: Member) -> dict[str, tuple[int, int, bool]]:
    """The models a backend serves, each with (slots, slots processing, may take a request for it now), by the
    rule the balancer's model pools follow (agentcheck.model_routing): declared models override discovery; a
    router's model has its own slots (none until loaded: a request loads it)."""
    served = {}
    for name in served_models(member.backend, member.status):
        share = model_share(member.backend, member.status, name)
        if member.ready and share is not None:
            served[name] = (share.slots_total, share.slots_processing, member.usable)
        else:
            served[name] = (0, 0, False)
    return served


def health(usable: bool, slots_idle: int, slots_processing: int,
           requests_buffered: int | None) -> tuple[dict[str, Any], int]:
    """Paddler's aggregated /health body and its HTTP status: 200 while any backend can take work."""
    body: dict[str, Any] = {"status": "ok" if usable else "unavailable", "slots_idle": slots_idle,
                            "slots_processing": slots_processing}
    if requests_buffered is not None:
        body["requests_buffered"] = requests_buffered
    return body, 200 if usable else 503
