"""StatsD, /metrics and operator drain on real llama-servers behind real HAProxy."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import LlamaServer, http_get, wait_until
from devstack.stack import BalancerStack
from tests.integration import clients

pytestmark = pytest.mark.real

TOKEN = "operator-token-for-tests-0123"


class StatsdListener:
    """A real UDP StatsD receiver on loopback keeping the latest value of every gauge."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.latest: dict[str, float] = {}
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            self.packets += 1
            for line in data.decode().splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                if kind == "g":
                    self.latest[name] = float(value)

    def shows(self, **expected: float) -> bool:
        return all(self.latest.get(f"paddler.{name}") == value for name, value in expected.items())

    def __enter__(self) -> StatsdListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture(scope="module")
def statsd() -> Iterator[StatsdListener]:
    with StatsdListener() as listener:
        yield listener


@pytest.fixture(scope="module")
def observed(llama_binary: Path, tiny_model: Path, statsd: StatsdListener,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BalancerStack, dict[str, LlamaServer]]]:
    workdir = tmp_path_factory.mktemp("observed")
    servers = {name: LlamaServer(llama_binary, tiny_model, workdir, slots=slots, name=name, ctx_per_slot=8192)
               for name, slots in (("small", 2), ("large", 4))}
    started = []
    try:
        for server in servers.values():
            started.append(server.start())
        with BalancerStack(workdir, {name: s.address for name, s in servers.items()}, interval="200ms",
                           statsd={"address": f"127.0.0.1:{statsd.port}", "prefix": "paddler",
                                   "interval": "200ms"}) as stack:
            stack.wait_slots({"small": 2, "large": 4})
            yield stack, servers
    finally:
        for server in started:
            server.stop()


def test_statsd_gauges_follow_idle_and_loaded_real_servers(
        observed: tuple[BalancerStack, dict[str, LlamaServer]], statsd: StatsdListener) -> None:
    stack, _ = observed
    wait_until(lambda: statsd.shows(slots_idle=6, slots_processing=0, requests_buffered=0), timeout=10,
               what="idle gauges")
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(clients.completion, stack.url, 1500) for _ in range(8)]
        wait_until(lambda: statsd.shows(slots_idle=0, slots_processing=6, requests_buffered=2), timeout=15,
                   what=f"loaded gauges (latest: {statsd.latest})")
        assert statsd.latest["paddler.backends.large.slots_processing"] == 4
        assert [future.result().status for future in running] == [200] * 8
    wait_until(lambda: statsd.shows(slots_idle=6, slots_processing=0, requests_buffered=0), timeout=10,
               what="idle gauges after the load")


def metrics(stack: BalancerStack) -> dict[tuple[str, tuple], float]:
    status, body = http_get(stack.agent.management_url + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_metrics_match_what_slots_report_under_load(observed: tuple[BalancerStack, dict[str, LlamaServer]]) -> None:
    stack, servers = observed

    def agree() -> bool:
        sample = metrics(stack)
        busy = {name: server.busy_slots() for name, server in servers.items()}
        return all(sample["paddler_backend_slots_processing", (("backend", name),)] == busy[name] for name in busy) \
            and busy == {"small": 2, "large": 1}

    with ThreadPoolExecutor(3) as pool:
        # Long enough (seconds) that the state is stable while the agent (200 ms polls) catches up.
        running = [pool.submit(clients.completion, servers[name].url, 4000) for name in ("small", "small", "large")]
        wait_until(agree, timeout=10, what="/metrics to agree with /slots under load")
        sample = metrics(stack)
        assert sample["paddler_slots_processing", ()] == 3
        assert sample["paddler_slots_idle", ()] == 3
        assert sample["paddler_backend_state", (("backend", "small"), ("state", "ready"))] == 1
        assert sample["paddler_agent_checks_total", (("reply", "ready"),)] > 0
        assert [future.result().status for future in running] == [200] * 3


def post(stack: BalancerStack, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(stack.agent.management_url + path, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_drain_lets_running_streams_finish_and_sends_new_requests_elsewhere(
        make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    a, b = make_llama("a", slots=2).start(), make_llama("b", slots=2).start()
    with BalancerStack(tmp_path / "lb", {"a": a.address, "b": b.address},
                       agent={"operator_token_env": "PADDLER_TEST_TOKEN"},
                       agent_env={"PADDLER_TEST_TOKEN": TOKEN}) as stack, ThreadPoolExecutor(6) as pool:
        stack.wait_slots({"a": 2, "b": 2})
        streams = [pool.submit(clients.chat_stream, stack.url, 3000) for _ in range(2)]
        wait_until(lambda: stack.server("a")["scur"] == "1" and stack.server("b")["scur"] == "1", timeout=10,
                   what="one stream on each server")

        assert post(stack, "/api/v1/agents/a/drain", None) == 401
        assert post(stack, "/api/v1/agents/a/drain", "not-the-token") == 403
        assert stack.is_up("a") and not stack.server("a")["status"].startswith("DRAIN")

        assert post(stack, "/api/v1/agents/a/drain", TOKEN) == 200
        wait_until(lambda: stack.server("a")["status"].startswith("DRAIN"), timeout=5, what="HAProxy to drain a")
        assert {clients.chat(stack.url).json()["model"] for _ in range(3)} == {"b"}
        finished = [stream.result() for stream in streams]
        assert all(s.status == 200 and s.done and s.finish_reason == "length" for s in finished)

        assert post(stack, "/api/v1/agents/a/ready", TOKEN) == 200
        wait_until(lambda: stack.is_up("a"), timeout=5, what="HAProxy to take a back")
        models = {answer.json()["model"] for answer in pool.map(lambda _: clients.chat(stack.url, 300), range(4))}
        assert "a" in models
