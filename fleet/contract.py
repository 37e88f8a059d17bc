"""What the agent, the generator and both Lua bridges must agree on, written down once.

* The JSON bodies clients get from the balancer itself, identical on the HAProxy and Envoy
  paths. They follow llama.cpp's own error shape (``{"error": {"code", "type", "message"}}``),
  so clients that parse llama.cpp errors parse these too. Both 503s carry ``Retry-After``.
* The names of the settings the generated configs hand to the Lua bridges. Each keeps the
  fleet file's name end to end; the Lua side refuses to load without them.
* The address rule for clients: a service listening on every address is reached on loopback.
* HAProxy's backend and spare-server names, which the agent fills through the runtime API.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from fleet.schema import SPARE_SERVER_PREFIX, Address, Fleet, FleetError

RETRY_AFTER_SECONDS = 1


def _error(code: int, kind: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "type": kind, "message": message}}, separators=(",", ":"))


BUFFER_FULL = _error(503, "buffer_full", "all llama.cpp slots are busy and the request buffer is full")
BUFFER_TIMEOUT = _error(503, "buffer_timeout", "no llama.cpp slot became free within buffered_request_timeout")
SLOTS_FORBIDDEN = _error(403, "forbidden", "/slots is not exposed through the balancer")
ADMIN_FORBIDDEN = _error(403, "forbidden", "admin endpoints are not exposed through the balancer")

# The generated haproxy.cfg's one backend, whose spare servers (balancer.spare_servers) the agent fills.
HAPROXY_BACKEND = "llama"


def spare_server_names(count: int) -> list[str]:
    """The spare servers' names, as rendered and as the agent fills them: paddler-spare-1 .. -count."""
    return [f"{SPARE_SERVER_PREFIX}{index}" for index in range(1, count + 1)]


# HAProxy: `setenv` lines in the global section, read by configs/haproxy/paddler.lua at load.
HAPROXY_LUA_ENV = {
    "backend": "PADDLER_BACKEND",
    "max_buffered_requests": "PADDLER_MAX_BUFFERED_REQUESTS",
    "buffered_request_timeout_ms": "PADDLER_BUFFERED_REQUEST_TIMEOUT_MS",
    # Model-aware routing only: "<model>,<max_buffered_requests>,<buffered_request_timeout_ms>" per model,
    # separated by "/" (model names hold neither, and a setenv value holds no space); each model's backend
    # is PADDLER_BACKEND.<model>.
    "models": "PADDLER_MODELS",
    "default_model": "PADDLER_DEFAULT_MODEL",
    "max_request_body": "PADDLER_MAX_REQUEST_BODY",
    "affinity": "PADDLER_AFFINITY",  # "on", or absent
    "affinity_wait_ms": "PADDLER_AFFINITY_WAIT_MS",  # with affinity, when balancer.affinity_wait is set
}

# HAProxy 2.6 hands a server that comes back UP queued requests it does not count, unless its weight is 0
# then (docs/haproxy.md). So its /health check re-checks a DOWN server only every this many agent intervals
# (`downinter`): the agent's `down` (at most one poll plus one agent-inter, two intervals) reaches HAProxy,
# with an interval to spare, before the check can bring a restarted server back. The agent's replies then
# say 0% until HAProxy's check has passed.
HAPROXY_DOWN_RECHECK_INTERVALS = 3


def haproxy_down_recheck(agent_interval: float) -> float:
    """HAProxy's `downinter`: a killed server is never back UP before the agent has said `down`."""
    return HAPROXY_DOWN_RECHECK_INTERVALS * agent_interval


def agent_return_window(agent_interval: float) -> float:
    """How long after a `down` the agent's first ready reply, and those after it, say 0%: the recheck
    (at most ``haproxy_down_recheck`` after the server is ready) passes first, with half an interval to spare."""
    return haproxy_down_recheck(agent_interval) + agent_interval / 2


# Envoy's filter proves to the picker that it is the filter: it sends this header with the secret
# named by agent.picker_token_env, which paddler-gen envoy and paddler-agent read by one rule.
# Without one configured both use a fixed public marker: a browser still cannot send a custom
# header cross-origin without a CORS preflight, which the agent never grants.
PICKER_TOKEN_HEADER = "x-paddler-picker-token"
PICKER_TOKEN_UNSET = "paddler-picker-token-unset"
_PICKER_TOKEN_PATTERN = re.compile(r"[!-~]{16,}")  # one word of printable ASCII: safe in a header and YAML


def resolve_picker_token(fleet: Fleet, environ: Mapping[str, str] = os.environ) -> str:
    """The picker's secret: the variable agent.picker_token_env names (which must then be set), else
    the fixed marker."""
    name = fleet.agent.picker_token_env
    if name is None:
        return PICKER_TOKEN_UNSET
    value = environ.get(name, "")
    if not _PICKER_TOKEN_PATTERN.fullmatch(value):
        raise FleetError(fleet.source, "agent.picker_token_env",
                         f"environment variable {name} must hold 16 or more printable ASCII characters, no spaces")
    return value


# The agent serves the llama cluster's endpoints to Envoy over REST xDS (agentcheck/eds.py). Envoy's REST
# client sends no custom header, only the DiscoveryRequest, whose ``node`` is the bootstrap's: the picker
# token travels in its metadata under this key. A request that has the current version is held until the
# fleet changes, at most EDS_HOLD_SECONDS, so Envoy's request_timeout must be longer.
EDS_PATH = "/v3/discovery:endpoints"
EDS_CLUSTER = "llama"
EDS_TOKEN_METADATA_KEY = "paddler_picker_token"
EDS_HOLD_SECONDS = 10.0
EDS_REQUEST_TIMEOUT_SECONDS = EDS_HOLD_SECONDS + 5.0
# Envoy asks again 1-2 refresh delays after each answer, and that request is the acknowledgement the picker
# waits for before it places anything on a new member.
EDS_REFRESH_SECONDS = 0.25
# Envoy's REST client names the xDS cluster in Host: the agent must serve that name.
AGENT_CLUSTER = "paddler_agent"


_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def client_address(listen: Address) -> Address:
    """Where a co-located client reaches a service that listens on ``listen``.

    A wildcard address is not a destination: 0.0.0.0 is reached on 127.0.0.1, and :: on ::1
    (the same family, so it works whether or not the socket also accepts IPv4).
    """
    host = _WILDCARDS.get(listen.host)
    return listen if host is None else Address(host, listen.port)


# --- What the balancer forwards ------------------------------------------------------------
#
# An allow-list, decided on the path exactly as llama-server will see it: cpp-httplib cuts the
# target at '#' and then at '?', and decodes %XX and %uXXXX (a UTF-8 encoding of the code
# point; a surrogate decodes to nothing) once, with no dot-segment or slash clean-up, then
# routes on exact string equality. Deciding on that same string means no encoding can name one
# endpoint to the proxy and another to llama-server. Anything not listed is not forwarded.
#
# Both Lua bridges reduce a request to a route key, ``METHOD:path`` (HEAD counts as GET, as in
# llama-server; a slot's path as /slots/{id}), and look it up in ``route_table``, which the
# generator renders into each proxy's config. ``decide`` is the reference they are tested against.

INFERENCE = "inference"  # forwarded
READ = "read"  # forwarded: what llama.cpp's own clients read (models, props, liveness)
SLOTS = "slots"  # forwarded only with balancer.expose_slots: it can show other users' prompts
ADMIN = "admin"  # forwarded only with balancer.expose_admin: changes or reveals server state

FORWARD = "forward"
NOT_FOUND = "not_found"
SLOT_ID_PATH = "/slots/{id}"  # POST /slots/:id_slot (save, restore, erase a slot's cache)

ENDPOINTS: tuple[tuple[str, str, str], ...] = (
    *(("POST", path, INFERENCE) for path in (
        "/completion", "/completions", "/v1/completions",
        "/chat/completions", "/v1/chat/completions",
        "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens",
        "/responses", "/v1/responses", "/responses/input_tokens", "/v1/responses/input_tokens",
        "/v1/messages", "/v1/messages/count_tokens",
        "/infill", "/embedding", "/embeddings", "/v1/embeddings",
        "/rerank", "/reranking", "/v1/rerank", "/v1/reranking",
        "/tokenize", "/detokenize", "/apply-template",
        "/audio/transcriptions", "/v1/audio/transcriptions",
    )),
    *(("GET", path, READ) for path in ("/health", "/v1/health", "/models", "/v1/models", "/props")),
    ("GET", "/slots", SLOTS),
    ("POST", SLOT_ID_PATH, SLOTS),
    ("GET", "/metrics", ADMIN),
    ("POST", "/props", ADMIN),
    ("GET", "/lora-adapters", ADMIN),
    ("POST", "/lora-adapters", ADMIN),
    ("POST", "/models", ADMIN),
    ("POST", "/models/load", ADMIN),
    ("POST", "/models/unload", ADMIN),
)

NOT_EXPOSED = _error(404, "not_found", "this endpoint is not exposed through the balancer")


def route_table(expose_slots: bool, expose_admin: bool) -> dict[str, str]:
    """Route key → forward, or the refusal (slots, admin) for endpoints not exposed. OPTIONS (a CORS
    preflight) follows the path: forwarded wherever some method on it is."""
    table: dict[str, str] = {}
    for method, path, category in ENDPOINTS:
        verdict = FORWARD
        if (category == SLOTS and not expose_slots) or (category == ADMIN and not expose_admin):
            verdict = category
        table[f"{method}:{path}"] = verdict
        if table.get(f"OPTIONS:{path}") != FORWARD:
            table[f"OPTIONS:{path}"] = verdict
    return table


def llama_server_path(target: str) -> str:
    """The path llama-server routes on for a request target (its cpp-httplib's own steps), as bytes
    shown one character per byte (latin-1), which is how the Lua bridges see it."""
    path = target.split("#", 1)[0].split("?", 1)[0].encode("latin-1", "replace")
    out = bytearray()
    index = 0
    while index < len(path):
        byte = path[index]
        if byte == ord("%") and index + 1 < len(path):
            if path[index + 1] == ord("u") and _is_hex(path[index + 2:index + 6], 4):
                code = int(path[index + 2:index + 6], 16)
                if not 0xD800 <= code < 0xE000:  # a lone surrogate decodes to nothing
                    out += chr(code).encode("utf-8")
                index += 6
                continue
            if path[index + 1] != ord("u") and _is_hex(path[index + 1:index + 3], 2):
                out.append(int(path[index + 1:index + 3], 16))
                index += 3
                continue
        out.append(byte)
        index += 1
    return out.decode("latin-1")


def route_key(method: str, target: str) -> str:
    path = llama_server_path(target)
    rest = path[len("/slots/"):]
    if path.startswith("/slots/") and rest and "/" not in rest:
        path = SLOT_ID_PATH
    return f"{'GET' if method == 'HEAD' else method}:{path}"


def decide(method: str, target: str, expose_slots: bool = False, expose_admin: bool = False) -> str:
    """What the balancer does with a request: forward, slots or admin (403), or not_found (404)."""
    return route_table(expose_slots, expose_admin).get(route_key(method, target), NOT_FOUND)


def _is_hex(text: bytes, length: int) -> bool:
    return len(text) == length and all(char in b"0123456789abcdefABCDEF" for char in text)


# --- Which model a request names (model-aware routing, docs/models.md) ------------------------
#
# The balancer reads the model the way llama-server's JSON parser (nlohmann::json) reads the body:
# a JSON object in UTF-8 (no NaN or Infinity, no lone surrogate escape, no trailing text), and of two
# top-level "model" members the last (keys compared after unescaping). Both Lua bridges implement
# ``request_model``; tests/unit run them against this reference.

MODEL_NAMED = "model"
MODEL_ABSENT = "absent"  # no top-level "model", or "model": null
MODEL_MALFORMED = "malformed"  # not a JSON object, or "model" is not a string
MAX_JSON_DEPTH = 128  # deeper bodies are refused: the Lua scanners keep an explicit stack, bounded here
# More top-level members than any API request has: refused, so the scanners' work per body stays bounded.
MAX_TOP_LEVEL_MEMBERS = 256
# JSON-bodied inference routes carry a model; the others (multipart audio, GET /props) go to the default model.
MODEL_ROUTES = tuple(f"POST:{path}" for method, path, category in ENDPOINTS
                     if method == "POST" and category == INFERENCE and "/audio/" not in path)


# The balancer's own answers on model routes; the 404 in OpenAI's shape (clients match its code).
MODEL_NOT_FOUND = json.dumps({"error": {
    "message": "The model named in the request is not served by this balancer (GET /v1/models lists them)",
    "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}, separators=(",", ":"))
BODY_NOT_JSON = _error(400, "invalid_request_error",
                       "the request body is not a JSON object, or its \"model\" is not a string")
MODEL_MISSING = _error(400, "invalid_request_error",
                       "the request names no model, and the fleet has no default_model")


def body_too_large(limit: int) -> str:
    return _error(413, "request_too_large",
                  f"the request body is larger than balancer.max_request_body ({limit} bytes)")


def models_list(names: tuple[str, ...] | list[str]) -> str:
    """GET /v1/models on the balancer: the fleet's models, in OpenAI's list shape."""
    return json.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "paddler"} for name in names]},
        separators=(",", ":"))


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotJson(f"{name} is not JSON")




def _well_formed(value: object) -> bool:
    """Nested at most MAX_JSON_DEPTH deep, and no string or key holding a lone surrogate (an escape
    such as \\ud800, which Python decodes and nlohmann::json refuses). Walked without recursion."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return False
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            todo.extend((child, depth + 1) for child in children)
    return True


def request_model(body: bytes) -> tuple[str, str | None]:
    """(MODEL_NAMED, name), (MODEL_ABSENT, None) or (MODEL_MALFORMED, None) for a request body."""
    members: list[int] = []  # each object's member count; the top level's comes last

    def last_wins(pairs: list[tuple[str, object]]) -> dict[str, object]:
        members.append(len(pairs))
        return dict(pairs)

    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=last_wins, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return MODEL_MALFORMED, None
    if not isinstance(data, dict) or members[-1] > MAX_TOP_LEVEL_MEMBERS or not _well_formed(data):
        return MODEL_MALFORMED, None
    model = data.get("model")
    if model is None:
        return MODEL_ABSENT, None
    if not isinstance(model, str):
        return MODEL_MALFORMED, None
    return MODEL_NAMED, model
