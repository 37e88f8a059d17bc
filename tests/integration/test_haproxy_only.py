"""HAProxy-only behaviour: tree cascades through HAProxy's aggregated /health, and HAProxy's own
retry of connect failures when the agent is away."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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


def test_connect_failure_is_retried_on_another_server(make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    """With the agent gone, HAProxy keeps believing a dead server is up; its requests must move elsewhere."""
    dead = make_llama("dead", slots=2).start()
    alive = make_llama("alive", slots=2).start()
    with BalancerStack(tmp_path / "lb", {"dead": dead.address, "alive": alive.address}) as stack:
        stack.wait_slots({"dead": 2, "alive": 2})
        stack.agent.stop()  # agent unreachable: HAProxy keeps each server's last state
        dead.kill()

        answers = [clients.chat(stack.url) for _ in range(6)]

        assert [a.status for a in answers] == [200] * 6
        assert {a.json()["model"] for a in answers} == {"alive"}
        assert stack.is_up("dead"), "the test needs HAProxy to still send requests to the dead server"
        assert int(stack.server("dead")["wredis"]) > 0, "no request was redispatched away from the dead server"
