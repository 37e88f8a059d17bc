"""paddler-agent: llama.cpp slot awareness for HAProxy's agent-check and Envoy's picker.

Re-exports the pure core only (no I/O, no aiohttp): the fleet model, the status a poll yields
and the policy that turns it into an agent-check reply. The process is ``agentcheck.server.Agent``.
"""

from agentcheck.model import FleetModel, Member, PollWindow, Role
from agentcheck.policy import WeightFormula, agent_reply, invalid_request_reply, unknown_backend_reply, weight_percent
from agentcheck.protocol import Request, parse_request
from agentcheck.replies import AgentCheckReplies
from agentcheck.status import PENDING, BackendStatus, SlotSource, State

__all__ = [
    "PENDING",
    "AgentCheckReplies",
    "BackendStatus",
    "FleetModel",
    "Member",
    "PollWindow",
    "Request",
    "Role",
    "SlotSource",
    "State",
    "WeightFormula",
    "agent_reply",
    "invalid_request_reply",
    "parse_request",
    "unknown_backend_reply",
    "weight_percent",
]
