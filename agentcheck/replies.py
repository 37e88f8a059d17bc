"""Agent-check answers: a parsed request and the fleet model → the reply line, cached per backend.

Checks are the hot path (one per backend per ``agent-inter``), so each backend's reply is
computed once per change and served from the cache until the model says the member changed.
Weights are relative to the largest backend ever seen ready; a new maximum rescales them all.
A backend back from a ``down`` reply, or restarted between two polls that both found it ready, is
answered 0% for ``return_window`` seconds (agentcheck.policy says why): the replies remember what they
last said, so the window starts at the first ready one.
A spare server's name (agentcheck.spares) is answered with the reply of the member it carries, minus
the admin words (policy.spare_reply says why).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping

from agentcheck.model import FleetModel, Member
from agentcheck.model_routing import model_share, model_view
from agentcheck.policy import (
    DEFAULT_WEIGHT_FORMULA,
    EMPTY_SPARE_REPLY,
    RELEASED_SPARE_REPLY,
    WeightFormula,
    agent_reply,
    cold_model_reply,
    invalid_request_reply,
    not_served_reply,
    spare_reply,
    unknown_backend_reply,
)
from agentcheck.protocol import Request
from agentcheck.status import ModelLoad, State, restarted
from fleet import SPARE_SERVER_PREFIX

log = logging.getLogger("paddler.agent")


class AgentCheckReplies:
    def __init__(self, model: FleetModel, formula: WeightFormula = DEFAULT_WEIGHT_FORMULA,
                 return_window: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._model = model
        self._formula = formula
        self._return_window = return_window
        self._clock = clock
        self._largest_slots = 0
        self._cache: dict[str, str] = {}
        # Backends back from a down reply → when their first reply after it was up (None: not yet).
        self._returning: dict[str, float | None] = {}
        self._spares: dict[str, str | None] = {}  # spare server → the member it carries (None: released)
        self.served: Counter[str] = Counter()  # replies by kind: ready, drain, down, unknown, invalid, spare

    def on_member_change(self, previous: Member | None, current: Member | None) -> None:
        """The model's subscription: drop what the change made stale."""
        if current is None:
            assert previous is not None
            self._cache.pop(previous.name, None)
            self._returning.pop(previous.name, None)
            return
        status = current.status
        if previous is not None and restarted(previous.status, status):
            log.info("%s: llama-server restarted between polls; back at 0%% for %gs", current.name,
                     self._return_window)
            self._returning[current.name] = None
            self._cache.pop(current.name, None)
        if current.ready and status.slots_total > self._largest_slots:
            self._largest_slots = status.slots_total
            self._cache.clear()
        elif (previous is None or previous.status != status or previous.drained != current.drained
              or previous.leaving != current.leaving):
            self._cache.pop(current.name, None)

    def set_spares(self, assignment: Mapping[str, str | None]) -> None:
        """Whom each spare server's checks are answered for, from the spare pool (agentcheck.haproxy_runtime);
        None: released, its sessions ending. A spare not listed is empty."""
        self._spares = dict(assignment)

    def reply_for(self, name: str) -> str | None:
        """The agent-check line for a backend or a spare server, or None when the name is neither."""
        if name.startswith(SPARE_SERVER_PREFIX):
            if name not in self._spares:
                return EMPTY_SPARE_REPLY
            carried = self._spares[name]
            return (self.reply_for(carried) if carried is not None else None) or RELEASED_SPARE_REPLY
        reply = self._cache.get(name)
        if reply is None:
            member = self._model.get(name)
            if member is None:
                return None
            reply = self._cache[name] = agent_reply(member.status, self._largest_slots, self._formula,
                                                    drained=member.drained, leaving=member.leaving)
        return reply

    def answer(self, request: Request) -> str:
        reply, kind = self._answer(request)
        self.served[kind] += 1
        return reply

    def _answer(self, request: Request) -> tuple[str, str]:
        if request.problem is not None:
            return invalid_request_reply(request.problem), "invalid"
        name = request.name
        if name is None:
            if len(self._model) != 1:
                return invalid_request_reply("agent-send must name a backend (this agent watches several)"), "invalid"
            name = self._model.names[0]
        if request.model is not None:
            return self._pool_answer(name, request.model)
        reply = self.reply_for(name)
        if reply is None:
            return unknown_backend_reply(name), "unknown"
        if reply in (EMPTY_SPARE_REPLY, RELEASED_SPARE_REPLY):
            self._returning.pop(name, None)  # `up` at 0%: whoever the spare carries next comes UP unweighted
            return reply, "spare"
        if not reply.startswith("up "):
            self._returning[name] = None
            return reply, "down"
        if self._returning:
            # The window is the name's (HAProxy's server said down) or its member's (a restart between polls).
            carried = self._spares.get(name)
            windows = [self._in_return_window(key) for key in (name, carried) if key in self._returning]
            if any(windows) and reply.startswith("up ready "):
                reply = self._returning_reply(carried or name)
        kind = reply.split(" ", 2)[1]
        return (spare_reply(reply) if name.startswith(SPARE_SERVER_PREFIX) else reply), kind

    def _pool_answer(self, name: str, model: str) -> tuple[str, str]:
        """The server line of one model's pool (``<name> model=<model>``): only the slots serving that model
        (agentcheck.model_routing), drained where the server does not serve it. A down server is down in every
        pool, and each pool's line comes back at 0% on its own, as a server line does."""
        member = self._model.get(name)
        if member is None:
            return unknown_backend_reply(name), "unknown"
        key = f"{name} model={model}"
        status = member.status
        if status.state is not State.READY:
            self._returning[key] = None
            return agent_reply(status, self._largest_slots, self._formula), "down"
        share = model_share(member.backend, status, model)
        if share is None:
            return not_served_reply(model), "drain"
        if share.load is not ModelLoad.LOADED or share.slots_total < 1:
            reply = cold_model_reply(model, share.load.value, drained=member.drained, leaving=member.leaving)
            return reply, reply.split(" ", 2)[1]
        returning = any(self._in_return_window(window) for window in (key, name) if window in self._returning)
        reply = agent_reply(model_view(status, share), self._largest_slots, self._formula, drained=member.drained,
                            returning=returning, leaving=member.leaving)
        return reply, reply.split(" ", 2)[1]

    def _in_return_window(self, key: str) -> bool:
        """The window starts at the first up reply after the down, and is forgotten once over."""
        now = self._clock()
        since = self._returning[key]
        if since is None:
            since = self._returning[key] = now
        if now - since >= self._return_window:
            del self._returning[key]
            return False
        return True

    def _returning_reply(self, name: str) -> str:
        member = self._model.get(name)
        assert member is not None  # reply_for found it
        return agent_reply(member.status, self._largest_slots, self._formula, returning=True)
