"""The agent's HTTP management server: fleet API, dashboard, Prometheus metrics, operator drain/ready,
and the endpoint picker Envoy's Lua filter calls.

Handlers are thin adapters over the fleet model, its snapshot and the picker. Operator endpoints need the
configured bearer token; without one configured they are disabled, never open.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from agentcheck.model import FleetModel
from agentcheck.picker import BufferFull, BufferTimeout, Picker
from agentcheck.replies import AgentCheckReplies
from agentcheck.reporting import PICKER_SOURCE_HEADER
from agentcheck.snapshot import Snapshot, health
from fleet import contract

MODEL_KEY = web.AppKey("model", FleetModel)
REPLIES_KEY = web.AppKey("replies", AgentCheckReplies)
SNAPSHOT_KEY: web.AppKey[Snapshot] = web.AppKey("snapshot")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TOKEN_KEY = web.AppKey("operator_token", str)
PICKER_KEY = web.AppKey("picker", Picker)
Handler = Callable[[web.Request], Awaitable[web.Response]]
ENDPOINT_HEADER = "x-paddler-endpoint"  # the header Envoy's override_host policy reads
LEASE_HEADER = "x-paddler-lease"
VERDICT_HEADER = "x-paddler-verdict"


def token_refusal(authorization: str | None, token: str | None) -> tuple[int, str] | None:
    """Why an operator request is refused (status, message), or None when it may proceed."""
    if not token:
        return 403, "operator endpoints are disabled: configure agent.operator_token_env"
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return 401, "missing bearer token"
    if not hmac.compare_digest(given.encode(), token.encode()):
        return 403, "wrong token"
    return None


def _error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response({"error": {"code": status, "message": message}}, status=status, headers=headers)


async def agents(request: web.Request) -> web.Response:
    return web.json_response(request.app[SNAPSHOT_KEY]())


async def fleet_health(request: web.Request) -> web.Response:
    """Paddler-style aggregated health, from the agent's view of llama.cpp."""
    snapshot = request.app[SNAPSHOT_KEY]()
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


async def acquire(request: web.Request) -> web.Response:
    """Envoy's Lua filter asks where to send a request; may wait in the fleet-wide FIFO."""
    try:
        lease = await request.app[PICKER_KEY].acquire()
    except BufferFull:
        return _overloaded(contract.BUFFER_FULL, "buffer_full")
    except BufferTimeout:
        return _overloaded(contract.BUFFER_TIMEOUT, "buffer_timeout")
    return web.json_response({"endpoint": lease.address, "backend": lease.backend, "lease": lease.id},
                             headers={ENDPOINT_HEADER: lease.address, LEASE_HEADER: str(lease.id)})


def _overloaded(body: str, verdict: str) -> web.Response:
    """The picker's own refusal, marked so the Lua filter relays it instead of falling back."""
    return web.Response(status=503, text=body, content_type="application/json",
                        headers={"Retry-After": str(contract.RETRY_AFTER_SECONDS), VERDICT_HEADER: verdict})


async def release(request: web.Request) -> web.Response:
    try:
        lease_id = int(request.match_info["lease"])
    except ValueError:
        return _error(400, "lease must be a number")
    request.app[PICKER_KEY].release(lease_id)
    return web.Response(status=204)


async def picker_health(request: web.Request) -> web.Response:
    """Paddler-compatible /health for a balancer that routes through the picker (Envoy): counts as the
    picker sees them (polls corrected by its own leases), and its own queue."""
    picker = request.app[PICKER_KEY]
    candidates = picker.candidates()
    processing = sum(picker.busy(name) for name in candidates)
    total = sum(request.app[MODEL_KEY][name].status.slots_total for name in candidates)
    body, status = health(bool(candidates), total - processing, processing, picker.waiting)
    return web.json_response(body, status=status, headers={PICKER_SOURCE_HEADER: "picker"})


def create_app(model: FleetModel, replies: AgentCheckReplies, snapshot: Snapshot, registry: CollectorRegistry,
               operator_token: str | None, picker: Picker) -> web.Application:
    app = web.Application()
    app[MODEL_KEY] = model
    app[REPLIES_KEY] = replies
    app[SNAPSHOT_KEY] = snapshot
    app[REGISTRY_KEY] = registry
    app[TOKEN_KEY] = operator_token or ""
    app[PICKER_KEY] = picker
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/v1/agents", agents)
    app.router.add_get("/health", fleet_health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/v1/agents/{name}/drain", _operator(drain=True))
    app.router.add_post("/api/v1/agents/{name}/ready", _operator(drain=False))
    app.router.add_post("/api/v1/picker/acquire", acquire)
    app.router.add_post("/api/v1/picker/release/{lease}", release)
    app.router.add_get("/api/v1/picker/health", picker_health)
    return app
