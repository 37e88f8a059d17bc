"""Routing by model behind the generated HAProxy config: real llama-servers (two serve alpha, one beta), real
agent, real HAProxy. The model a request names picks its pool; the balancer answers what no server should."""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devstack.chaos import IncarnationDeferrals
from devstack.processes import LlamaRouter, LlamaServer, wait_until
from devstack.sampling import BackgroundSampler
from devstack.stack import BalancerStack
from fleet import contract
from generator.haproxy import model_backend
from tests.integration.clients import Answer, request

SERVERS = {"gpu1": ("alpha", 2), "gpu2": ("alpha", 1), "gpu3": ("beta", 2)}
MAX_BODY = 16 * 1024
REQUESTS = 300
CONCURRENCY = 8


@pytest.fixture
def servers(make_llama: Callable[..., LlamaServer]) -> dict[str, LlamaServer]:
    return {name: make_llama(name, slots=slots, alias=model).start() for name, (model, slots) in SERVERS.items()}


@pytest.fixture
def stack(servers: dict[str, LlamaServer], tmp_path: Path) -> Iterator[BalancerStack]:
    with BalancerStack(tmp_path / "lb", {name: server.address for name, server in servers.items()},
                       models={name: [model] for name, (model, _) in SERVERS.items()},
                       top={"default_model": "alpha"}, balancer={"max_request_body": MAX_BODY}) as stack:
        for name, (model, slots) in SERVERS.items():
            wait_until(lambda name=name, model=model, slots=slots: pool_serves(stack, model, name, slots),  # type: ignore[misc]
                       timeout=15, what=f"{name} in {model}'s pool with {slots} slots")
        yield stack


def pool_serves(stack: BalancerStack, model: str, name: str, slots: int) -> bool:
    backend = model_backend(model)
    haproxy = stack.haproxy
    return haproxy.server_takes_requests(backend, name) and haproxy.server(backend, name)["slim"] == str(slots)


def complete(stack: BalancerStack, body: dict[str, object]) -> Answer:
    return request(f"{stack.url}/v1/completions", {"prompt": "Tell me", "max_tokens": 8, "ignore_eos": True, **body},
                   timeout=60)


class RouterDeferrals(BackgroundSampler):
    """``requests_deferred`` of each model's child of a llama.cpp router, sampled once the router says the
    model is loaded (asking an unloaded model's /metrics would load it)."""

    def __init__(self, router: LlamaRouter, models: list[str], interval: float = 0.05) -> None:
        super().__init__(interval)
        self.worst: dict[str, float] = {}
        for model in models:
            self.add(model, lambda model=model: self._sample(router, model))  # type: ignore[misc]

    def _sample(self, router: LlamaRouter, model: str) -> bool:
        value = router_deferred(router, model) if router.models().get(model) == "loaded" else None
        if value is not None:
            self.worst[model] = max(self.worst.get(model, 0.0), value)
        return value is not None


def test_each_request_lands_on_a_server_of_its_model_and_llama_cpp_never_defers(
        servers: dict[str, LlamaServer], make_router: Callable[..., LlamaRouter], tmp_path: Path) -> None:
    """Two servers serve alpha, one beta, and a llama.cpp router (models discovered) serves both."""
    router = make_router("big1", slots=2).start()
    addresses = {**{name: server.address for name, server in servers.items()}, "big1": router.address}
    rng = random.Random(13)
    models = [rng.choice(["alpha", "beta"]) for _ in range(REQUESTS)]
    with BalancerStack(tmp_path / "lb", addresses, models={name: [model] for name, (model, _) in SERVERS.items()},
                       top={"default_model": "alpha", "models": {"alpha": {}, "beta": {}}}) as stack:
        for name, (model, slots) in SERVERS.items():
            wait_until(lambda name=name, model=model, slots=slots: pool_serves(stack, model, name, slots),  # type: ignore[misc]
                       timeout=15, what=f"{name} in {model}'s pool with {slots} slots")
        before = {name: server.metric("llamacpp:tokens_predicted_total") or 0.0 for name, server in servers.items()}
        with (IncarnationDeferrals(servers, interval=0.05) as deferrals, RouterDeferrals(router, ["alpha", "beta"])
              as router_deferrals, ThreadPoolExecutor(CONCURRENCY) as pool):
            answers = list(pool.map(lambda model: complete(stack, {"model": model}), models, timeout=240))
        loads = {model["name"]: model["load"] for model in stack.agents()["big1"]["models"]}
    statuses = Counter(answer.status for answer in answers)
    assert statuses == {200: REQUESTS}, statuses
    # Each plain server's alias is its model, a router's child is named after its model, and llama-server
    # names it in every answer.
    assert [answer.json()["model"] for answer in answers] == models
    served = {name: (server.metric("llamacpp:tokens_predicted_total") or 0.0) - before[name]
              for name, server in servers.items()}
    served.update({f"big1/{model}": router.metric(model, "llamacpp:tokens_predicted_total") or 0.0
                   for model in ("alpha", "beta")})
    print(f"tokens predicted per server (8 a request): {served}; requests per model: {Counter(models)}; "
          f"router's models afterwards: {loads}; router children's deferred at most: {router_deferrals.worst}")
    # Every token of each model came from a server of that model, and every server took part.
    assert served["gpu1"] + served["gpu2"] + served["big1/alpha"] == 8 * models.count("alpha"), served
    assert served["gpu3"] + served["big1/beta"] == 8 * models.count("beta"), served
    assert all(tokens > 0 for tokens in served.values()), served
    assert deferrals.worst() == 0, deferrals.nonzero[:10]
    assert all(deferrals.incarnations(name) == 1 for name in servers), deferrals.sample_counts
    assert all(value == 0 for value in router_deferrals.worst.values()), router_deferrals.worst


def test_the_balancer_answers_what_no_llama_server_should(stack: BalancerStack) -> None:
    listed = request(f"{stack.url}/v1/models")
    assert listed.status == 200
    assert [model["id"] for model in listed.json()["data"]] == ["alpha", "beta"]

    unknown = complete(stack, {"model": "gamma"})
    print(f"404 model_not_found answered in {unknown.seconds * 1000:.1f} ms")
    assert (unknown.status, unknown.body.decode()) == (404, contract.MODEL_NOT_FOUND)
    assert unknown.json()["error"]["code"] == "model_not_found"

    unnamed = complete(stack, {})
    assert (unnamed.status, unnamed.json()["model"]) == (200, "alpha")

    escaped = complete(stack, {"mod\u0065l": "beta"})
    assert (escaped.status, escaped.json()["model"]) == (200, "beta")

    for body in (b'{"model": "alpha", "prompt": "x"', b"prompt=x", b'{"model": ["beta"]}'):
        malformed = request_raw(stack, body)
        assert (malformed.status, malformed.body.decode()) == (400, contract.BODY_NOT_JSON), body

    large = complete(stack, {"model": "alpha", "prompt": "x" * MAX_BODY})
    assert (large.status, large.body.decode()) == (413, contract.body_too_large(MAX_BODY))


def request_raw(stack: BalancerStack, body: bytes) -> Answer:
    req = urllib.request.Request(f"{stack.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return Answer(response.status, response.read(), {}, 0.0)
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read(), {}, 0.0)


def test_health_counts_each_server_once_across_the_pools_and_answers_per_model(stack: BalancerStack) -> None:
    health = stack.health()
    assert (health["http"], health["slots_idle"] + health["slots_processing"]) == (200, 5), json.dumps(health)
    beta = request(f"{stack.url}/health?model=beta")
    assert (beta.status, beta.json()["slots_idle"] + beta.json()["slots_processing"]) == (200, 2)
    assert request(f"{stack.url}/health?model=gamma").status == 404


def first_token(stack: BalancerStack, model: str, max_tokens: int) -> tuple[int, float, float]:
    """A streamed completion: (status, seconds to its first token, seconds to its end)."""
    body = json.dumps({"model": model, "prompt": "Tell me", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(f"{stack.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    started = time.monotonic()
    first = None
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            for line in response:
                if first is None and line.startswith(b"data: "):
                    first = time.monotonic() - started
            return response.status, first if first is not None else math.inf, time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, math.inf, time.monotonic() - started


def trickle(stack: BalancerStack, count: int) -> list[tuple[int, float, float]]:
    return [first_token(stack, "beta", 16) for _ in range(count)]


def test_a_burst_on_one_model_waits_in_its_own_queue_and_leaves_the_other_alone(stack: BalancerStack) -> None:
    """5x alpha's slots at once, while beta gets one request after another: beta's queue never holds
    anything, alpha's holds the excess, and every request is served. The burst's threads all start before any
    of them sends, so how fast a loaded host starts threads does not decide how many requests overlap."""
    alone = trickle(stack, 10)
    alpha_slots = sum(slots for model, slots in SERVERS.values() if model == "alpha")
    all_started = threading.Barrier(5 * alpha_slots)

    def together() -> tuple[int, float, float]:
        all_started.wait(timeout=30)
        return first_token(stack, "alpha", 640)

    with ThreadPoolExecutor(5 * alpha_slots + 1) as pool:
        burst = [pool.submit(together) for _ in range(5 * alpha_slots)]
        wait_until(lambda: int(stack.haproxy.server(model_backend("alpha"), "BACKEND")["qcur"]) > 0, timeout=10,
                   interval=0.01, what="alpha's burst queued in its backend")
        beside = pool.submit(trickle, stack, 10).result(timeout=120)
        alpha_queue_max = int(stack.haproxy.server(model_backend("alpha"), "BACKEND")["qmax"])
        bursts = [future.result(timeout=120) for future in burst]
    beta_queue_max = int(stack.haproxy.server(model_backend("beta"), "BACKEND")["qmax"])
    median = statistics.median
    print(f"beta TTFT alone: median {median(t for _, t, _ in alone) * 1000:.1f} ms, max "
          f"{max(t for _, t, _ in alone) * 1000:.1f} ms; beside alpha's burst: median "
          f"{median(t for _, t, _ in beside) * 1000:.1f} ms, max {max(t for _, t, _ in beside) * 1000:.1f} ms; "
          f"alpha TTFT in the burst: median {median(t for _, t, _ in bursts) * 1000:.1f} ms, max "
          f"{max(t for _, t, _ in bursts) * 1000:.1f} ms; queues max: alpha {alpha_queue_max}, beta {beta_queue_max}")
    assert [status for status, _, _ in alone + beside + bursts] == [200] * (20 + 5 * alpha_slots)
    assert alpha_queue_max >= 2 * alpha_slots
    assert beta_queue_max == 0


def router_deferred(router: LlamaRouter, model: str) -> float | None:
    return router.metric(model, "llamacpp:requests_deferred")


def test_a_router_takes_one_request_for_a_model_it_has_not_loaded_then_all_its_slots(
        make_llama: Callable[..., LlamaServer], make_router: Callable[..., LlamaRouter], tmp_path: Path) -> None:
    """Only the router (models discovered) serves alpha: its first alpha request loads alpha, one at a time;
    once the agent sees it loaded, alpha's pool gets the child's slots, and llama.cpp never defers."""
    router = make_router("big1", slots=2).start()
    beta = make_llama("gpu3", slots=2, alias="beta").start()
    alpha_pool = model_backend("alpha")
    with BalancerStack(tmp_path / "lb", {"gpu3": beta.address, "big1": router.address}, models={"gpu3": ["beta"]},
                       top={"models": {"alpha": {}, "beta": {}}, "default_model": "alpha"}) as stack:
        wait_until(lambda: stack.haproxy.server(alpha_pool, "big1")["agent_status"] == "L7OK"
                   and stack.haproxy.server(alpha_pool, "big1")["slim"] == "1", timeout=15,
                   what="the router in alpha's pool, cold: one request at a time")
        assert "alpha unloaded" in stack.haproxy.server(alpha_pool, "big1")["agent_desc"] + \
            stack.haproxy.server(alpha_pool, "big1")["last_agt"]
        cold = complete(stack, {"model": "alpha"})
        assert (cold.status, cold.json()["model"]) == (200, "alpha")
        wait_until(lambda: stack.haproxy.server(alpha_pool, "big1")["slim"] == "2", timeout=15,
                   what="alpha's pool to get the loaded child's 2 slots")
        models = {model["name"]: model["load"] for model in stack.agents()["big1"]["models"]}
        assert models == {"alpha": "loaded", "beta": "unloaded"}
        deferred: list[float | None] = []
        with ThreadPoolExecutor(7) as pool:
            burst = [pool.submit(first_token, stack, "alpha", 120) for _ in range(6)]
            while not all(future.done() for future in burst):
                deferred.append(router_deferred(router, "alpha"))
                time.sleep(0.05)  # the sampling period, not a synchronisation
        assert [future.result()[0] for future in burst] == [200] * 6
        assert max(value or 0.0 for value in deferred) == 0.0, deferred
        assert beta.metric("llamacpp:requests_deferred") == 0
