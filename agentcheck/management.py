"""The agent's HTTP management server: fleet API, dashboard, Prometheus metrics, operator drain/ready.

Handlers are thin adapters over FleetState and fleet_snapshot. Operator endpoints need the
configured bearer token; without one configured they are disabled, never open.
"""

from __future__ import annotations

import hmac
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from agentcheck.monitor import FleetState
from agentcheck.snapshot import fleet_snapshot

STATE_KEY = web.AppKey("state", FleetState)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TOKEN_KEY = web.AppKey("operator_token", str)
STANDBY_KEY = web.AppKey("standby", frozenset)


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
    return web.json_response(fleet_snapshot(request.app[STATE_KEY], request.app[STANDBY_KEY]))


async def health(request: web.Request) -> web.Response:
    """Paddler-style aggregated health, from the agent's view of llama.cpp."""
    snapshot = fleet_snapshot(request.app[STATE_KEY], request.app[STANDBY_KEY])
    usable = any(a["state"] == "ready" and not a["drained"] for a in snapshot["agents"])
    body = {"status": "ok" if usable else "unavailable",
            "slots_idle": snapshot["totals"]["slots_idle"],
            "slots_processing": snapshot["totals"]["slots_processing"]}
    return web.json_response(body, status=200 if usable else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY_KEY]),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard(_: web.Request) -> web.Response:
    page = resources.files("agentcheck").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def _operator(drain: bool):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> web.Response:
        refusal = token_refusal(request.headers.get("Authorization"), request.app[TOKEN_KEY])
        if refusal is not None:
            return _error(*refusal)
        name = request.match_info["name"]
        state = request.app[STATE_KEY]
        try:
            state.set_drained(name, drain)
        except KeyError:
            return _error(404, f"no backend named {name!r}")
        return web.json_response({"name": name, "drained": drain,
                                  "agent_check_reply": (state.reply_for(name) or "").rstrip("\n")})
    return handle


def create_app(state: FleetState, registry: CollectorRegistry, operator_token: str | None,
               standby: frozenset[str]) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    app[REGISTRY_KEY] = registry
    app[TOKEN_KEY] = operator_token or ""
    app[STANDBY_KEY] = standby
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/v1/agents", agents)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/v1/agents/{name}/drain", _operator(drain=True))
    app.router.add_post("/api/v1/agents/{name}/ready", _operator(drain=False))
    return app
