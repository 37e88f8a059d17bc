"""The decision the agent exists for: a backend's status → one HAProxy agent-check reply line.

Pure functions only. HAProxy semantics that shape every line here (see docs/agent.md):

* A busy backend is never drained or weighted 0%: when every server is drained HAProxy
  answers 503 at once instead of queueing. Busy is expressed by ``maxconn:<slots>``, so
  the excess waits in HAProxy's backend queue and leaves it the moment a slot frees.
* The one 0%: a backend back from a ``down`` reply (``returning``, for a moment that
  agentcheck.replies times). HAProxy 2.6 hands a server that comes UP with a weight
  up to maxconn queued requests it does not count (pendconn_grab_from_px), and
  leastconn fills it again beside them. It applies the weight before ``up``, so at 0% the
  server comes UP taking nothing, and the weight that follows goes through HAProxy's
  counted paths. Meanwhile it counts as down (nbsrv, the standby), as it did a moment before.
* ``maxconn:0`` means *unlimited* to HAProxy, so it is never sent.
* After an agent ``down`` only an agent ``up`` revives a server, so every ready reply
  says ``up`` explicitly.
* Text after ``#`` is shown in HAProxy's logs and stats; it is reduced to a safe charset
  so nothing a backend says can forge extra words or lines.
"""

from __future__ import annotations

import enum
import math
import re

from agentcheck.status import BackendStatus, State

MIN_WEIGHT_PERCENT = 1
MAX_COMMENT_LENGTH = 160
_UNSAFE_COMMENT_CHARS = re.compile(r"[^A-Za-z0-9 _.:/()=,'\"+-]")


class WeightFormula(enum.Enum):
    """How a ready backend's weight is chosen; docs/agent.md has the measurement behind the default."""

    CAPACITY = "capacity"  # ∝ total slots: leastconn then balances the fraction of busy slots
    EQUAL = "equal"  # 100% for all: leastconn balances absolute connection counts
    IDLE = "idle"  # ∝ idle fraction at the last poll: also sees load that bypasses HAProxy


DEFAULT_WEIGHT_FORMULA = WeightFormula.IDLE  # chosen by measurement, see docs/agent.md


# Servers within this factor of each other's time per token count as equally fast: measurements of identical
# servers differ by a few percent, and that must not reorder them.
SPEED_STEP = 1.25


def speed_class(seconds_per_token: float | None, fastest: float | None) -> int:
    """0 for the fastest servers (and whenever a speed is unknown), 1 for up to SPEED_STEP^2 times slower per
    token than the fastest, and so on: a preference for faster servers that noise does not flip."""
    if seconds_per_token is None or fastest is None or fastest <= 0 or seconds_per_token <= fastest:
        return 0
    return math.floor(math.log(seconds_per_token / fastest) / math.log(SPEED_STEP))


def weight_percent(status: BackendStatus, fleet_max_slots: int,
                   formula: WeightFormula = DEFAULT_WEIGHT_FORMULA) -> int:
    """A weight percentage for a ready backend, never below 1% (0% would mean drained).

    HAProxy's leastconn picks the server with the lowest connections/weight among those
    below their maxconn. The weight only orders servers that still have room; busy slots
    are limited by maxconn and queued by HAProxy whatever the weight. (Scaling it by speed class was
    measured and made p99 time to first token worse on 2 of 3 seeds: docs/agent.md.)
    """
    if status.state is not State.READY or status.slots_total < 1:
        return MIN_WEIGHT_PERCENT
    if formula is WeightFormula.EQUAL:
        percent = 100.0
    elif formula is WeightFormula.IDLE:
        percent = 100 * status.slots_idle / status.slots_total
    else:
        percent = 100 * status.slots_total / max(fleet_max_slots, status.slots_total)
    return max(MIN_WEIGHT_PERCENT, min(100, round(percent)))


def agent_reply(status: BackendStatus, fleet_max_slots: int,
                formula: WeightFormula = DEFAULT_WEIGHT_FORMULA, drained: bool = False,
                returning: bool = False, leaving: bool = False) -> str:
    """The full reply line, ``\\n``-terminated, for a known backend.

    ``drained`` is the operator's choice (drain endpoint): HAProxy sends no new requests,
    running ones finish. Only an operator may drain; busy is never expressed this way. ``leaving``
    drains the same way a backend that is leaving the fleet (deregistered or gone from the file).
    ``returning``: a reply for this backend said ``down`` a moment ago, so a ready one comes
    back UP at weight 0% and gets its weight from a later reply (see the module docstring).
    """
    if status.state is State.READY and status.slots_total < 1 and status.router:
        # A llama.cpp router with no model loaded is alive: one request at a time loads one (cold_model_reply).
        if drained or leaving:
            why = "leaving the fleet" if leaving else "drained by operator"
            return f"up drain maxconn:1 #{_comment(f'{why}, router with no model loaded')}\n"
        percent = 0 if returning else MIN_WEIGHT_PERCENT
        return f"up ready {percent}% maxconn:1 #{_comment('router, no model loaded: a request loads one')}\n"
    if status.state is State.READY and status.slots_total < 1:
        return f"down #{_comment('error: server reports no slots')}\n"
    if status.state is State.READY:
        source = status.slot_source.value if status.slot_source else "unknown source"
        detail = f"idle={status.slots_idle} processing={status.slots_processing} via {source}"
        if status.sleeping:
            detail += " sleeping"
        if drained or leaving:
            why = "leaving the fleet, " if leaving else "drained by operator, "
            return f"up drain maxconn:{status.slots_total} #{_comment(why + detail)}\n"
        if returning:
            comment = _comment("back from down, weight follows, " + detail)
            return f"up ready 0% maxconn:{status.slots_total} #{comment}\n"
        weight = weight_percent(status, fleet_max_slots, formula)
        return f"up ready {weight}% maxconn:{status.slots_total} #{_comment(detail)}\n"
    if status.state is State.PENDING:
        # Never vouch for a server we have not seen: HAProxy sends it nothing until the first poll.
        return f"down #{_comment(status.reason)}\n"
    text = status.state.value if not status.reason else f"{status.state.value}: {status.reason}"
    return f"down #{_comment(text)}\n"


def not_served_reply(model: str) -> str:
    """A server in a model's pool (every server is in every pool) that does not serve that model: drained
    there, so that pool's requests never reach it. A server that serves no model of a pool is never busy
    in it, so this is no busy server drained."""
    return f"up drain #{_comment('does not serve ' + model)}\n"


def cold_model_reply(model: str, load: str, drained: bool = False, leaving: bool = False) -> str:
    """A llama.cpp router that serves ``model`` but has not loaded it: one request at a time, at the lowest
    weight, so leastconn prefers servers where it is loaded, and the request that loads it is the only one
    placed on slots nobody has counted yet. The agent's next poll after the load gives the real slots."""
    if drained or leaving:
        why = "leaving the fleet" if leaving else "drained by operator"
        return f"up drain maxconn:1 #{_comment(f'{why}, {model} {load}')}\n"
    return f"up ready {MIN_WEIGHT_PERCENT}% maxconn:1 #{_comment(f'{model} {load}: a request loads it')}\n"


# Replies for HAProxy's spare servers (agentcheck.spares) that carry no member. HAProxy 2.6 agent-checks a
# disabled server too, and an agent's `ready` or `drain` sets a server's admin state, so a spare's replies
# never say them (agentcheck.replies strips them from a member's reply): the spare pool alone sets its
# admin state, on the runtime API. At 0% an empty or released spare takes nothing new.
EMPTY_SPARE_REPLY = "up 0% #paddler-agent: empty spare server\n"
RELEASED_SPARE_REPLY = "up 0% #paddler-agent: spare server released, its sessions are ending\n"


def spare_reply(reply: str) -> str:
    """A member's reply for the spare server carrying it: the same, without the admin words."""
    if reply.startswith(("up ready ", "up drain ")):
        return "up " + reply[len("up ready "):]
    return reply


def unknown_backend_reply(name: str) -> str:
    """agent-send names no backend of this fleet: down, with the misconfiguration in HAProxy's stats."""
    return f"down #paddler-agent: unknown backend {_comment(name)!r}, check agent-send\n"


def invalid_request_reply(problem: str) -> str:
    """The agent-send line is unusable (too long, not text, cut off, missing in fleet mode)."""
    return f"down #paddler-agent: {_comment(problem)}\n"


def _comment(text: str) -> str:
    return _UNSAFE_COMMENT_CHARS.sub("?", text)[:MAX_COMMENT_LENGTH]
