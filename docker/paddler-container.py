#!/usr/bin/env python3
"""Entrypoint and HEALTHCHECK of the paddler-agent, paddler-haproxy and paddler-envoy images.

    paddler-container agent [paddler-agent options]   # exec paddler-agent --fleet FILE
    paddler-container haproxy                          # paddler-gen haproxy --check, then exec haproxy
    paddler-container envoy                            # paddler-gen envoy --check, then exec envoy
    paddler-container render haproxy|envoy             # print the config (docker run --entrypoint paddler-container)
    paddler-container health agent|haproxy|envoy       # the image's HEALTHCHECK

The fleet file, in this order: the YAML text in ``PADDLER_FLEET_YAML`` (handy for one-off
``docker run -e``), else the file at ``PADDLER_FLEET`` (default ``/etc/paddler/fleet.yaml``,
mount it there), else the embedded default (one llama-server on 127.0.0.1:8080). Configs are
rendered at every start, so a changed fleet file needs a container restart, not a rebuild.

Health means "this process answers its own protocol": llama.cpp-style ``/health`` JSON (200
``ok`` or 503 ``unavailable``) from the agent's management API or the balancer's listener,
Envoy's admin ``/ready`` when the fleet gives Envoy an admin address. A balancer whose whole
fleet is down is alive and says so in its ``/health`` body; it is not restarted for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_FLEET = "/etc/paddler/fleet.yaml"
LUA_DIRS = {"haproxy": "/etc/haproxy/paddler", "envoy": "/etc/envoy/paddler"}


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"paddler-container: {message}", file=sys.stderr)
    sys.exit(status)


def run_dir() -> Path:
    path = Path(os.environ.get("PADDLER_RUN_DIR", "/tmp/paddler"))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def fleet_path() -> str | None:
    """The fleet file to use, or None for the embedded default."""
    text = os.environ.get("PADDLER_FLEET_YAML")
    if text:
        path = run_dir() / "fleet.yaml"
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        path.chmod(0o600)
        return str(path)
    configured = os.environ.get("PADDLER_FLEET")
    if configured:
        if not Path(configured).is_file():
            fail(f"PADDLER_FLEET={configured}: no such file (mount the fleet file there)")
        return configured
    return DEFAULT_FLEET if Path(DEFAULT_FLEET).is_file() else None


def fleet_args() -> list[str]:
    path = fleet_path()
    return ["--fleet", path] if path else []


def render(proxy: str) -> str:
    """paddler-gen <proxy> --check: the config, validated by the proxy binary in this image."""
    result = subprocess.run(["paddler-gen", proxy, *fleet_args(), "--lua-dir", LUA_DIRS[proxy], "--check"],
                            capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return result.stdout


def write_config(proxy: str, name: str) -> str:
    path = run_dir() / name
    path.write_text(render(proxy), encoding="utf-8")
    return str(path)


def load() -> Any:
    from fleet import FleetError, default_fleet, load_fleet

    path = fleet_path()
    try:
        return load_fleet(path) if path else default_fleet()
    except FleetError as exc:
        fail(str(exc))


def local(address: Any) -> str:
    """An address to reach a listener in this network namespace (0.0.0.0 → loopback)."""
    from fleet.contract import client_address

    return str(client_address(address))


def answers_health(url: str) -> bool:
    """llama.cpp-style /health: 200 with status ok, or 503 with status unavailable; JSON either way."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False
    try:
        state = json.loads(body).get("status")
    except (ValueError, AttributeError):
        state = None
    print(f"{url}: HTTP {status} {body[:200].decode(errors='replace')}")
    return (status, state) in ((200, "ok"), (503, "unavailable"))


def answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            print(f"{url}: HTTP {response.status}")
            return response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False


def health(role: str) -> int:
    fleet = load()
    if role == "agent":
        ok = answers_health(f"http://{local(fleet.agent.management)}/health")
    elif role == "haproxy":
        ok = answers_health(f"http://{local(fleet.balancer.listen)}/health")
    elif role == "envoy" and fleet.balancer.metrics_listen is not None:
        ok = answers_ready(f"http://{local(fleet.balancer.metrics_listen)}/ready")
    elif role == "envoy":
        ok = answers_health(f"http://{local(fleet.balancer.listen)}/health")
    else:
        fail(f"health: unknown role {role!r} (agent, haproxy, envoy)")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if not argv:
        fail("usage: paddler-container agent|haproxy|envoy|render PROXY|health ROLE")
    command, rest = argv[0], argv[1:]
    if command == "agent":
        os.execvp("paddler-agent", ["paddler-agent", *fleet_args(), *rest])
    if command == "haproxy":
        config = write_config("haproxy", "haproxy.cfg")
        # -W master-worker, -db foreground; STOPSIGNAL SIGUSR1 in the image = soft stop.
        os.execvp("haproxy", ["haproxy", "-W", "-db", "-f", config, *rest])
    if command == "envoy":
        config = write_config("envoy", "envoy.yaml")
        os.execvp("envoy", ["envoy", "-c", config, "--disable-hot-restart", "--log-level", "warn",
                              "--concurrency", "1", *rest])
    if command == "render" and rest and rest[0] in LUA_DIRS:
        sys.stdout.write(render(rest[0]))
        return 0
    if command == "health" and len(rest) == 1:
        return health(rest[0])
    fail(f"unknown command {' '.join(argv)!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
