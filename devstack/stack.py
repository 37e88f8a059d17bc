"""A whole balancer stack as a user runs it: fleet file → paddler-agent + paddler-gen haproxy → HAProxy.

Everything goes through the real commands (``python -m agentcheck --fleet``, ``python -m
generator.main haproxy``), so tests and the demo exercise exactly what an operator types.
llama-servers are started (and stopped, and restarted) by the caller, so scenarios can
have backends that are down or not started yet.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from devstack.processes import LOOPBACK, AgentProcess, HAProxy, free_port, wait_until
from generator.haproxy import BACKEND_NAME, packaged_lua_path


class BalancerStack:
    """paddler-agent and HAProxy for a fleet; ``backends``/``standby`` map names to host:port."""

    def __init__(self, workdir: Path, backends: dict[str, str], standby: dict[str, str] | None = None,
                 balancer: dict[str, Any] | None = None, interval: str = "500ms",
                 agent: dict[str, Any] | None = None, statsd: dict[str, Any] | None = None,
                 agent_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.agent_port = free_port()
        self.fleet = {
            "backends": [{"name": name, "address": address} for name, address in backends.items()],
            "standby": [{"name": name, "address": address} for name, address in (standby or {}).items()],
            "agent": {"listen": f"{LOOPBACK}:{self.agent_port}", "interval": interval, **(agent or {})},
            "balancer": {"listen": f"{LOOPBACK}:{self.port}", "stats_socket": str(self.workdir / "haproxy.sock"),
                         **(balancer or {})},
        }
        if statsd is not None:
            self.fleet["statsd"] = statsd
        self.fleet_path = self.workdir / "fleet.yaml"
        self.fleet_path.write_text(yaml.safe_dump(self.fleet, sort_keys=False))
        self.agent = AgentProcess(self.workdir, ["--fleet", str(self.fleet_path)], port=self.agent_port,
                                  extra_env=agent_env)
        self.config = generate_haproxy_config(self.fleet_path)
        self.haproxy = HAProxy(self.config, self.workdir)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "BalancerStack":
        self.agent.start()
        try:
            self.haproxy.start()
        except Exception:
            self.agent.stop()
            raise
        return self

    def stop(self) -> None:
        self.haproxy.stop()
        self.agent.stop()

    def __enter__(self) -> "BalancerStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def server(self, name: str) -> dict[str, str]:
        return self.haproxy.server(BACKEND_NAME, name)

    def is_up(self, name: str) -> bool:
        return self.haproxy.server_is_up(BACKEND_NAME, name)

    def wait_slots(self, slots: dict[str, int], timeout: float = 10.0) -> None:
        """Wait until the agent has told HAProxy each server's real slot count and it is up."""
        for name, count in slots.items():
            wait_until(lambda: self.is_up(name) and self.server(name)["slim"] == str(count), timeout=timeout,
                       what=f"HAProxy to see {name} up with {count} slots")


def generate_haproxy_config(fleet_path: Path) -> str:
    """Run ``paddler-gen haproxy --check`` exactly as a user would; Lua from this checkout."""
    result = subprocess.run(
        [sys.executable, "-m", "generator.main", "haproxy", "--fleet", str(fleet_path),
         "--lua-dir", str(packaged_lua_path().parent), "--check"],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"paddler-gen failed ({result.returncode}): {result.stderr}")
    return result.stdout
