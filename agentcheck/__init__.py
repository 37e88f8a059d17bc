"""paddler-agent: llama.cpp slot awareness for HAProxy's agent-check (and, later, Envoy)."""

from agentcheck.config import AgentSettings
from agentcheck.llamacpp import Failure, LlamaCppClient, Reply, interpret
from agentcheck.monitor import FleetState, Monitor
from agentcheck.policy import WeightFormula, agent_reply, invalid_request_reply, unknown_backend_reply, weight_percent
from agentcheck.protocol import Request, parse_request
from agentcheck.server import Agent
from agentcheck.status import PENDING, BackendStatus, SlotSource, State

__all__ = [
    "PENDING",
    "Agent",
    "AgentSettings",
    "BackendStatus",
    "Failure",
    "FleetState",
    "LlamaCppClient",
    "Monitor",
    "Reply",
    "Request",
    "SlotSource",
    "State",
    "WeightFormula",
    "agent_reply",
    "interpret",
    "invalid_request_reply",
    "parse_request",
    "unknown_backend_reply",
    "weight_percent",
]
