"""What the agent knows about one backend after a poll: plain data, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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


class ModelLoad(enum.Enum):
    """A model's state on its server; only a llama.cpp router (``--models-dir``) has models that are not loaded."""

    LOADED = "loaded"
    LOADING = "loading"
    UNLOADED = "unloaded"  # a request naming it loads it (a cold load: slow, and counted)


@dataclass(frozen=True)
class ModelStatus:
    """One model a backend serves, with the slots that serve it: a plain llama-server's own slots, or, in
    router mode, those of the child llama-server running this model (0 while it is not loaded)."""

    name: str
    load: ModelLoad = ModelLoad.LOADED
    slots_total: int = 0
    slots_processing: int = 0

    @property
    def slots_idle(self) -> int:
        return max(0, self.slots_total - self.slots_processing)


@dataclass(frozen=True)
class BackendStatus:
    state: State
    reason: str = ""
    slots_total: int = 0
    slots_processing: int = 0
    slot_source: SlotSource | None = None
    model: str | None = None
    sleeping: bool = False
    # What the server serves, discovered (/v1/models, or /models in router mode), each with its own slots; a
    # router's slots_total and slots_processing are the sums over its loaded models.
    models: tuple[ModelStatus, ...] = ()
    router: bool = False
    # Seconds a request waits for each token it generates, averaged over what the server generated so far
    # (llama.cpp's /metrics); None while unknown (no --metrics, or too few tokens yet). agentcheck.policy's
    # speed classes turn it into a preference for faster servers.
    seconds_per_token: float | None = None
    # Each slot's last task id from /slots (None: the slot never ran one). Not part of equality: it tells
    # restarts apart (see restarted), it does not change what the balancer is told.
    slot_tasks: tuple[int | None, ...] = field(default=(), compare=False)

    @property
    def slots_idle(self) -> int:
        return max(0, self.slots_total - self.slots_processing)

    @classmethod
    def down(cls, state: State, reason: str) -> BackendStatus:
        return cls(state=state, reason=reason)


PENDING = BackendStatus(State.PENDING, "awaiting first poll")


def restarted(previous: BackendStatus, current: BackendStatus) -> bool:
    """llama-server restarted between two ready polls: a slot's task id only grows while one process
    lives, so a slot that ran a task before and now shows none, or an older one, is a new process. The
    agent then brings it back as from down (agentcheck.policy), even though no poll saw it down."""
    if previous.state is not State.READY or current.state is not State.READY:
        return False
    for before, now in zip(previous.slot_tasks, current.slot_tasks, strict=False):
        if before is not None and (now is None or now < before):
            return True
    return False
