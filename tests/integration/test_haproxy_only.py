"""HAProxy-only behaviour: tree cascades through HAProxy's aggregated /health, and HAProxy's own
retry of connect failures when the agent is away."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.processes import LlamaServer, wait_until
from devstack.stack import BalancerStack
from tests.integration import clients

pytestmark = pytest.mark.real


def health(stack: BalancerStack) -> dict:
    return stack.health()


def test_a_balancer_is_a_backend_of_another_balancer(make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    """Tree cascade: the upstream agent reads the downstream's aggregated /health like one big llama-server."""
    leaf = make_llama("leaf", slots=2).start()
    with BalancerStack(tmp_path / "downstream", {"leaf": leaf.address}) as downstream:
        downstream.wait_slots({"leaf": 2})
        with BalancerStack(tmp_path / "upstream", {"region-a": f"127.0.0.1:{downstream.port}"}) as upstream:
            upstream.wait_slots({"region-a": 2})
            assert "via health" in upstream.server("region-a")["last_agt"]
            answer = clients.chat(upstream.url)
            assert answer.status == 200
            assert answer.json()["model"] == "leaf"

        leaf.kill()
        wait_until(lambda: not downstream.is_up("leaf"), timeout=5, what="the leaf to be marked down")
        assert health(downstream) == {"http": 503, "status": "unavailable", "slots_idle": 0, "slots_processing": 0,
                                      "requests_buffered": 0}


def test_a_crashed_server_costs_no_request_even_without_the_agent(
        make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    """With the agent gone, HAProxy's own check and `observe layer4` take a killed server out, and
    a request that still reaches it is retried on another server (connect failure, not replayed)."""
    dead = make_llama("dead", slots=2).start()
    alive = make_llama("alive", slots=2).start()
    with BalancerStack(tmp_path / "lb", {"dead": dead.address, "alive": alive.address}) as stack:
        stack.wait_slots({"dead": 2, "alive": 2})
        stack.agent.stop()  # agent unreachable: only HAProxy's own mechanisms are left
        dead.kill()

        answers = [clients.chat(stack.url) for _ in range(10)]
        wait_until(lambda: not stack.is_up("dead"), timeout=5, what="HAProxy itself to take the dead server out")
        answers += [clients.chat(stack.url) for _ in range(5)]

        assert [a.status for a in answers] == [200] * 15
        assert {a.json()["model"] for a in answers} == {"alive"}
