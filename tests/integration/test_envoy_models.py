"""Routing by model through Envoy: real Envoy (generated config), real agent and picker, real llama-servers.

Two servers serve alpha (alias alpha), one serves beta (alias beta); the fleet file declares each backend's
``models:`` and ``default_model: alpha``. Every request lands only on a server of the model it names (the
answer's "model" and each server's own token counter say so), llama.cpp never queues a request inside
(``llamacpp:requests_deferred`` sampled every 50 ms), the filter answers unknown models and bad bodies
itself, and a burst on alpha does not hold beta's requests back.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.processes import LlamaRouter, LlamaServer, http_get, wait_until
from devstack.sampling import DeferralWatch
from devstack.stack import BalancerStack
from fleet import contract
from generator.envoy import AGENT_UNAVAILABLE
from tests.integration import clients

pytestmark = pytest.mark.real

SLOTS = 2
MAX_REQUEST_BODY = 16384
MAX_TOKENS = 4
TOKENS_COUNTER = "llamacpp:tokens_predicted_total"
MODEL_OF = {"alpha-1": "alpha", "alpha-2": "alpha", "beta-1": "beta"}


@dataclass
class Models:
    stack: BalancerStack
    servers: dict[str, LlamaServer]


@pytest.fixture
def models(make_llama: Callable[..., LlamaServer], tmp_path: Path) -> Iterator[Models]:
    servers = {name: make_llama(name, slots=SLOTS, alias=model).start() for name, model in MODEL_OF.items()}
    stack = BalancerStack(tmp_path / "lb", {name: server.address for name, server in servers.items()}, kind="envoy",
                          balancer={"max_request_body": MAX_REQUEST_BODY},
                          models={name: [model] for name, model in MODEL_OF.items()},
                          top={"default_model": "alpha"})
    with stack:
        stack.wait_slots(dict.fromkeys(servers, SLOTS))
        yield Models(stack, servers)


def chat(url: str, model: str | None, max_tokens: int = MAX_TOKENS) -> clients.Answer:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
                            "ignore_eos": True}
    if model is not None:
        body["model"] = model
    return clients.request(f"{url}/v1/chat/completions", body, timeout=60)


def tokens(servers: dict[str, LlamaServer]) -> dict[str, float]:
    counts = {name: server.metric(TOKENS_COUNTER) for name, server in servers.items()}
    assert None not in counts.values(), counts
    return {name: count or 0.0 for name, count in counts.items()}


def test_each_request_runs_only_on_a_server_of_its_model_and_llama_cpp_never_queues(models: Models) -> None:
    rng = random.Random(13)
    asked = [rng.choice(["alpha", "beta"]) for _ in range(300)]
    before = tokens(models.servers)
    with DeferralWatch(models.servers, interval=0.05) as watch, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda model: chat(models.stack.url, model), asked, timeout=240))
    produced = {name: count - before[name] for name, count in tokens(models.servers).items()}
    print(f"\nrequests: {Counter(asked)}; tokens predicted per server: {produced}; "
          f"most deferred: {watch.max_deferred}")
    assert Counter(answer.status for answer in answers) == {200: 300}
    assert [answer.json()["model"] for answer in answers] == asked
    per_request = [answer.json()["usage"]["completion_tokens"] for answer in answers]
    assert set(per_request) == {MAX_TOKENS}
    # Each server's own counter: alpha's servers produced exactly alpha's tokens, beta's exactly beta's.
    assert produced["alpha-1"] + produced["alpha-2"] == asked.count("alpha") * MAX_TOKENS
    assert produced["beta-1"] == asked.count("beta") * MAX_TOKENS
    assert produced["alpha-1"] > 0 and produced["alpha-2"] > 0
    assert all(count > 0 for count in watch.samples.values()), watch.samples
    assert watch.max_deferred == dict.fromkeys(models.servers, 0.0)


def post_chunked(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    """A POST with Transfer-Encoding: chunked (no content-length): the bound is checked on what arrives."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body=iter([body[:1000], body[1000:]]),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_balancer_answers_unknown_models_bad_bodies_and_the_model_list_itself(models: Models) -> None:
    url = models.stack.url
    unknown = chat(url, "gamma")
    assert (unknown.status, unknown.body) == (404, contract.MODEL_NOT_FOUND.encode())
    assert unknown.json()["error"]["code"] == "model_not_found"
    unnamed = chat(url, None)
    assert unnamed.status == 200 and unnamed.json()["model"] == "alpha"  # default_model
    malformed = clients.request(f"{url}/v1/chat/completions", method="POST",
                                headers={"Content-Type": "application/json"}, body=None)
    assert (malformed.status, malformed.body) == (400, contract.BODY_NOT_JSON.encode())
    not_json = urllib.request.Request(f"{url}/v1/completions", data=b'{"model": "alpha",', method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(not_json, timeout=30)
    assert (refused.value.code, refused.value.read()) == (400, contract.BODY_NOT_JSON.encode())
    large = json.dumps({"model": "beta", "prompt": "x" * MAX_REQUEST_BODY}).encode()
    too_large = contract.body_too_large(MAX_REQUEST_BODY).encode()
    oversized = urllib.request.Request(f"{url}/v1/completions", data=large, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(oversized, timeout=30)
    assert (refused.value.code, refused.value.read()) == (413, too_large)
    assert post_chunked(url, "/v1/completions", large) == (413, too_large)
    assert http_get(f"{url}/v1/models") == (200, contract.models_list(["alpha", "beta"]).encode())
    assert http_get(f"{url}/models") == (200, contract.models_list(["alpha", "beta"]).encode())
    assert json.loads(http_get(f"{url}/props")[1])["total_slots"] == SLOTS  # no model in it: the default's

    # Without the agent, no least_request fallback: a plain llama-server would answer with its own model.
    models.stack.agent.stop()
    away = chat(url, "beta")
    assert (away.status, away.body, away.headers.get("retry-after")) == (503, AGENT_UNAVAILABLE.encode(), "1")


@dataclass
class Timed:
    model: str
    sent: float
    first_token: float | None = None
    status: int = 0


def stream(url: str, model: str, max_tokens: int, clock_zero: float) -> Timed:
    """A streaming chat; when its first token arrived (seconds after clock_zero)."""
    timed = Timed(model, time.monotonic() - clock_zero)
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        timed.status = response.status
        for raw in response:
            if raw.startswith(b"data: ") and timed.first_token is None:
                timed.first_token = time.monotonic() - clock_zero
    return timed


def ttft(runs: list[Timed]) -> str:
    waits = sorted(run.first_token - run.sent for run in runs if run.first_token is not None)
    p99 = waits[min(len(waits) - 1, round(0.99 * (len(waits) - 1)))]
    return f"median {statistics.median(waits) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms over {len(waits)}"


def model_queue(models: Models, model: str) -> int | None:
    """Requests waiting in the picker's queue for one model (the agent's /health?model=); None until the agent
    has found out that the balancer in front is Envoy (its probe of the balancer's /health)."""
    status, body = http_get(f"{models.stack.agent.management_url}/health?model={model}")
    assert status == 200, body
    waiting = json.loads(body).get("requests_buffered")
    return None if waiting is None else int(waiting)


def test_a_burst_on_one_model_does_not_hold_back_another(models: Models) -> None:
    """Five times alpha's slots at once, while beta gets one request after another: alpha's queue holds the
    excess, beta's stays empty every time it is looked at, and every request is served."""
    url, zero = models.stack.url, time.monotonic()
    wait_until(lambda: model_queue(models, "beta") is not None, timeout=10, what="the agent to count beta's queue")
    quiet = [stream(url, "beta", 8, zero) for _ in range(5)]  # beta's time to first token with alpha idle
    burst_size = 5 * 2 * SLOTS  # five times alpha's slots
    beta_during: list[Timed] = []
    queues: list[tuple[int, int]] = []  # (alpha's, beta's) picker queue, sampled between beta's requests
    with ThreadPoolExecutor(burst_size) as pool:
        burst = [pool.submit(stream, url, "alpha", 256, zero) for _ in range(burst_size)]
        wait_until(lambda: (model_queue(models, "alpha") or 0) > 0, timeout=30,
                   what="alpha's burst to fill its slots and queue")
        while (alpha_waiting := model_queue(models, "alpha") or 0) > 0:  # a steady trickle on beta while alpha queues
            queues.append((alpha_waiting, model_queue(models, "beta")))
            beta_during.append(stream(url, "beta", 8, zero))
        alpha = [future.result(timeout=120) for future in burst]
    print(f"\nbeta, alpha idle: {ttft(quiet)}; beta during alpha's burst: {ttft(beta_during)}; "
          f"alpha's burst: {ttft(alpha)}; largest picker queues (alpha, beta): "
          f"{max(a for a, _ in queues)}, {max(b for _, b in queues)}")
    assert {run.status for run in quiet + beta_during + alpha} == {200}
    assert beta_during, "alpha's queue drained before beta asked once"
    assert all(beta == 0 for _, beta in queues), queues


def test_a_router_takes_one_request_for_a_model_it_has_not_loaded_then_all_its_slots(
        make_llama: Callable[..., LlamaServer], make_router: Callable[..., LlamaRouter], tmp_path: Path) -> None:
    """Only the router (models discovered) serves alpha: the picker places one alpha request there at a time
    until the agent sees alpha loaded, then the child's slots; llama.cpp never defers."""
    router = make_router("big1", slots=SLOTS).start()
    beta = make_llama("beta-1", slots=SLOTS, alias="beta").start()
    stack = BalancerStack(tmp_path / "lb", {"beta-1": beta.address, "big1": router.address}, kind="envoy",
                          models={"beta-1": ["beta"]}, top={"models": {"alpha": {}, "beta": {}},
                                                            "default_model": "alpha"})
    with stack:
        stack.wait_slots({"beta-1": SLOTS})
        wait_until(lambda: stack.agents()["big1"]["state"] == "ready" and stack.agents()["big1"]["in_balancer"],
                   timeout=15, what="the router ready, nothing loaded, in Envoy's endpoints")
        cold = chat(stack.url, "alpha")
        assert (cold.status, cold.json()["model"]) == (200, "alpha")
        wait_until(lambda: {model["name"]: model["load"] for model in stack.agents()["big1"]["models"]}
                   == {"alpha": "loaded", "beta": "unloaded"}, timeout=15, what="the agent to see alpha loaded")
        deferred: list[float | None] = []
        with ThreadPoolExecutor(7) as pool:
            burst = [pool.submit(chat, stack.url, "alpha", 120) for _ in range(6)]
            while not all(future.done() for future in burst):
                deferred.append(router.metric("alpha", "llamacpp:requests_deferred"))
                time.sleep(0.05)  # the sampling period, not a synchronisation
        assert [future.result().status for future in burst] == [200] * 6
        assert max(value or 0.0 for value in deferred) == 0.0, deferred
        assert beta.metric("llamacpp:requests_deferred") == 0
