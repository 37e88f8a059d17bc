"""The balancing strategies compared, each started in front of the same (simulated) fleet.

- ``roundrobin``, ``leastconn``: plain HAProxy as most teams run it, no slot limits, no agent (with
  ``option http-no-delay`` like ours, so only the routing differs).
- ``paddler-haproxy``, ``paddler-envoy``: this project, configs from ``paddler-gen`` with the real agent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from devstack.processes import HAProxy, free_port
from devstack.stack import BalancerStack

STRATEGIES = ("roundrobin", "leastconn", "paddler-haproxy", "paddler-envoy")

PLAIN_HAPROXY = """\
global
    maxconn 4096
    stats socket {socket} mode 600 level admin

defaults
    mode http
    option http-no-delay
    timeout connect 2s
    timeout client 300s
    timeout server 300s

frontend llm
    bind 127.0.0.1:{port}
    default_backend llama

backend llama
    balance {algorithm}
{servers}
"""


@contextlib.contextmanager
def run_strategy(name: str, servers: dict[str, str], slots: dict[str, int], workdir: Path,
                 agent_interval: str = "1s", balancer: dict | None = None) -> Iterator[str]:
    """Start ``name`` in front of ``servers`` (name → host:port); yields the URL to send requests to."""
    if name in ("roundrobin", "leastconn"):
        port = free_port()
        lines = "\n".join(f"    server {n} {address}" for n, address in servers.items())
        config = PLAIN_HAPROXY.format(socket=workdir / "haproxy.sock", port=port, algorithm=name, servers=lines)
        with HAProxy(config, workdir):
            yield f"http://127.0.0.1:{port}"
        return
    kind = name.removeprefix("paddler-")
    with BalancerStack(workdir, servers, kind=kind, interval=agent_interval, balancer=balancer) as stack:
        stack.wait_slots(slots, timeout=20)
        yield stack.url
