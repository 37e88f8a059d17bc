"""The whole stack from the project's images: llama-server (Debian sid's llama.cpp-tools),
paddler-agent, HAProxy 3.x with paddler.lua, Envoy 1.40, each in its own container.

The same guarantees the host-process tests check, now across container boundaries and on a
newer HAProxy: no request waits inside llama.cpp, a crashed server is routed around and
taken back, standby servers take over, and the balancer's /health adds up the fleet.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from devstack.processes import wait_until
from devstack.sampling import DeferralWatch
from tests.containers.services import (
    AgentContainer,
    BalancerContainer,
    Containers,
    Fleet,
    LlamaContainer,
)
from tests.integration.clients import Answer, request

pytestmark = pytest.mark.real

SLOTS = 2  # per llama-server
CTX_PER_SLOT = 8192  # room for long held generations
N_PREDICT = 1200  # about a second per wave of requests on one core: they overlap


def completion(base: str, n_predict: int, timeout: float = 60.0) -> Answer:
    return request(f"{base}/completion", {"prompt": "Tell me a story", "n_predict": n_predict, "ignore_eos": True},
                   timeout=timeout)


def served_by(answer: Answer) -> str | None:
    """llama-server names itself (its --alias) in every answer."""
    return answer.json().get("model") if answer.status == 200 else None


@dataclass
class Stack:
    llamas: dict[str, LlamaContainer]
    fleet: Fleet
    agent: AgentContainer
    balancer: BalancerContainer

    @property
    def url(self) -> str:
        return self.balancer.url

    def slots_counted(self) -> int | None:
        """Slots the balancer's /health counts (idle + processing), None unless it says ok."""
        health = self.balancer.health()
        if health.get("status") != "ok":
            return None
        return int(health["slots_idle"]) + int(health["slots_processing"])

    def wait_idle(self, slots: int, timeout: float = 30.0) -> None:
        expected = {"http": 200, "status": "ok", "slots_idle": slots, "slots_processing": 0, "requests_buffered": 0}
        wait_until(lambda: self.balancer.health() == expected, timeout=timeout,
                   what=f"the balancer's /health to be {expected} (last: {self.balancer.health()})")


def start_stack(containers: Containers, backends: list[str], standby: list[str] | None = None,
                proxy: str = "haproxy") -> Stack:
    llamas = {name: containers.llama(name, slots=SLOTS, ctx_per_slot=CTX_PER_SLOT)
              for name in [*backends, *(standby or [])]}
    fleet = Fleet({name: llamas[name].address for name in backends},
                  standby={name: llamas[name].address for name in standby or []},
                  balancer={"buffered_request_timeout": "30s"})
    agent = containers.agent(fleet)
    balancer = containers.haproxy(fleet) if proxy == "haproxy" else containers.envoy(fleet)
    return Stack(llamas, fleet, agent, balancer)


@pytest.fixture(scope="module")
def stack(containers: Containers) -> Stack:
    stack = start_stack(containers, ["llama1", "llama2"])
    # Each server starts at maxconn 1 in the generated config; only the agent's replies make it 2.
    stack.wait_idle(slots=2 * SLOTS)
    return stack


class Sampler(DeferralWatch):
    """llama.cpp's queue and busy slots per container (each in its own thread), plus the balancer's
    own /health."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(stack.llamas, interval=0.01, track_busy=True)
        self.stack = stack
        self.max_buffered = 0
        self.max_processing = 0
        self.add("balancer", self._sample_balancer)

    def _sample_balancer(self) -> bool:
        health = self.stack.balancer.health()
        if health.get("status") != "ok":
            return False
        self.max_buffered = max(self.max_buffered, int(health["requests_buffered"]))
        self.max_processing = max(self.max_processing, int(health["slots_processing"]))
        return True


class HeldStreams:
    """``count`` streaming completions kept open (each busy for at most ``max_tokens``), then cancelled.

    Closing the connection makes llama-server drop the generation, so a test holds slots for
    exactly as long as it looks at them.
    """

    def __init__(self, base: str, count: int, max_tokens: int = CTX_PER_SLOT - 64) -> None:
        self.base, self.count, self.max_tokens = base, count, max_tokens
        self.first_event = threading.Semaphore(0)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(count)]
        self.statuses: list[int] = []

    def _hold(self) -> None:
        body = {"prompt": "Tell me a story", "n_predict": self.max_tokens, "ignore_eos": True, "stream": True}
        req = urllib.request.Request(f"{self.base}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                self.statuses.append(response.status)
                announced = False
                for line in response:
                    if line.startswith(b"data: ") and not announced:
                        announced = True
                        self.first_event.release()
                    if self._stop.is_set():
                        break
        except OSError as exc:
            self.statuses.append(getattr(exc, "code", 0))
            self.first_event.release()

    def __enter__(self) -> HeldStreams:
        for thread in self._threads:
            thread.start()
        for _ in range(self.count):
            assert self.first_event.acquire(timeout=30), "a held stream never started"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


@dataclass
class Result:
    started: float
    finished: float
    status: int
    model: str | None


class Load:
    """``workers`` clients sending short completions back to back; bounded in count and time."""

    def __init__(self, base: str, workers: int = 4, n_predict: int = 100, max_requests: int = 600,
                 max_seconds: float = 120.0) -> None:
        self.base, self.n_predict = base, n_predict
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def _work(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if len(self.results) >= self.max_requests:
                    return
            started = time.monotonic()
            try:
                answer = completion(self.base, self.n_predict, timeout=30)
                status, model = answer.status, served_by(answer)
            except OSError:
                status, model = 0, None
            with self._lock:
                self.results.append(Result(started, time.monotonic(), status, model))
            if status != 200:
                self._stop.wait(0.05)  # a client pauses before trying again, as Retry-After asks

    def served_since(self, since: float, model: str) -> int:
        with self._lock:
            return sum(1 for r in self.results if r.started >= since and r.model == model)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_health_adds_up_slots_across_servers(stack: Stack) -> None:
    stack.wait_idle(slots=2 * SLOTS)
    with HeldStreams(stack.url, count=3):
        busy = {"status": "ok", "slots_idle": 1, "slots_processing": 3, "requests_buffered": 0}
        wait_until(lambda: {k: stack.balancer.health().get(k) for k in busy} == busy, timeout=10,
                   what=f"HAProxy's /health to count 3 busy slots of 4 (last: {stack.balancer.health()})")
        assert sum(llama.busy_slots() or 0 for llama in stack.llamas.values()) == 3
        # The agent's own /health adds up what the llama-servers report, polled every 500 ms.
        wait_until(lambda: {k: stack.agent.health().get(k) for k in ("slots_idle", "slots_processing")}
                   == {"slots_idle": 1, "slots_processing": 3}, timeout=10,
                   what=f"the agent's /health to count 3 busy slots (last: {stack.agent.health()})")
    stack.wait_idle(slots=2 * SLOTS)


def test_oversubscription_waits_in_haproxy_not_in_llama_cpp(stack: Stack) -> None:
    total_slots = SLOTS * len(stack.llamas)
    concurrent = 3 * total_slots
    with Sampler(stack) as sampler, ThreadPoolExecutor(concurrent) as pool:
        answers = list(pool.map(lambda _: completion(stack.url, N_PREDICT), range(concurrent)))
    print(f"samples taken during the load: {sampler.samples}")

    assert [answer.status for answer in answers] == [200] * concurrent
    assert all(answer.json()["tokens_predicted"] == N_PREDICT for answer in answers)
    assert min(sampler.samples.values()) >= 5, f"too few samples during the load: {sampler.samples}"
    assert sampler.max_deferred == {name: 0 for name in stack.llamas}, "llama.cpp queued requests internally"
    assert sampler.max_busy == {name: SLOTS for name in stack.llamas}, "some server never had all slots busy"
    assert sampler.max_processing <= total_slots
    assert sampler.max_buffered > 0, "the excess never waited in HAProxy's queue"
    stack.wait_idle(slots=total_slots)


def test_killed_server_is_routed_around_and_returns_when_restarted(stack: Stack) -> None:
    victim, survivor = stack.llamas["llama1"], stack.llamas["llama2"]
    with Load(stack.url, workers=4) as load:
        begun = time.monotonic()
        wait_until(lambda: load.served_since(begun, "llama1") and load.served_since(begun, "llama2"), timeout=30,
                   what="both servers to serve the load")
        killed_at = time.monotonic()
        victim.kill()
        wait_until(lambda: stack.slots_counted() == SLOTS, timeout=10, interval=0.02,
                   what=f"HAProxy to stop counting the killed server (last: {stack.balancer.health()})")
        down_at = time.monotonic()
        wait_until(lambda: load.served_since(down_at, "llama2") >= 10, timeout=30,
                   what="the surviving server to keep serving")
        restart_at = time.monotonic()
        victim.restart()
        wait_until(lambda: stack.slots_counted() == 2 * SLOTS, timeout=20,
                   what=f"HAProxy to count the restarted server again (last: {stack.balancer.health()})")
        up_at = time.monotonic()
        wait_until(lambda: load.served_since(up_at, "llama1") >= 3, timeout=30,
                   what="the restarted server to serve again")
    results = load.results
    while_down = [r for r in results if r.started >= down_at and r.finished <= restart_at]
    failed = [r for r in results if r.status != 200]
    print(f"{len(results)} requests; {len(while_down)} while llama1 was down, all served by llama2; "
          f"marked down {down_at - killed_at:.2f}s after the kill; {len(failed)} failed in that window: "
          f"{sorted((r.status, round(r.started - killed_at, 3)) for r in failed)}")
    # Detection is the agent's poll (500 ms) plus HAProxy's agent-inter (500 ms).
    assert down_at - killed_at < 2.5
    assert while_down and all(r.status == 200 and r.model == survivor.alias for r in while_down)
    # Requests fail only until HAProxy knows: those running on the killed server (502), and new ones
    # that leastconn sent to it while the survivor's slots were all taken (503 after 2 retries).
    assert all(r.status in (502, 503) and r.started < down_at for r in failed), failed
    stack.wait_idle(slots=2 * SLOTS)


def test_standby_takes_over_and_hands_back(fresh_containers: Containers) -> None:
    stack = start_stack(fresh_containers, ["primary"], standby=["standby"])
    stack.wait_idle(slots=SLOTS)  # the standby is not counted while the primary is usable

    def batch() -> list[str | None]:
        with ThreadPoolExecutor(2 * SLOTS) as pool:
            return list(pool.map(lambda _: served_by(completion(stack.url, 50)), range(2 * SLOTS)))

    assert batch() == ["primary"] * 2 * SLOTS
    stack.llamas["primary"].kill()
    wait_until(lambda: served_by(completion(stack.url, 5)) == "standby", timeout=15,
               what="the standby server to take over")
    assert batch() == ["standby"] * 2 * SLOTS
    assert stack.balancer.health()["status"] == "ok"

    stack.llamas["primary"].restart()
    wait_until(lambda: served_by(completion(stack.url, 5)) == "primary", timeout=15,
               what="the primary server to take back")
    assert batch() == ["primary"] * 2 * SLOTS
    stack.wait_idle(slots=SLOTS)


def test_envoy_image_holds_the_excess_in_the_picker(fresh_containers: Containers) -> None:
    stack = start_stack(fresh_containers, ["solo"], proxy="envoy")
    wait_until(lambda: stack.balancer.health().get("slots_idle") == SLOTS, timeout=30,
               what=f"Envoy's /health to count {SLOTS} idle slots (last: {stack.balancer.health()})")
    concurrent = 3 * SLOTS
    with Sampler(stack) as sampler, ThreadPoolExecutor(concurrent) as pool:
        answers = list(pool.map(lambda _: completion(stack.url, N_PREDICT), range(concurrent)))
    assert [answer.status for answer in answers] == [200] * concurrent
    assert min(sampler.samples.values()) >= 5, f"too few samples during the load: {sampler.samples}"
    assert sampler.max_deferred == {"solo": 0}, "llama.cpp queued requests internally"
    assert sampler.max_busy == {"solo": SLOTS}
    assert sampler.max_buffered > 0, "the excess never waited in the agent's picker"

