"""Envoy-only behaviour: life without the agent (least_request fallback), and forged routing headers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web

from devstack.processes import LlamaServer, wait_until
from devstack.stack import BalancerStack
from tests.integration import clients
from tests.integration.misbehaving import BackgroundServers

pytestmark = pytest.mark.real


@pytest.fixture
def envoy_stack(make_llama: Callable[..., LlamaServer], tmp_path: Path) -> Iterator[BalancerStack]:
    small, large = make_llama("small", slots=1).start(), make_llama("large", slots=4).start()
    with BalancerStack(tmp_path / "lb", {"small": small.address, "large": large.address}, kind="envoy") as stack:
        stack.wait_slots({"small": 1, "large": 4})
        yield stack


def agent_calls(stack: BalancerStack) -> dict[str, int]:
    stats = stack.envoy.stats()
    return {"ok": stats.get("cluster.paddler_agent.upstream_rq_200", 0),
            "connect_failed": stats.get("cluster.paddler_agent.upstream_cx_connect_fail", 0)}


def test_envoy_keeps_serving_without_the_agent_and_says_so(envoy_stack: BalancerStack) -> None:
    stop = threading.Event()
    statuses: list[int] = []

    def keep_asking() -> None:
        while not stop.is_set() and len(statuses) < 500:
            statuses.append(clients.chat(envoy_stack.url, max_tokens=8).status)

    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(keep_asking)
        wait_until(lambda: len(statuses) >= 5, timeout=10, what="requests through the picker")
        envoy_stack.agent.stop()
        failures_before = agent_calls(envoy_stack)["connect_failed"]
        served_before = len(statuses)
        wait_until(lambda: len(statuses) >= served_before + 10, timeout=20, what="requests while the agent is away")
        assert agent_calls(envoy_stack)["connect_failed"] > failures_before, "Envoy's stats do not show the outage"

        envoy_stack.agent.start()
        picked_before = agent_calls(envoy_stack)["ok"]
        wait_until(lambda: agent_calls(envoy_stack)["ok"] > picked_before + 5, timeout=20,
                   what="requests through the picker again")
        stop.set()
        worker.result()
    assert set(statuses) == {200}, f"some requests failed: {sorted(set(statuses))}"


class Outsider:
    """An HTTP server outside the fleet that counts what reaches it."""

    def __init__(self) -> None:
        self.hits = 0

    def app(self) -> web.Application:
        async def anything(_: web.Request) -> web.Response:
            self.hits += 1
            return web.json_response({"model": "outsider"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


@pytest.mark.parametrize("agent_up", [True, False], ids=["picker", "fallback"])
def test_a_forged_routing_header_never_leaves_the_fleet(envoy_stack: BalancerStack, agent_up: bool) -> None:
    if not agent_up:
        envoy_stack.agent.stop()
    outsider = Outsider()
    with BackgroundServers() as servers:
        address = servers.http(outsider.app())
        for forged in (address, f"{address},{address}", "169.254.169.254:80"):
            answer = clients.request(f"{envoy_stack.url}/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                                     headers={"x-paddler-endpoint": forged})
            assert answer.status == 200
            assert answer.json()["model"] in ("small", "large")
    assert outsider.hits == 0


def test_the_picker_not_the_client_chooses_the_server(envoy_stack: BalancerStack) -> None:
    small_address = next(b["address"] for b in envoy_stack.fleet["backends"] if b["name"] == "small")
    models = {clients.request(f"{envoy_stack.url}/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                              headers={"x-paddler-endpoint": small_address}).json()["model"] for _ in range(3)}
    assert models == {"large"}  # the picker's choice: most free slots, whatever the client asked for
