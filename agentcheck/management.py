"""The agent's HTTP management server: fleet API, dashboard, Prometheus metrics, operator drain/ready,
and the endpoint picker Envoy's Lua filter calls.

Handlers are thin adapters over the fleet model, its snapshot and the picker. Operator endpoints need the
configured bearer token; without one configured they are disabled, never open.

Two guards against callers other than the operator's tools and Envoy's filter:

* Every request must name a host this agent serves (``Host``): an IP address, ``localhost``, the
  name Envoy's filter uses, or the management address's own host name. A web page that rebinds
  its DNS name to this address sends its own name, and is refused (421) before any handler runs.
* The picker endpoints need the filter's secret in ``x-paddler-picker-token``: the token named by
  ``agent.picker_token_env``, or a fixed marker when none is configured. A custom header cannot be
  sent cross-origin without a CORS preflight, which this server never grants, so even the marker
  stops a web page's ``text/plain`` POST; the token also stops other hosts that can reach the port.
  Lease ids are random tokens, so a lease is released only by the request it was given to. Envoy's
  REST xDS client sends no header of ours, so its endpoint requests carry the same secret in the
  bootstrap's node metadata, which is in every DiscoveryRequest; only such a request's word on what
  Envoy has applied counts.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler as StreamHandler
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from agentcheck.eds import EndpointDiscovery
from agentcheck.membership import Membership, Refused
from agentcheck.model import FleetModel, Origin
from agentcheck.picker import LEASE_ID_PATTERN, Affinity, BufferFull, BufferTimeout, Picker
from agentcheck.replies import AgentCheckReplies
from agentcheck.reporting import PICKER_SOURCE_HEADER
from agentcheck.snapshot import Snapshot, health
from fleet import contract
from fleet.schema import MODEL_NAME_PATTERN

log = logging.getLogger("paddler.agent")

MODEL_KEY = web.AppKey("model", FleetModel)
REPLIES_KEY = web.AppKey("replies", AgentCheckReplies)
SNAPSHOT_KEY: web.AppKey[Snapshot] = web.AppKey("snapshot")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TOKEN_KEY = web.AppKey("operator_token", str)
PICKER_KEY = web.AppKey("picker", Picker)
PICKER_TOKEN_KEY = web.AppKey("picker_token", str)
DISCOVERY_KEY = web.AppKey("discovery", EndpointDiscovery)
MEMBERSHIP_KEY = web.AppKey("membership", Membership)
MAX_BODY_BYTES = 64 * 1024  # registrations and picker calls are a few hundred bytes
# Envoy's DiscoveryRequest names every extension Envoy was built with (about 80 KB for 1.40): read past
# MAX_BODY_BYTES, up to this.
EDS_MAX_BODY_BYTES = 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.Response]]
ENDPOINT_HEADER = "x-paddler-endpoint"  # the header Envoy's override_host policy reads
LEASE_HEADER = "x-paddler-lease"
MODEL_HEADER = "x-paddler-model"  # the model the request names, which the lease must serve (model-aware routing)
# The request's conversation (prompt-cache affinity): "r=<keys>;l=<keys>", each key 16 hex digits (paddler.lua).
AFFINITY_HEADER = "x-paddler-affinity"
_AFFINITY_KEYS = r"[0-9a-f]{16}(?:,[0-9a-f]{16}){0,7}"
AFFINITY_PATTERN = re.compile(rf"r=(?P<remember>{_AFFINITY_KEYS});l=(?P<lookups>{_AFFINITY_KEYS})")
VERDICT_HEADER = "x-paddler-verdict"
AGENT_AUTHORITY = "paddler-agent"  # the :authority paddler.lua and Envoy's /health route send here
LOCAL_HOST_NAMES = ("localhost", AGENT_AUTHORITY, contract.AGENT_CLUSTER)  # the last: Envoy's xDS requests


def _same_secret(given: str, expected: str) -> bool:
    # Header values arrive decoded with surrogateescape; encode them back the same way, never raise.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def host_refusal(host: str | None, names: Iterable[str]) -> str | None:
    """Why a request naming this ``Host`` is refused, or None. Any IP address is served: a page can name
    an IP only if it was served from that IP, so DNS rebinding always shows up as a host *name*. Names
    must be listed (``names``, compared without port and case-insensitively). No Host header at all is
    served too: every browser sends one."""
    if host is None:
        return None
    bare = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] if ":" in host else host
    bare = bare.lower()
    try:
        ipaddress.ip_address(bare)
        return None
    except ValueError:
        pass
    if bare and bare in {name.lower() for name in names}:
        return None
    return ("this agent does not serve that Host: reach it by IP address, localhost or its management "
            "address's host name")


def token_refusal(authorization: str | None, token: str | None) -> tuple[int, str] | None:
    """Why an operator request is refused (status, message), or None when it may proceed."""
    if not token:
        return 403, "operator endpoints are disabled: configure agent.operator_token_env"
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return 401, "missing bearer token"
    if not _same_secret(given, token):
        return 403, "wrong token"
    return None


def _error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response({"error": {"code": status, "message": message}}, status=status, headers=headers)


async def agents(request: web.Request) -> web.Response:
    return web.json_response(request.app[SNAPSHOT_KEY]())


async def fleet_health(request: web.Request) -> web.Response:
    """Paddler-style aggregated health, from the agent's view of llama.cpp; ``?model=NAME``: the same over the
    backends serving that model, only its slots and its own queue, or 404 ``model_not_found`` when no backend
    serves it (declared in the fleet, or discovered on a ready one)."""
    snapshot = request.app[SNAPSHOT_KEY]()
    if "model" in request.query:
        name = request.query["model"]
        served = snapshot["models"].get(name)
        if served is None:
            shown = name if len(name) <= 128 else name[:128] + "..."
            return web.json_response({"error": {"code": 404, "type": "model_not_found",
                                                "message": f"no backend serves the model {shown!r}"}}, status=404)
        body, status = health(served["usable"], served["slots_idle"], served["slots_processing"],
                              served["requests_buffered"])
        return web.json_response(body, status=status)
    totals = snapshot["totals"]
    body, status = health(snapshot["usable"], totals["slots_idle"], totals["slots_processing"],
                          snapshot["requests_buffered"])
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY_KEY]),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard(_: web.Request) -> web.Response:
    page = resources.files("agentcheck").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def _operator(drain: bool) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        refusal = token_refusal(request.headers.get("Authorization"), request.app[TOKEN_KEY])
        if refusal is not None:
            return _error(*refusal)
        name = request.match_info["name"]
        try:
            request.app[MODEL_KEY].set_drained(name, drain)
        except KeyError:
            return _error(404, f"no backend named {name!r}")
        reply = request.app[REPLIES_KEY].reply_for(name) or ""
        return web.json_response({"name": name, "drained": drain, "agent_check_reply": reply.rstrip("\n")})
    return handle


async def list_backends(request: web.Request) -> web.Response:
    """Every backend with where it came from; a registered one with the seconds left before it leaves."""
    membership = request.app[MEMBERSHIP_KEY]
    return web.json_response({"backends": [
        {"name": member.name, "address": str(member.backend.address), "origin": member.origin.value,
         "standby": member.role.value == "standby", "leaving": member.leaving,
         "expires_in": membership.expires_in(member.name)}
        for member in request.app[MODEL_KEY]]})


async def register(request: web.Request) -> web.Response:
    """Add a backend (201), or refresh its heartbeat (200): ``PUT /api/v1/backends/{name}`` or ``POST
    /api/v1/backends`` with ``{"name": ..., "address": "host:port"}`` and optionally ``slots``, ``api_key``."""
    refusal = token_refusal(request.headers.get("Authorization"), request.app[TOKEN_KEY])
    if refusal is not None:
        return _error(*refusal)
    try:
        data = json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, f"the body is not JSON: {exc}")
    membership = request.app[MEMBERSHIP_KEY]
    try:
        registered = membership.register(data, request.match_info.get("name"))
    except Refused as refused:
        return _error(refused.status, refused.reason)
    member = registered.member
    return web.json_response({"name": member.name, "address": str(member.backend.address),
                              "origin": Origin.REGISTERED.value, "leaving": member.leaving,
                              "expires_in": membership.expires_in(member.name)},
                             status=201 if registered.created else 200)


async def deregister(request: web.Request) -> web.Response:
    """The backend leaves: no new requests; it is removed once its running requests are over (202)."""
    refusal = token_refusal(request.headers.get("Authorization"), request.app[TOKEN_KEY])
    if refusal is not None:
        return _error(*refusal)
    try:
        member = request.app[MEMBERSHIP_KEY].deregister(request.match_info["name"])
    except Refused as refused:
        return _error(refused.status, refused.reason)
    return web.json_response({"name": member.name, "leaving": True}, status=202)


def _picker_refusal(request: web.Request) -> web.Response | None:
    given = request.headers.get(contract.PICKER_TOKEN_HEADER)
    if given is None:
        return _error(403, f"missing {contract.PICKER_TOKEN_HEADER}: the picker serves Envoy's paddler.lua filter only")
    if not _same_secret(given, request.app[PICKER_TOKEN_KEY]):
        return _error(403, "wrong picker token: paddler-gen envoy and paddler-agent must read the same "
                           "agent.picker_token_env")
    return None


async def acquire(request: web.Request) -> web.Response:
    """Envoy's Lua filter asks where to send a request (for the model in x-paddler-model, if any); may wait in
    that model's FIFO."""
    if (refusal := _picker_refusal(request)) is not None:
        return refusal
    model = request.headers.get(MODEL_HEADER)
    if model is not None and not MODEL_NAME_PATTERN.fullmatch(model):
        return _error(400, f"{MODEL_HEADER} is not a model name")
    affinity = None
    if (conversation := request.headers.get(AFFINITY_HEADER)) is not None:
        if (keys := AFFINITY_PATTERN.fullmatch(conversation)) is None:
            return _error(400, f"{AFFINITY_HEADER} is not r=<keys>;l=<keys> with 1-8 keys of 16 hex digits each")
        affinity = Affinity(tuple(keys["remember"].split(",")), tuple(keys["lookups"].split(",")))
    try:
        lease = await request.app[PICKER_KEY].acquire(model, affinity)
    except BufferFull:
        return _overloaded(contract.BUFFER_FULL, "buffer_full")
    except BufferTimeout:
        return _overloaded(contract.BUFFER_TIMEOUT, "buffer_timeout")
    return web.json_response({"endpoint": lease.address, "backend": lease.backend, "lease": lease.id},
                             headers={ENDPOINT_HEADER: lease.endpoints, LEASE_HEADER: lease.id})


def _overloaded(body: str, verdict: str) -> web.Response:
    """The picker's own refusal, marked so the Lua filter relays it instead of falling back."""
    return web.Response(status=503, text=body, content_type="application/json",
                        headers={"Retry-After": str(contract.RETRY_AFTER_SECONDS), VERDICT_HEADER: verdict})


async def release(request: web.Request) -> web.Response:
    """The filter's request on this lease has ended. Only the exact id the picker handed out frees a slot."""
    if (refusal := _picker_refusal(request)) is not None:
        return refusal
    lease_id = request.match_info["lease"]
    if not LEASE_ID_PATTERN.fullmatch(lease_id):
        return _error(400, "a lease id is 22 characters of A-Z a-z 0-9 _ -")
    if not request.app[PICKER_KEY].release(lease_id):
        return _error(404, "no such lease, or already released")
    return web.Response(status=204)


async def failed(request: web.Request) -> web.Response:
    """The filter saw this lease's server refuse the connection; ``x-paddler-endpoint`` names the server
    Envoy's retry reached, if any. Only the exact id the picker handed out counts."""
    if (refusal := _picker_refusal(request)) is not None:
        return refusal
    lease_id = request.match_info["lease"]
    if not LEASE_ID_PATTERN.fullmatch(lease_id):
        return _error(400, "a lease id is 22 characters of A-Z a-z 0-9 _ -")
    if not request.app[PICKER_KEY].failed(lease_id, request.headers.get(ENDPOINT_HEADER)):
        return _error(404, "no such lease")
    return web.Response(status=204)


async def picker_health(request: web.Request) -> web.Response:
    """Paddler-compatible /health for a balancer that routes through the picker (Envoy): counts as the
    picker sees them (polls corrected by its own leases), and its own queue. Idle slots are those it would
    place a request on now: none while its opening settles (Picker.open), when requests wait instead."""
    picker = request.app[PICKER_KEY]
    candidates = picker.candidates()
    processing = sum(picker.busy(name) for name in candidates)
    body, status = health(bool(candidates), sum(picker.free_slots().values()), processing, picker.waiting)
    return web.json_response(body, status=status, headers={PICKER_SOURCE_HEADER: "picker"})


async def discover_endpoints(request: web.Request) -> web.Response:
    """Envoy's REST EDS: the llama cluster's endpoints, or 304 once the held request saw no change. The
    request's version_info is what Envoy has applied, which gates the picker (agentcheck.eds), so it counts
    only with the picker token in the node metadata: nobody else can hold the picker back. Without the token
    the endpoints are still served (they are no secret: /api/v1/agents lists them), so that a token slip
    costs the picker, as on its own endpoints, and never Envoy's cluster."""
    body = bytearray()
    while chunk := await request.content.read(EDS_MAX_BODY_BYTES):
        body += chunk
        if len(body) > EDS_MAX_BODY_BYTES:
            return _error(413, f"the body is over {EDS_MAX_BODY_BYTES} bytes")
    try:
        discovery_request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "a DiscoveryRequest is a JSON object")
    if not isinstance(discovery_request, dict):
        return _error(400, "a DiscoveryRequest is a JSON object")
    node = discovery_request.get("node")
    metadata = node.get("metadata") if isinstance(node, dict) else None
    given = metadata.get(contract.EDS_TOKEN_METADATA_KEY) if isinstance(metadata, dict) else None
    version_info = discovery_request.get("version_info", "")
    if not isinstance(version_info, str):
        return _error(400, "version_info is a string")
    discovery = request.app[DISCOVERY_KEY]
    if isinstance(given, str) and _same_secret(given, request.app[PICKER_TOKEN_KEY]):
        discovery.record_request(version_info, error_detail=bool(discovery_request.get("error_detail")))
    else:
        log.warning("endpoint request without the right node.metadata.%s: served, but what it says Envoy has "
                    "applied is ignored (paddler-gen envoy and paddler-agent must read the same "
                    "agent.picker_token_env)", contract.EDS_TOKEN_METADATA_KEY)
    if not await discovery.wait_for_change(version_info, contract.EDS_HOLD_SECONDS):
        return web.Response(status=304)
    return web.Response(body=discovery.body, content_type="application/json")


def _host_guard(names: Iterable[str]) -> Middleware:
    served = (*LOCAL_HOST_NAMES, *names)

    @web.middleware
    async def guard(request: web.Request, handler: StreamHandler) -> web.StreamResponse:
        refusal = host_refusal(request.headers.get(hdrs.HOST), served)
        if refusal is not None:
            return _error(421, refusal)
        return await handler(request)
    return guard


def create_app(model: FleetModel, replies: AgentCheckReplies, snapshot: Snapshot, registry: CollectorRegistry,
               operator_token: str | None, picker: Picker, membership: Membership, *,
               picker_token: str = contract.PICKER_TOKEN_UNSET, host_names: Iterable[str] = (),
               discovery: EndpointDiscovery) -> web.Application:
    """``host_names``: DNS names this server answers to besides localhost and the filter's name (IP
    addresses are always served)."""
    app = web.Application(middlewares=[_host_guard(host_names)], client_max_size=MAX_BODY_BYTES)
    app[MEMBERSHIP_KEY] = membership
    app[MODEL_KEY] = model
    app[REPLIES_KEY] = replies
    app[SNAPSHOT_KEY] = snapshot
    app[REGISTRY_KEY] = registry
    app[TOKEN_KEY] = operator_token or ""
    app[PICKER_KEY] = picker
    app[PICKER_TOKEN_KEY] = picker_token
    app[DISCOVERY_KEY] = discovery
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/v1/agents", agents)
    app.router.add_get("/health", fleet_health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/v1/agents/{name}/drain", _operator(drain=True))
    app.router.add_post("/api/v1/agents/{name}/ready", _operator(drain=False))
    app.router.add_get("/api/v1/backends", list_backends)
    app.router.add_post("/api/v1/backends", register)
    app.router.add_put("/api/v1/backends/{name}", register)
    app.router.add_delete("/api/v1/backends/{name}", deregister)
    app.router.add_post("/api/v1/picker/acquire", acquire)
    app.router.add_post("/api/v1/picker/release/{lease}", release)
    app.router.add_post("/api/v1/picker/failed/{lease}", failed)
    app.router.add_get("/api/v1/picker/health", picker_health)
    app.router.add_post(contract.EDS_PATH, discover_endpoints)
    return app
