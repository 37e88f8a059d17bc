"""The balancing strategies compared, each started in front of the same (simulated) fleet.

- ``roundrobin``, ``leastconn``: plain HAProxy as most teams run it, no slot limits, no agent (with
  ``option http-no-delay`` like ours, so only the routing differs).
- ``paddler-haproxy`` (the fleet's defaults, as shipped), ``paddler-haproxy-slots-only``
  (``balancer.affinity: false``), ``paddler-haproxy-affinity`` (``true``), ``paddler-envoy``,
  ``paddler-envoy-affinity``, and each proxy's ``-affinity-wait`` (``affinity_wait: 500ms``): this project,
  configs from ``paddler-gen`` with the real agent.
- ``envoy-least_request``: plain Envoy as most teams run it: a static cluster of the servers, ``LEAST_REQUEST``
  (two random choices), Envoy's default circuit breakers, no route timeout (answers stream), one worker.
- ``paddler-envoy-agent-down``: the generated Envoy config without the Lua filter, i.e. its fallback while the
  agent is away, for a fleet file that declares every server's ``slots:`` as docs/envoy.md advises
  (``least_request`` with every server capped at the fleet's fewest slots; without ``slots:``, at 1).
  ``paddler-envoy-agent-down-largest``: the same with ``balancer.envoy_fallback_per_server`` at the largest
  server's slots (every slot usable; the smaller servers then get more than they have).
- Peers, from PyPI into their own virtualenv (``bench/peers.sh``; ``PADDLER_PEERS_VENV``), skipped when
  absent: ``sglang-<policy>`` is SGLang's model gateway (``sglang-router --backend openai``),
  ``vllm-router-<policy>`` vLLM's router. Both get the fleet's slot total as their concurrency limit and
  Paddler's buffer (``Buffer``: 30 waiting, 10 s unless the run says otherwise) as their queue, the nearest
  they have to our semantics. They serve OpenAI's chat API only, so they run the ``conversation`` scenario.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from bench.envoy_picker_bench import without_lua
from devstack.processes import EnvoyProcess, HAProxy, free_port, wait_until
from devstack.stack import BalancerStack
from fleet import BalancerConfig
from generator.envoy import envoy_binary
from generator.haproxy import haproxy_binary

PEERS_VENV = Path(os.environ.get("PADDLER_PEERS_VENV", Path(__file__).resolve().parents[3] / "peers-venv"))
SGLANG_POLICIES = ("cache_aware", "power_of_two")
VLLM_POLICIES = ("cache_aware", "power_of_two")
PEERS = tuple(f"sglang-{p}" for p in SGLANG_POLICIES) + tuple(f"vllm-router-{p}" for p in VLLM_POLICIES)
STRATEGIES = ("roundrobin", "leastconn", "haproxy-hash-bounded", "paddler-haproxy", "paddler-haproxy-slots-only",
              "paddler-haproxy-affinity", "paddler-haproxy-affinity-wait", "paddler-envoy", "paddler-envoy-affinity",
              "paddler-envoy-affinity-wait", "paddler-envoy-agent-down", "paddler-envoy-agent-down-largest",
              "envoy-least_request", *PEERS)
# Strategies whose clients send each conversation's id in X-Session-Id: HAProxy's own hashing has no other key
# (it cannot hash a JSON body's leading messages), so it gets the one an application would send.
SESSION_HEADER = frozenset({"haproxy-hash-bounded"})
# This project's strategies: the proxy, and the fleet file's balancer settings beside the defaults.
PADDLER = {"paddler-haproxy": ("haproxy", {}), "paddler-haproxy-slots-only": ("haproxy", {"affinity": False}),
           "paddler-haproxy-affinity": ("haproxy", {"affinity": True}),
           "paddler-haproxy-affinity-wait": ("haproxy", {"affinity": True, "affinity_wait": "500ms"}),
           "paddler-envoy": ("envoy", {}),
           "paddler-envoy-affinity": ("envoy", {"affinity": True}),
           "paddler-envoy-affinity-wait": ("envoy", {"affinity": True, "affinity_wait": "500ms"})}
CHAT_ONLY = frozenset(PEERS)  # strategies that serve /v1/chat/completions only


class Buffer(NamedTuple):
    """Requests that may wait for a slot, and for how long: the fleet file's ``balancer.max_buffered_requests``
    and ``buffered_request_timeout``, and the same queue for every strategy that has one."""
    requests: int = BalancerConfig().max_buffered_requests
    timeout: float = BalancerConfig().buffered_request_timeout

    def fleet_keys(self) -> dict[str, Any]:
        return {"max_buffered_requests": self.requests, "buffered_request_timeout": f"{self.timeout:g}s"}


DEFAULT_BUFFER = Buffer()  # as shipped, and Paddler's

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

# HAProxy's bounded-load consistent hashing (docs/affinity.md): a session's requests go to the server its id
# hashes to, unless that server already has 25 % more connections than the average; each server admits its
# slots (maxconn) and the excess waits in HAProxy's queue, as long as Paddler's buffer lets a request wait.
HASH_BOUNDED = """hash req.hdr(x-session-id)
    hash-type consistent
    hash-balance-factor 125
    timeout queue {queue_timeout}s"""
# Plain HAProxy strategies: the backend's balance algorithm, and what each server line adds ({slots}: its slots).
PLAIN_HAPROXY_STRATEGIES = {"roundrobin": ("roundrobin", ""), "leastconn": ("leastconn", ""),
                            "haproxy-hash-bounded": (HASH_BOUNDED, " maxconn {slots}")}


def peer(name: str) -> tuple[str, str, str] | None:
    """(package, policy, executable) of a peer strategy, or None for ours and plain ones."""
    for prefix, package, executable in (("sglang-", "sglang-router", "sglang-router"),
                                        ("vllm-router-", "vllm-router", "vllm-router")):
        if name.startswith(prefix):
            return package, name.removeprefix(prefix), str(PEERS_VENV / "bin" / executable)
    return None


def peer_version(name: str) -> str | None:
    """The installed version of a peer strategy's package, None when it is not installed."""
    found = peer(name)
    if found is None or not Path(found[2]).exists():
        return None
    result = subprocess.run([str(PEERS_VENV / "bin" / "python"), "-m", "pip", "show", found[0]],
                            capture_output=True, text=True)
    return next((line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
                 if line.startswith("Version:")), None)


def peer_command(name: str, servers: dict[str, str], slots: dict[str, int], port: int,
                 metrics_port: int, buffer: Buffer) -> list[str]:
    """How a peer is started (its exact flags go into the report)."""
    found = peer(name)
    assert found is not None, name
    package, policy, executable = found
    if package == "sglang-router":
        command = [str(PEERS_VENV / "bin" / "python"), "-m", "sglang_router.launch_router", "--backend", "openai"]
    else:
        command = [executable]
    return [
        *command, "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *(f"http://{address}" for address in servers.values()),
        "--policy", policy, "--max-concurrent-requests", str(sum(slots.values())),
        "--queue-size", str(buffer.requests), "--queue-timeout-secs", str(round(buffer.timeout)),
        "--prometheus-port", str(metrics_port), "--log-level", "warn" if package == "sglang-router" else "warning"]


@contextlib.contextmanager
def run_strategy(name: str, servers: dict[str, str], slots: dict[str, int], workdir: Path,
                 agent_interval: str = "1s", buffer: Buffer = DEFAULT_BUFFER) -> Iterator[str]:
    """Start ``name`` in front of ``servers`` (name → host:port); yields the URL to send requests to."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name in PLAIN_HAPROXY_STRATEGIES:
        port = free_port()
        with HAProxy(plain_haproxy(name, servers, slots, port, workdir / "haproxy.sock", buffer), workdir):
            yield f"http://127.0.0.1:{port}"
        return
    if peer(name) is not None:
        with _peer(name, servers, slots, workdir, buffer) as url:
            yield url
        return
    if name == "envoy-least_request":
        listen, admin = free_port(), free_port()
        with _envoy(plain_envoy(servers, listen, admin), workdir, listen, admin) as url:
            yield url
        return
    if name in ("paddler-envoy-agent-down", "paddler-envoy-agent-down-largest"):
        cap = {"envoy_fallback_per_server": max(slots.values())} if name.endswith("-largest") else {}
        with BalancerStack(workdir / "stack", servers, kind="envoy", interval=agent_interval, slots=slots,
                           balancer={**cap, **buffer.fleet_keys()}) as stack:
            stack.wait_slots(slots, timeout=20)
            listen, admin = free_port(), free_port()
            with _envoy(without_lua(stack.config, listen, admin), workdir, listen, admin) as url:
                yield url
        return
    kind, balancer = PADDLER[name]
    with BalancerStack(workdir, servers, kind=kind, interval=agent_interval,
                       balancer={**balancer, **buffer.fleet_keys()}) as stack:
        stack.wait_slots(slots, timeout=20)
        stack.wait_idle(sum(slots.values()), timeout=20)
        yield stack.url


def plain_haproxy(name: str, servers: dict[str, str], slots: dict[str, int], port: int, socket: Path,
                  buffer: Buffer) -> str:
    """HAProxy's config for a plain HAProxy strategy."""
    algorithm, server_options = PLAIN_HAPROXY_STRATEGIES[name]
    lines = "\n".join(f"    server {n} {address}{server_options.format(slots=slots[n])}"
                      for n, address in servers.items())
    return PLAIN_HAPROXY.format(socket=socket, port=port, servers=lines,
                                algorithm=algorithm.format(queue_timeout=round(buffer.timeout)))


def proxy_report(name: str, servers: dict[str, str], slots: dict[str, int],
                 buffer: Buffer) -> dict[str, Any] | None:
    """For a plain proxy strategy: the proxy, its version and its exact config (ports as 0), for the report."""
    if name in PLAIN_HAPROXY_STRATEGIES:
        binary, version_flag, flags = haproxy_binary(), "-v", []
        config = plain_haproxy(name, servers, slots, 0, Path("haproxy.sock"), buffer)
    elif name == "envoy-least_request":
        binary, version_flag, flags = envoy_binary(), "--version", ["--concurrency", "1"]
        config = plain_envoy(servers, 0, 0)
    else:
        return None
    if binary is None:
        return None
    output = subprocess.run([binary, version_flag], capture_output=True, text=True).stdout.strip().splitlines()
    version = output[0].split("version: ")[-1] if output else None  # envoy prints its path first
    return {"package": Path(binary).name, "version": version, "config": config, "flags": flags}


def plain_envoy(servers: dict[str, str], listen: int, admin: int) -> str:
    """Envoy's bootstrap for ``envoy-least_request``: only what a streaming API needs beyond the defaults."""
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    manager = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                        ".HttpConnectionManager",
               "stat_prefix": "llm", "http_filters": [router],
               "route_config": {"virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": [
                   {"match": {"prefix": "/"}, "route": {"cluster": "llama", "timeout": "0s"}}]}]}}
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}
                 for host, port in (address.rsplit(":", 1) for address in servers.values())]
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "llm",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": manager}]}]}],
            "clusters": [{"name": "llama", "type": "STATIC", "lb_policy": "LEAST_REQUEST", "connect_timeout": "2s",
                          "load_assignment": {"cluster_name": "llama", "endpoints": [{"lb_endpoints": endpoints}]}}]}}
    return yaml.safe_dump(config)


@contextlib.contextmanager
def _envoy(config: str, workdir: Path, listen: int, admin: int) -> Iterator[str]:
    with EnvoyProcess(config, workdir / "envoy", f"http://127.0.0.1:{admin}"):
        ping = {"prompt": "ping", "n_predict": 1}
        wait_until(lambda: _answers(f"http://127.0.0.1:{listen}/completion", ping), timeout=20, what="Envoy")
        yield f"http://127.0.0.1:{listen}"


def _answers(url: str, body: dict[str, object]) -> bool:
    """A proxy in front of the simulator answers ``body`` with a 200."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:  # refused, reset, or an HTTP error status
        return False


class PeerFailed(RuntimeError):
    """A peer router that would not start or answer (its last log line says why)."""


@contextlib.contextmanager
def _peer(name: str, servers: dict[str, str], slots: dict[str, int], workdir: Path,
          buffer: Buffer) -> Iterator[str]:
    port = free_port()
    command = peer_command(name, servers, slots, port, free_port(), buffer)
    (workdir / "command.yaml").write_text(yaml.safe_dump(command))
    with open(workdir / "peer.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        chat = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        try:
            wait_until(lambda: process.poll() is not None or _answers(url + "/v1/chat/completions", chat), timeout=30,
                       what=name)
        except TimeoutError:
            pass
        if process.poll() is not None or not _answers(url + "/v1/chat/completions", chat):
            lines = (workdir / "peer.log").read_text(errors="replace").strip().splitlines()
            raise PeerFailed(f"{name} did not start: {lines[-1] if lines else 'no output'}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

