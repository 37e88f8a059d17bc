"""Render haproxy.cfg from a fleet: a plain context builder plus a Jinja template in configs/haproxy/.

The template holds structure; every decision (starting maxconn, addresses, units) is made
here, in Python, where it is tested. Missing template variables are errors (StrictUndefined).
Values from outside the fleet (its path, the Lua directory) pass generator.templates first.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from fleet import Fleet, contract
from generator.templates import comment_text, lua_file, render, validate

BACKEND_NAME = contract.HAPROXY_BACKEND
LUA_FILE = "paddler.lua"
DEFAULT_LUA_DIR = "/etc/haproxy/paddler"
GLOBAL_MAXCONN = 4096
# HAProxy's /health check (the template says why): a refused connection is seen within
# CHECK_INTER + CHECK_FASTINTER, and a slow answer fails only after CHECK_TIMEOUT.
CHECK_INTER = 0.1
CHECK_FASTINTER = 0.05
CHECK_FALL = 2
CHECK_TIMEOUT = 10.0
# tune.bufsize above balancer.max_request_body, for the request line and headers (HAProxy keeps
# tune.maxrewrite of each buffer, at most 1 KiB, for rewrites): the whole body fits in one buffer.
HEADERS_ROOM = 64 * 1024
# How long HAProxy waits for a request body whose model it must read: the request's own timeout.
BODY_WAIT = 30.0


def packaged_lua_path() -> Path:
    """paddler.lua as shipped with this package (configs/haproxy/)."""
    return Path(str(resources.files("configs.haproxy") / LUA_FILE))


def haproxy_duration(seconds: float) -> str:
    """HAProxy time syntax: whole seconds as ``10s``, anything finer in milliseconds."""
    milliseconds = round(seconds * 1000)
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def haproxy_lua_path(lua_dir: str = DEFAULT_LUA_DIR) -> str:
    """The ``lua-load`` path for ``--lua-dir``; ValueError unless lua_dir is allow-listed."""
    return lua_file(lua_dir, LUA_FILE)


def model_backend(model: str) -> str:
    """The HAProxy backend (one queue) of a model's pool: llama.<model> (model names are proxy-name safe)."""
    return f"{BACKEND_NAME}.{model}"


def pool_context(fleet: Fleet) -> list[dict[str, Any]]:
    """The backends to render: the one `llama` backend, or with model-aware routing one per model, holding
    the servers that declare that model and those whose models the agent discovers. Each server line of a
    model's pool asks the agent for that model (agent-send "<name> model=<model>")."""
    groups = ((False, fleet.backends), (True, fleet.standby))
    if not fleet.routes_by_model():
        return [{"name": BACKEND_NAME, "model": None, "spares": contract.spare_server_names(
            fleet.balancer.spare_servers), "servers": [
                {"name": backend.name, "address": str(backend.address), "agent_send": backend.name,
                 # Until the agent's first reply: the configured slots, else 1 (safe: never overfill).
                 "maxconn": backend.slots or 1, "backup": backup}
                for backup, group in groups for backend in group]}]
    pools = []
    for model in fleet.model_names():
        queue_limit, queue_timeout = fleet.limits(model)
        pools.append({
            "name": model_backend(model), "model": model, "spares": [],
            "max_buffered_requests": queue_limit, "buffered_request_timeout": haproxy_duration(queue_timeout),
            "servers": [{"name": backend.name, "address": str(backend.address), "maxconn": 1, "backup": backup,
                         "agent_send": f"{backend.name} model={model}"}
                        for backup, group in groups for backend in group
                        if backend.models is None or model in backend.models]})
    return pools


def model_context(fleet: Fleet) -> dict[str, Any]:
    """What the frontend does with request bodies: read them (routing by model, affinity), and route by
    model; nothing for a one-model fleet without affinity."""
    reads_body = fleet.routes_by_model() or fleet.balancer.affinity
    body_reading = {
        "route_keys": list(contract.MODEL_ROUTES),
        "body_wait": haproxy_duration(BODY_WAIT),
        "max_request_body": fleet.balancer.max_request_body,
        "bufsize": fleet.balancer.max_request_body + HEADERS_ROOM,
    } if reads_body else None
    if not fleet.routes_by_model():
        return {"body_reading": body_reading, "model_routing": None, "affinity": fleet.balancer.affinity}
    default = fleet.request_default_model()
    names = fleet.model_names()
    return {"body_reading": body_reading, "affinity": fleet.balancer.affinity, "model_routing": {
        "default_backend": model_backend(default or names[0]),
        "models_body": contract.models_list(names),
        "not_found_body": contract.MODEL_NOT_FOUND,
        "not_json_body": contract.BODY_NOT_JSON,
        "missing_body": contract.MODEL_MISSING,
        "too_large_body": contract.body_too_large(fleet.balancer.max_request_body),
    }}


def lua_env(fleet: Fleet) -> list[tuple[str, Any]]:
    """What paddler.lua reads at load, by the fleet file's names (fleet/contract.py)."""
    balancer = fleet.balancer
    env: list[tuple[str, Any]] = [
        (contract.HAPROXY_LUA_ENV["backend"], BACKEND_NAME),
        (contract.HAPROXY_LUA_ENV["max_buffered_requests"], balancer.max_buffered_requests),
        (contract.HAPROXY_LUA_ENV["buffered_request_timeout_ms"], round(balancer.buffered_request_timeout * 1000))]
    if fleet.routes_by_model():
        limits = {model: fleet.limits(model) for model in fleet.model_names()}
        env.append((contract.HAPROXY_LUA_ENV["models"], "/".join(
            f"{model},{queue_limit},{round(queue_timeout * 1000)}" for model, (queue_limit, queue_timeout)
            in limits.items())))
        if (default := fleet.request_default_model()) is not None:
            env.append((contract.HAPROXY_LUA_ENV["default_model"], default))
    if balancer.affinity:
        env.append((contract.HAPROXY_LUA_ENV["affinity"], "on"))
        if balancer.affinity_wait is not None:
            env.append((contract.HAPROXY_LUA_ENV["affinity_wait_ms"], round(balancer.affinity_wait * 1000)))
    if fleet.routes_by_model() or balancer.affinity:
        env.append((contract.HAPROXY_LUA_ENV["max_request_body"], balancer.max_request_body))
    return env


def haproxy_context(fleet: Fleet, lua_dir: str = DEFAULT_LUA_DIR) -> dict[str, Any]:
    agent = contract.client_address(fleet.agent.listen)
    balancer = fleet.balancer
    return {
        "source": comment_text(fleet.source),
        "agent_address": str(agent),
        "agent_host": agent.host,
        "agent_port": agent.port,
        "agent_inter": haproxy_duration(fleet.agent.interval),
        "check_inter": haproxy_duration(CHECK_INTER),
        "check_fastinter": haproxy_duration(CHECK_FASTINTER),
        "check_fall": CHECK_FALL,
        "check_downinter": haproxy_duration(contract.haproxy_down_recheck(fleet.agent.interval)),
        "check_timeout": haproxy_duration(CHECK_TIMEOUT),
        "backend_name": BACKEND_NAME,
        "pools": pool_context(fleet),
        "listen": str(balancer.listen),
        "max_buffered_requests": balancer.max_buffered_requests,
        "buffered_request_timeout": haproxy_duration(balancer.buffered_request_timeout),
        "lua_env": lua_env(fleet),
        "idle_timeout": haproxy_duration(balancer.idle_timeout),
        "expose_slots": balancer.expose_slots,
        "expose_admin": balancer.expose_admin,
        "stats_socket": balancer.stats_socket,
        "metrics_listen": str(balancer.metrics_listen) if balancer.metrics_listen else None,
        "global_maxconn": GLOBAL_MAXCONN,
        "lua_path": haproxy_lua_path(lua_dir),
        "retry_after": contract.RETRY_AFTER_SECONDS,
        "buffer_full_body": contract.BUFFER_FULL,
        "buffer_timeout_body": contract.BUFFER_TIMEOUT,
        **route_context(balancer.expose_slots, balancer.expose_admin),
        **model_context(fleet),
    }


def route_context(expose_slots: bool, expose_admin: bool) -> dict[str, Any]:
    """The allow-list as ACL lines, one per path and verdict (forward, slots, admin), with the 403
    rules for the refusals that occur and the 404 body for everything else."""
    lines: dict[tuple[str, str], list[str]] = {}
    for key, verdict in contract.route_table(expose_slots, expose_admin).items():
        lines.setdefault((verdict, key.split(":", 1)[1]), []).append(key)
    bodies = {contract.SLOTS: contract.SLOTS_FORBIDDEN, contract.ADMIN: contract.ADMIN_FORBIDDEN}
    verdicts = {verdict for verdict, _ in lines}
    return {
        "route_acls": [{"verdict": verdict, "route_keys": keys} for (verdict, _), keys in lines.items()],
        "refusals": [{"verdict": verdict, "body": body} for verdict, body in bodies.items() if verdict in verdicts],
        "not_exposed_body": contract.NOT_EXPOSED,
    }


def render_haproxy(fleet: Fleet, lua_dir: str = DEFAULT_LUA_DIR) -> str:
    return render("haproxy", "haproxy.cfg.j2", haproxy_context(fleet, lua_dir))


def haproxy_binary() -> str | None:
    """HAProxy on PATH, or where Debian puts it (root's PATH may lack /usr/sbin)."""
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def check_haproxy_text(binary: str, text: str) -> None:
    """``haproxy -c`` on exactly ``text``; CheckError with HAProxy's own words if it refuses."""
    validate(lambda path: [binary, "-c", "-f", path], text, ".cfg")


def check_haproxy(fleet: Fleet) -> str | None:
    """Validate the fleet's config with the local ``haproxy -c``, Lua from this package (its own render,
    not the one the CLI prints: ``paddler-gen --check`` uses check_haproxy_text); None when HAProxy is absent."""
    binary = haproxy_binary()
    if binary is None:
        return None
    check_haproxy_text(binary, render_haproxy(fleet, lua_dir=str(packaged_lua_path().parent)))
    return binary
