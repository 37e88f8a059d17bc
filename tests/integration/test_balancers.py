"""What users get from either proxy, end to end, as one suite run over both: fleet file → paddler-gen
haproxy|envoy → real HAProxy (paddler.lua) or real Envoy (Lua filter + the agent's picker), with the
real agent in front of real llama-servers (tiny model).

Observations are proxy-neutral (the balancer's /health, llama.cpp's own /slots and /metrics, which
server answered), so the same assertions hold the two paths to the same behaviour."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devstack.processes import LlamaServer, free_port, wait_until
from devstack.sampling import DeferralWatch
from devstack.stack import BalancerStack
from tests.integration import clients

pytestmark = pytest.mark.real

FLEET_SLOTS = {"one": 1, "two": 2, "four": 4}
PROXIES = ["haproxy", "envoy"]


@pytest.fixture(scope="module", params=PROXIES)
def fleet3(request: pytest.FixtureRequest, llama_binary: Path, tiny_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalancerStack]:
    """Three llama-servers with 1, 2 and 4 slots behind a generated HAProxy or Envoy config."""
    workdir = tmp_path_factory.mktemp(f"fleet3-{request.param}")
    servers = [LlamaServer(llama_binary, tiny_model, workdir, slots=slots, name=name)
               for name, slots in FLEET_SLOTS.items()]
    started: list[LlamaServer] = []
    try:
        for server in servers:
            started.append(server.start())
        stack = BalancerStack(workdir, {server.name: server.address for server in servers}, kind=request.param)
        with stack:
            stack.wait_slots(FLEET_SLOTS)
            stack.wait_idle(sum(FLEET_SLOTS.values()))  # behind Envoy: once the picker places (its opening settle)
            stack.llama = {server.name: server for server in servers}  # type: ignore[attr-defined]
            yield stack
    finally:
        for server in started:
            server.stop()


@pytest.fixture(params=PROXIES)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def health(stack: BalancerStack) -> dict:
    return stack.health()


def test_three_times_more_streams_than_slots_all_complete_without_llama_cpp_queueing(fleet3: BalancerStack) -> None:
    total_slots = sum(FLEET_SLOTS.values())
    count = 3 * total_slots
    max_queue = 0
    stop = threading.Event()

    def watch_queue() -> None:
        nonlocal max_queue
        while not stop.wait(0.01):
            max_queue = max(max_queue, health(fleet3).get("requests_buffered", 0))

    watcher = threading.Thread(target=watch_queue)
    watcher.start()
    try:
        with DeferralWatch(fleet3.llama) as deferrals, ThreadPoolExecutor(count) as pool:  # type: ignore[attr-defined]
            streams = list(pool.map(lambda _: clients.chat_stream(fleet3.url, max_tokens=400), range(count)))
    finally:
        stop.set()
        watcher.join()

    assert [stream.status for stream in streams] == [200] * count, [s.error_body for s in streams if s.status != 200]
    assert all(stream.done and stream.finish_reason == "length" for stream in streams), "a stream was cut short"
    assert sum(deferrals.samples.values()) > 3 * len(FLEET_SLOTS)
    assert deferrals.max_deferred == {name: 0 for name in FLEET_SLOTS}, "llama.cpp queued requests internally"
    assert max_queue > 0, "the excess never waited in the balancer's buffer"


def test_health_reports_fleet_slot_sums_and_follows_the_load(fleet3: BalancerStack) -> None:
    wait_until(lambda: health(fleet3)["slots_processing"] == 0, timeout=10, what="an idle fleet")
    assert health(fleet3) == {"http": 200, "status": "ok", "slots_idle": 7, "slots_processing": 0,
                              "requests_buffered": 0}

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(clients.completion, fleet3.url, 3000) for _ in range(3)]
        busy = wait_until(lambda: (h := health(fleet3))["slots_processing"] == 3 and h, timeout=10,
                          what="/health to show 3 busy slots")
        assert busy["slots_idle"] == 4
        assert [future.result().status for future in running] == [200] * 3
    wait_until(lambda: health(fleet3)["slots_processing"] == 0, timeout=10, what="/health to show the fleet idle")


@pytest.mark.parametrize(("method", "path"), [("GET", "/slots"), ("GET", "/slots?id_slot=0"), ("GET", "/%73lots"),
                                            ("GET", "/%u0073lots"), ("POST", "/slots/0?action=erase")])
def test_slots_are_refused_by_default(fleet3: BalancerStack, method: str, path: str) -> None:
    answer = clients.request(fleet3.url + path, method=method, body={} if method == "POST" else None)
    assert answer.status == 403
    assert answer.json()["error"]["type"] == "forbidden"


@pytest.mark.parametrize("path", ["//slots", "/slots/0?action=erase", "/tools", "/"])
def test_what_llama_server_would_not_route_as_slots_is_not_forwarded_either(fleet3: BalancerStack, path: str) -> None:
    # HAProxy passes //slots on as it came, and llama-server has no handler for it: 404 here. Envoy
    # merges the slashes first (merge_slashes), so there it is /slots: 403. GET /slots/0 is no route.
    answer = clients.request(fleet3.url + path, method="GET")
    assert answer.status == (403 if path == "//slots" and fleet3.kind == "envoy" else 404)
    assert answer.json()["error"]["type"] == ("forbidden" if answer.status == 403 else "not_found")


def test_admin_endpoints_are_refused_but_read_only_props_work(fleet3: BalancerStack) -> None:
    assert clients.request(fleet3.url + "/metrics").status == 403
    assert clients.request(fleet3.url + "/props", body={"n_ctx": 1}).status == 403
    assert clients.request(fleet3.url + "/props").status == 200


@pytest.fixture
def one_slot(make_llama: Callable[..., LlamaServer]) -> LlamaServer:
    return make_llama("solo", slots=1, ctx_per_slot=8192).start()


def test_buffer_overflow_is_refused_at_once_and_the_buffered_requests_are_served(
        one_slot: LlamaServer, tmp_path: Path, kind: str) -> None:
    with BalancerStack(tmp_path / "lb", {"solo": one_slot.address}, kind=kind,
                       balancer={"max_buffered_requests": 2, "buffered_request_timeout": "60s"}) as stack:
        stack.wait_slots({"solo": 1})
        with ThreadPoolExecutor(3) as pool:
            long_one = pool.submit(clients.completion, stack.url, 6000)
            wait_until(lambda: one_slot.busy_slots() == 1, timeout=10, what="the slot to be busy")
            buffered = [pool.submit(clients.completion, stack.url, 8) for _ in range(2)]
            wait_until(lambda: health(stack)["requests_buffered"] == 2, timeout=10, what="two buffered requests")

            overflow = clients.completion(stack.url, 8)

            assert not long_one.done(), "the refusal must not wait for a slot"
            assert overflow.status == 503
            assert overflow.json()["error"]["type"] == "buffer_full"
            assert overflow.headers.get("retry-after") == "1"
            assert [future.result().status for future in buffered] == [200, 200]
            assert long_one.result().status == 200


def test_buffered_request_times_out_on_time_while_a_long_stream_survives_idle_timeouts(
        one_slot: LlamaServer, tmp_path: Path, kind: str) -> None:
    timeout = 2.0
    with BalancerStack(tmp_path / "lb", {"solo": one_slot.address}, kind=kind,
                       balancer={"buffered_request_timeout": f"{timeout:g}s", "idle_timeout": "1s"}) as stack:
        stack.wait_slots({"solo": 1})
        with ThreadPoolExecutor(1) as pool:
            # ~6,000 tokens at ~1,250 tokens/s: a stream several times longer than the 1 s idle timeout.
            stream = pool.submit(clients.chat_stream, stack.url, 6000)
            wait_until(lambda: one_slot.busy_slots() == 1, timeout=10, what="the slot to be busy")

            waited = clients.completion(stack.url, 8)

            assert waited.status == 503
            assert waited.json()["error"]["type"] == "buffer_timeout"
            assert timeout - 1 <= waited.seconds <= timeout + 1
            assert not stream.done()
            finished = stream.result()
        assert finished.status == 200 and finished.done and finished.finish_reason == "length"


def test_standby_serves_when_every_primary_is_down_and_traffic_returns(
        make_llama: Callable[..., LlamaServer], tmp_path: Path, kind: str) -> None:
    primary = make_llama("primary", slots=2).start()
    standby = make_llama("standby", slots=2).start()
    with BalancerStack(tmp_path / "lb", {"primary": primary.address}, standby={"standby": standby.address},
                       kind=kind) as stack:
        stack.wait_slots({"primary": 2, "standby": 2})
        assert {clients.chat(stack.url).json()["model"] for _ in range(4)} == {"primary"}

        primary.kill()
        wait_until(lambda: not stack.is_up("primary"), timeout=5, what="the primary to be marked down")
        answers = [clients.chat(stack.url) for _ in range(4)]
        assert [a.status for a in answers] == [200] * 4
        assert {a.json()["model"] for a in answers} == {"standby"}
        assert health(stack)["slots_idle"] == 2  # /health now counts the standby that serves

        primary.start()
        stack.wait_slots({"primary": 2})
        assert {clients.chat(stack.url).json()["model"] for _ in range(4)} == {"primary"}


def test_request_is_held_until_the_first_backend_starts(make_llama: Callable[..., LlamaServer], tmp_path: Path,
                                                        kind: str) -> None:
    late = make_llama("late", slots=1, port=free_port())
    with BalancerStack(tmp_path / "lb", {"late": late.address}, kind=kind,
                       balancer={"buffered_request_timeout": "30s"}) as stack, ThreadPoolExecutor(1) as pool:
        assert not stack.is_up("late")
        held = pool.submit(clients.chat, stack.url)
        wait_until(lambda: health(stack)["requests_buffered"] == 1, timeout=10, what="the request to be held")
        assert health(stack)["http"] == 503 and health(stack)["status"] == "unavailable"

        late.start()

        answer = held.result()
        assert answer.status == 200
        assert answer.json()["model"] == "late"
