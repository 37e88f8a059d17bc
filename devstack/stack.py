"""A whole balancer stack as a user runs it: fleet file → paddler-agent + paddler-gen → HAProxy or Envoy.

Everything goes through the real commands (``python -m agentcheck --fleet``, ``python -m
generator.main haproxy|envoy``), so tests and the demo exercise exactly what an operator types.
llama-servers are started (and stopped, and restarted) by the caller, so scenarios can
have backends that are down or not started yet.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from devstack.processes import LOOPBACK, AgentProcess, EnvoyProcess, HAProxy, free_ports, http_get, wait_until
from generator import envoy, haproxy
from generator.haproxy import BACKEND_NAME


class BalancerStack:
    """paddler-agent plus HAProxy or Envoy (``kind``) for a fleet; ``backends``/``standby`` map names
    to host:port. Observations that both proxies share (``/health``, ``is_up``) work for either.
    ``models`` declares backends' models (name → model list), ``slots`` their slot counts (the fleet's
    ``slots:``); ``top`` adds top-level fleet keys (``models``, ``default_model``)."""

    def __init__(self, workdir: Path, backends: dict[str, str], standby: dict[str, str] | None = None,
                 balancer: dict[str, Any] | None = None, interval: str = "500ms",
                 agent: dict[str, Any] | None = None, statsd: dict[str, Any] | None = None,
                 agent_env: dict[str, str] | None = None, kind: str = "haproxy",
                 master_worker: bool = False, models: dict[str, list[str]] | None = None,
                 top: dict[str, Any] | None = None, slots: dict[str, int] | None = None) -> None:
        self.kind = kind
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.agent_port, self.management_port, self.admin_port = free_ports(4)
        proxy_keys = ({"stats_socket": str(self.workdir / "haproxy.sock")} if kind == "haproxy"
                      else {"metrics_listen": f"{LOOPBACK}:{self.admin_port}"})
        declared = models or {}

        def entry(name: str, address: str) -> dict[str, Any]:
            return {"name": name, "address": address, **({"models": declared[name]} if name in declared else {}),
                    **({"slots": slots[name]} if slots and name in slots else {})}

        self.fleet: dict[str, Any] = {
            "backends": [entry(name, address) for name, address in backends.items()],
            "standby": [entry(name, address) for name, address in (standby or {}).items()],
            "agent": {"listen": f"{LOOPBACK}:{self.agent_port}", "management": f"{LOOPBACK}:{self.management_port}",
                      "interval": interval, **(agent or {})},
            "balancer": {"listen": f"{LOOPBACK}:{self.port}", **proxy_keys, **(balancer or {})},
        }
        if statsd is not None:
            self.fleet["statsd"] = statsd
        self.fleet.update(top or {})
        self.fleet_path = self.workdir / "fleet.yaml"
        self.fleet_path.write_text(yaml.safe_dump(self.fleet, sort_keys=False))
        self.agent = AgentProcess(self.workdir, ["--fleet", str(self.fleet_path)], port=self.agent_port,
                                  extra_env=agent_env, management_port=self.management_port)
        self.config = generate_config(kind, self.fleet_path)
        self.proxy: HAProxy | EnvoyProcess
        if kind == "haproxy":
            self.haproxy = self.proxy = HAProxy(self.config, self.workdir, master_worker=master_worker)
        else:
            self.envoy = self.proxy = EnvoyProcess(self.config, self.workdir, f"http://{LOOPBACK}:{self.admin_port}")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> BalancerStack:
        self.agent.start()
        try:
            self.proxy.start()
        except Exception:
            self.agent.stop()
            raise
        return self

    def stop(self) -> None:
        self.proxy.stop()
        self.agent.stop()

    def __enter__(self) -> BalancerStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def server(self, name: str) -> dict[str, str]:
        return self.haproxy.server(BACKEND_NAME, name)

    def backends_api(self, method: str, name: str, token: str, body: dict[str, str] | None = None) -> int:
        """The agent's membership API (``/api/v1/backends/<name>``) as an operator's script calls it: the status."""
        request = urllib.request.Request(f"{self.agent.management_url}/api/v1/backends/{name}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)

    def agents(self) -> dict[str, dict[str, Any]]:
        status, body = http_get(self.agent.management_url + "/api/v1/agents")
        return {row["name"]: row for row in json.loads(body)["agents"]} if status == 200 else {}

    def health(self) -> dict[str, Any]:
        """The balancer's own aggregated /health, with the HTTP status as ``http``."""
        status, body = http_get(self.url + "/health")
        return {"http": status, **(json.loads(body) if body else {})}

    def is_up(self, name: str) -> bool:
        """Would the proxy send new requests to this backend? HAProxy: its server state; Envoy: the
        picker's view (the agent's), which is what routes, once Envoy has applied its endpoint."""
        if self.kind == "haproxy":
            return self.haproxy.server_takes_requests(BACKEND_NAME, name)
        row = self.agents().get(name)
        return bool(row) and row["state"] == "ready" and not row["drained"] and row["in_balancer"]

    def wait_slots(self, slots: dict[str, int], timeout: float = 10.0) -> None:
        """Wait until the proxy routes to each server knowing its real slot count."""
        for name, count in slots.items():
            if self.kind == "haproxy":
                wait_until(functools.partial(self._haproxy_sees, name, count), timeout=timeout,
                           what=f"HAProxy to see {name} up with {count} slots")
            else:
                wait_until(functools.partial(self._envoy_sees, name, count), timeout=timeout,
                           what=f"the picker and Envoy to see {name} ready with {count} slots")

    def wait_idle(self, slots: int, timeout: float = 10.0) -> None:
        """Wait until the balancer's /health counts ``slots`` idle. Behind Envoy that is once the picker has
        settled after opening (Picker.open), so a request sent then is placed at once rather than waiting."""
        wait_until(lambda: self.health().get("slots_idle") == slots, timeout=timeout,
                   what=f"the balancer to count {slots} slots idle")

    def _haproxy_sees(self, name: str, slots: int) -> bool:
        return self.is_up(name) and self.server(name)["slim"] == str(slots)

    def _envoy_sees(self, name: str, slots: int) -> bool:
        address = next(e["address"] for e in self.fleet["backends"] + self.fleet["standby"] if e["name"] == name)
        return (self.is_up(name) and self.agents()[name]["slots_total"] == slots
                and self.envoy.host_health().get(address) == "healthy")


def generate_config(kind: str, fleet_path: Path) -> str:
    """Run ``paddler-gen <kind> --check`` exactly as a user would; Lua from this checkout."""
    lua_dir = (haproxy.packaged_lua_path() if kind == "haproxy" else envoy.packaged_lua_path()).parent
    result = subprocess.run(
        [sys.executable, "-m", "generator.main", kind, "--fleet", str(fleet_path), "--lua-dir", str(lua_dir),
         "--check"],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"paddler-gen failed ({result.returncode}): {result.stderr}")
    return result.stdout
