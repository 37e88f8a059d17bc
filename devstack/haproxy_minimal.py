"""The smallest haproxy.cfg that makes HAProxy slot-aware with paddler-agent.

Hand-written on purpose (the generated, production config is ``paddler-gen``'s job): it
shows exactly which HAProxy features carry the design. No ``maxconn`` per server: the
agent sets it from the slots it sees, so a stack built on this config proves the agent works.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = """\
global
    stats socket {socket} mode 600 level admin
    maxconn 2000

defaults
    mode http
    option http-no-delay
    timeout connect 2s
    # Inactivity timers: long generations and SSE streams survive while tokens flow.
    timeout client 300s
    timeout server 300s
    # How long a request may wait in the backend queue for a free slot.
    timeout queue {queue_timeout_ms}ms

frontend llm
    bind {listen}
    default_backend llama

backend llama
    balance leastconn
{servers}
"""

SERVER = ("    server {name} {address} weight 100 agent-check agent-addr {agent_host} agent-port {agent_port} "
          "agent-inter {inter_ms}ms agent-send \"{name}\\n\"")


def minimal_haproxy_config(servers: dict[str, str], listen: str, agent_host: str, agent_port: int,
                           stats_socket: Path, agent_inter: float = 1.0, queue_timeout: float = 120.0) -> str:
    """``servers`` maps server name → host:port; names must already be validated fleet names."""
    lines = "\n".join(SERVER.format(name=name, address=address, agent_host=agent_host, agent_port=agent_port,
                                    inter_ms=int(agent_inter * 1000)) for name, address in servers.items())
    return TEMPLATE.format(socket=stats_socket, listen=listen, servers=lines,
                           queue_timeout_ms=int(queue_timeout * 1000))
