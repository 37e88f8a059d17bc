"""One plain-data view of the fleet, shared by /api/v1/agents, the dashboard, /metrics and StatsD."""

from __future__ import annotations

from typing import Any

from agentcheck.monitor import FleetState
from agentcheck.status import State


def fleet_snapshot(state: FleetState, standby: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Per-backend rows plus fleet totals over ready backends (a drained backend's idle slots
    do not count: nothing new will be sent there)."""
    agents = []
    totals = {"slots_idle": 0, "slots_processing": 0, "slots_total": 0}
    for name in state.names:
        status = state.status(name)
        backend = state.backend(name)
        drained = state.is_drained(name)
        ready = status.state is State.READY
        agents.append({
            "name": name,
            "address": str(backend.address),
            "standby": name in standby,
            "state": status.state.value,
            "reason": status.reason,
            "drained": drained,
            "slots_idle": status.slots_idle if ready else 0,
            "slots_processing": status.slots_processing if ready else 0,
            "slots_total": status.slots_total if ready else 0,
            "slot_source": status.slot_source.value if ready and status.slot_source else None,
            "model": status.model,
            "last_update": state.updated_at(name),
            "agent_check_reply": (state.reply_for(name) or "").rstrip("\n"),
        })
        if ready:
            totals["slots_idle"] += 0 if drained else status.slots_idle
            totals["slots_processing"] += status.slots_processing
            totals["slots_total"] += status.slots_total
    return {"agents": agents, "totals": totals, "requests_buffered": state.requests_buffered}
