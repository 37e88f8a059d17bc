"""Envoy without the agent: the least_request fallback keeps every llama-server within its slots.

Real llama-servers (1 and 2 slots), the generated config, the agent killed while streams run.
Envoy runs with ``--concurrency 1`` (devstack's EnvoyProcess), as docs/envoy.md says to run it:
the per-host limit is exact for one worker (with W workers Envoy lets each worker's empty
connection pool open one connection past it). ``llamacpp:requests_deferred`` is sampled on every
server every 50 ms and must stay 0.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.processes import LOOPBACK, EnvoyProcess, LlamaServer, wait_until
from devstack.sampling import DeferralWatch
from devstack.stack import BalancerStack, generate_config
from fleet import contract
from tests.integration import clients

pytestmark = pytest.mark.real

REQUESTS = 60
CONCURRENCY = 8
MAX_TOKENS = 128


def fallback_stack(workdir: Path, servers: dict[str, LlamaServer], slots_in_fleet: bool,
                   balancer: dict[str, Any] | None = None) -> BalancerStack:
    """A BalancerStack whose fleet file gives each backend its ``slots:`` when asked, Envoy on one worker."""
    stack = BalancerStack(workdir, {name: server.address for name, server in servers.items()}, kind="envoy",
                          balancer=balancer)
    if slots_in_fleet:
        for backend in stack.fleet["backends"]:
            backend["slots"] = servers[backend["name"]].slots
    stack.fleet_path.write_text(yaml.safe_dump(stack.fleet, sort_keys=False))
    stack.config = generate_config("envoy", stack.fleet_path)
    stack.envoy = stack.proxy = EnvoyProcess(stack.config, stack.workdir, f"http://{LOOPBACK}:{stack.admin_port}")
    return stack


class Load:
    """REQUESTS streaming chats, CONCURRENCY at a time; every status counted (-1: a 200 cut short),
    every refusal by status, Retry-After and body."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.refusals: Counter[tuple[int, str | None, bytes]] = Counter()
        self.started = 0
        self.finished = 0
        self.lock = threading.Lock()

    def one(self, _: int) -> None:
        with self.lock:
            self.started += 1
        answer = clients.request(f"{self.url}/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": MAX_TOKENS,
                                  "ignore_eos": True, "stream": True}, timeout=60)
        with self.lock:
            if answer.status != 200:
                self.refusals[(answer.status, answer.headers.get("retry-after"), answer.body)] += 1
            elif b"data: [DONE]" not in answer.body:
                self.statuses[-1] += 1  # a 200 that did not stream to its end
            self.statuses[answer.status] += 1
            self.finished += 1

    def run(self, pool: ThreadPoolExecutor) -> Any:
        return pool.map(self.one, range(REQUESTS), timeout=60)


@pytest.mark.parametrize("slots_in_fleet", [True, False], ids=["slots-in-fleet", "no-slots"])
def test_the_fallback_never_overfills_a_server_while_the_agent_is_killed_under_load(
        make_llama: Callable[..., LlamaServer], tmp_path: Path, slots_in_fleet: bool) -> None:
    servers = {"one": make_llama("one", slots=1).start(), "two": make_llama("two", slots=2).start()}
    with fallback_stack(tmp_path / "lb", servers, slots_in_fleet) as stack:
        # 1 both ways: the fewest slots in the fleet, or no slots known for some backend.
        assert "per_host_thresholds:\n      - {priority: DEFAULT, max_connections: 1}\n" in stack.config
        stack.wait_slots({"one": 1, "two": 2})
        load = Load(stack.url)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = load.run(pool)
            wait_until(lambda: load.finished >= 12, timeout=30, what="requests through the picker")
            stack.agent.kill()
            # Requests the picker placed before the kill still run outside the fallback's limit
            # (docs/envoy.md): watch from when they are done.
            placed = load.started
            wait_until(lambda: load.finished >= placed, timeout=30, what="the picker's requests to finish")
            with DeferralWatch(servers, interval=0.05) as watch:
                list(results)
        calls_failed = stack.envoy.stats().get("cluster.paddler_agent.upstream_cx_connect_fail", 0)
    assert sum(load.statuses.values()) == REQUESTS
    assert load.finished > placed, "no request ran after the agent was gone"
    assert calls_failed > 0, "the filter never found the agent gone"
    assert all(count > 0 for count in watch.samples.values()), f"no samples: {watch.samples}"
    assert watch.max_deferred == {"one": 0.0, "two": 0.0}
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert set(load.refusals) <= {(503, "1", contract.BUFFER_FULL.encode())}, load.refusals
    assert load.statuses[200] > REQUESTS // 2, load.statuses


def test_beyond_the_fallbacks_queue_clients_get_the_buffer_full_answer(
        make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    servers = {"one": make_llama("one", slots=1).start(), "two": make_llama("two", slots=2).start()}
    with fallback_stack(tmp_path / "lb", servers, True, balancer={"max_buffered_requests": 2}) as stack:
        stack.wait_slots({"one": 1, "two": 2})
        stack.agent.stop()
        load = Load(stack.url)
        with DeferralWatch(servers, interval=0.05) as watch, ThreadPoolExecutor(CONCURRENCY) as pool:
            list(load.run(pool))
    # 8 at a time against 2 running (1 per server: the fewest slots) + 2 queued: the rest are refused.
    assert watch.max_deferred == {"one": 0.0, "two": 0.0}
    assert set(load.statuses) == {200, 503}, load.statuses
    assert set(load.refusals) == {(503, "1", contract.BUFFER_FULL.encode())}, load.refusals
    assert sum(load.statuses.values()) == REQUESTS
