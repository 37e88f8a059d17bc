"""What the agent knows about one backend after a poll: plain data, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    PENDING = "pending"  # not polled yet
    READY = "ready"
    LOADING = "loading"  # /health answered 503: the model is still loading
    UNREACHABLE = "unreachable"  # connect failure, timeout, connection cut
    UNAUTHORIZED = "unauthorized"  # 401/403: API key missing or wrong
    ERROR = "error"  # answered, but not like a usable llama.cpp server


class SlotSource(enum.Enum):
    """Where the slot counts came from, best first; operators see it in the reply comment."""

    SLOTS = "slots"  # GET /slots
    LEGACY_HEALTH = "health"  # old /health with slots_idle/slots_processing, or a downstream balancer
    METRICS = "metrics"  # /slots disabled; llamacpp:requests_processing from /metrics
    CONFIGURED = "configured"  # /slots and /metrics disabled; busy slots unknown


@dataclass(frozen=True)
class BackendStatus:
    state: State
    reason: str = ""
    slots_total: int = 0
    slots_processing: int = 0
    slot_source: SlotSource | None = None
    model: str | None = None
    sleeping: bool = False

    @property
    def slots_idle(self) -> int:
        return max(0, self.slots_total - self.slots_processing)

    @classmethod
    def down(cls, state: State, reason: str) -> BackendStatus:
        return cls(state=state, reason=reason)


PENDING = BackendStatus(State.PENDING, "awaiting first poll")
