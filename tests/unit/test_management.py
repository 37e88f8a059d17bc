"""The management API over a fleet model set by hand: real aiohttp server on loopback, no llama.cpp."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agentcheck.eds import TYPE_URL, EndpointDiscovery
from agentcheck.management import PICKER_KEY, create_app, host_refusal, token_refusal
from agentcheck.membership import Membership
from agentcheck.metrics import FleetCollector, build_registry
from agentcheck.model import FleetModel, Origin, PollWindow
from agentcheck.monitor import PollCounters
from agentcheck.picker import OPEN_SETTLE_SECONDS, Picker
from agentcheck.replies import AgentCheckReplies
from agentcheck.reporting import BalancerProbe, StatsdReporter
from agentcheck.snapshot import Snapshot, fleet_snapshot
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from fleet import Address, Backend, FleetError, StatsdConfig, parse_fleet
from fleet.contract import PICKER_TOKEN_UNSET, resolve_picker_token
from generator.envoy import render_envoy

TOKEN = "s3cret-operator-token"
PICKER_TOKEN = "picker-secret-from-the-environment"
BACKENDS = [Backend("gpu1", Address("127.0.0.1", 9001)), Backend("gpu2", Address("127.0.0.1", 9002))]
STANDBY = [Backend("backup", Address("127.0.0.1", 9003))]
BUFFER_FULL = ('{"error":{"code":503,"type":"buffer_full",'
               '"message":"all llama.cpp slots are busy and the request buffer is full"}}')
BUFFER_TIMEOUT = ('{"error":{"code":503,"type":"buffer_timeout",'
                  '"message":"no llama.cpp slot became free within buffered_request_timeout"}}')


def ready(total: int, processing: int) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS,
                         model="/models/m.gguf")


class Fleet:
    """The parts the agent wires, set by hand: a model with replies subscribed, poll counts, and
    3 requests waiting in the balancer."""

    def __init__(self) -> None:
        self.model = FleetModel(BACKENDS, STANDBY)
        self.replies = AgentCheckReplies(self.model)
        self.model.subscribe(self.replies.on_member_change)
        self.model.record_poll("gpu1", ready(4, 1), now=1000.0, window=PollWindow(50.0, 50.002))
        self.model.record_poll("gpu2", BackendStatus.down(State.UNREACHABLE, "connection failed"), now=1001.0,
                               window=PollWindow(51.0, 51.0))
        self.model.record_poll("backup", ready(2, 0), now=1002.0, window=PollWindow(52.0, 52.0))
        self.polls = PollCounters()
        self.polls.count("gpu2", self.model["gpu2"].status)
        self.membership = Membership(self.model, parse_fleet({
            "backends": [{"name": b.name, "address": str(b.address)} for b in BACKENDS],
            "standby": [{"name": b.name, "address": str(b.address)} for b in STANDBY],
            "agent": {"max_registered_backends": 2}}))

    def snapshot(self) -> dict:
        return fleet_snapshot(self.model, self.replies.reply_for, 3, lambda name: True)

    def reply_for(self, name: str) -> str | None:
        return self.replies.reply_for(name)

    def is_drained(self, name: str) -> bool:
        return self.model[name].drained


class Api:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(self.base + path) as response:
            return response.status, await response.text()

    async def post(self, path: str, token: str | None = None) -> tuple[int, dict]:
        return await self.send("POST", path, token)

    async def send(self, method: str, path: str, token: str | None = None, body: object = None,
                   raw: bytes | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        async with self.session.request(method, self.base + path, headers=headers, data=data) as response:
            return response.status, await response.json()

    async def picker(self, path: str, token: str | None = PICKER_TOKEN, **headers: str) -> tuple[int, str]:
        """A POST to a picker endpoint as Envoy's filter sends it (with ``token``), plus ``headers``."""
        sent = {**headers, "x-paddler-picker-token": token} if token is not None else headers
        async with self.session.post(self.base + path, headers=sent) as response:
            return response.status, await response.text()

    async def slots_idle(self) -> int:
        """Free slots as the picker counts them: every lease it has handed out and not got back is busy."""
        idle: int = json.loads((await self.get("/api/v1/picker/health"))[1])["slots_idle"]
        return idle


async def serve(state: Fleet, token: str | None, checks: Counter[str] | None = None,
                picker_token: str = PICKER_TOKEN, host_names: tuple[str, ...] = ()) -> tuple[web.AppRunner, str]:
    snapshot: Snapshot = state.snapshot
    registry = build_registry(FleetCollector(snapshot, state.polls, checks or Counter()))
    discovery = EndpointDiscovery(state.model)
    picker = Picker(state.model, max_buffered_requests=2, buffered_request_timeout=0.2,
                    in_balancer=discovery.acknowledged)
    state.model.subscribe(picker.on_member_change)
    state.model.subscribe(discovery.on_member_change)
    discovery.when_acknowledged(picker.wake)
    runner = web.AppRunner(create_app(state.model, state.replies, snapshot, registry, token, picker,
                                      state.membership, picker_token=picker_token, host_names=host_names,
                                      discovery=discovery),
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def api() -> AsyncIterator[tuple[Api, Fleet]]:
    state = Fleet()
    runner, base = await serve(state, TOKEN, Counter({"ready": 5, "down": 2, "unknown": 1}))
    async with aiohttp.ClientSession() as session:
        yield Api(base, session), state
    await runner.cleanup()


@pytest.mark.parametrize(("header", "token", "expected"), [
    ("Bearer right-token-123456", None, 403),
    ("Bearer right-token-123456", "", 403),
    (None, "right-token-123456", 401),
    ("Basic dXNlcjpwYXNz", "right-token-123456", 401),
    ("Bearer", "right-token-123456", 401),
    ("Bearer wrong-token", "right-token-123456", 403),
    ("Bearer right-token-123456", "right-token-123456", None),
    ("bearer right-token-123456", "right-token-123456", None),
])
def test_token_refusal(header: str | None, token: str | None, expected: int | None) -> None:
    refusal = token_refusal(header, token)
    assert (refusal[0] if refusal else None) == expected


async def test_agents_lists_every_backend_with_its_state_and_reply(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    status, text = await client.get("/api/v1/agents")
    assert status == 200
    body = json.loads(text)
    rows = {row["name"]: row for row in body["agents"]}
    assert rows["gpu1"] == {
        "name": "gpu1", "address": "127.0.0.1:9001", "standby": False, "state": "ready", "reason": "",
        "drained": False, "leaving": False, "registered": False, "in_balancer": True, "slots_idle": 3,
        "slots_processing": 1, "slots_total": 4, "slot_source": "slots",
        "model": "/models/m.gguf", "router": False, "models_declared": False, "models": [],
        "last_update": 1000.0, "poll_seconds": pytest.approx(0.002),
        "agent_check_reply": "up ready 75% maxconn:4 #idle=3 processing=1 via slots", "spare_server": None}
    assert rows["gpu2"]["state"] == "unreachable" and rows["gpu2"]["reason"] == "connection failed"
    assert rows["gpu2"]["agent_check_reply"] == "down #unreachable: connection failed"
    assert rows["backup"]["standby"] is True
    assert body["totals"] == {"slots_idle": 5, "slots_processing": 1, "slots_total": 6}
    assert body["requests_buffered"] == 3


async def test_metrics_parse_and_match_the_fleet(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    status, text = await client.get("/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["paddler_slots_idle", ()] == 5
    assert samples["paddler_slots_processing", ()] == 1
    assert samples["paddler_requests_buffered", ()] == 3
    assert samples["paddler_backend_slots_processing", (("backend", "gpu1"),)] == 1
    assert samples["paddler_backend_state", (("backend", "gpu2"), ("state", "unreachable"))] == 1
    assert samples["paddler_backend_state", (("backend", "gpu2"), ("state", "ready"))] == 0
    assert samples["paddler_backend_poll_duration_seconds", (("backend", "gpu1"),)] == pytest.approx(0.002)
    assert samples["paddler_backend_poll_failures_total", (("backend", "gpu2"), ("state", "unreachable"))] == 1
    assert samples["paddler_agent_checks_total", (("reply", "ready"),)] == 5


async def test_drain_and_ready_with_the_token_change_the_reply(api: tuple[Api, Fleet]) -> None:
    client, state = api
    status, body = await client.post("/api/v1/agents/gpu1/drain", TOKEN)
    assert status == 200
    assert body["agent_check_reply"] == "up drain maxconn:4 #drained by operator, idle=3 processing=1 via slots"
    assert state.is_drained("gpu1")
    status, text = await client.get("/health")
    assert status == 200  # the standby still serves
    assert '"slots_idle": 2' in text  # a drained backend's idle slots are not offered
    status, body = await client.post("/api/v1/agents/gpu1/ready", TOKEN)
    assert status == 200 and body["agent_check_reply"].startswith("up ready 75%")
    assert not state.is_drained("gpu1")


@pytest.mark.parametrize(("token", "expected"), [(None, 401), ("wrong-token-value", 403)])
async def test_drain_without_the_right_token_is_refused_and_changes_nothing(
        api: tuple[Api, Fleet], token: str | None, expected: int) -> None:
    client, state = api
    before = state.reply_for("gpu1")
    status, body = await client.post("/api/v1/agents/gpu1/drain", token)
    assert status == expected
    assert body["error"]["code"] == expected
    assert state.reply_for("gpu1") == before and not state.is_drained("gpu1")


async def test_drain_of_unknown_backend_is_404(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    status, _ = await client.post("/api/v1/agents/gpu9/drain", TOKEN)
    assert status == 404


async def test_without_a_configured_token_operator_endpoints_are_disabled() -> None:
    state = Fleet()
    runner, base = await serve(state, None)
    try:
        async with aiohttp.ClientSession() as session:
            status, body = await Api(base, session).post("/api/v1/agents/gpu1/drain", "anything-at-all-1234")
    finally:
        await runner.cleanup()
    assert status == 403
    assert "disabled" in body["error"]["message"]
    assert not state.is_drained("gpu1")


async def test_dashboard_is_served_uncached(api: tuple[Api, Fleet]) -> None:
    # What it shows is checked in a real browser (tests/integration/test_dashboard.py).
    client, _ = api
    async with client.session.get(client.base + "/") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-store"
        assert "<title>paddler-agent</title>" in await response.text()


async def test_fleet_health_aggregates_usable_backends_and_the_buffer(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    status, text = await client.get("/health")
    assert status == 200
    assert json.loads(text) == {"status": "ok", "slots_idle": 5, "slots_processing": 1, "requests_buffered": 3}


async def test_balancer_probe_reads_haproxys_queue_and_stops_when_the_balancer_is_the_picker(
        api: tuple[Api, Fleet]) -> None:
    client, _ = api

    async def haproxy_health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "slots_idle": 0, "slots_processing": 4, "requests_buffered": 7})

    app = web.Application()
    app.router.add_get("/health", haproxy_health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        haproxy = BalancerProbe(client.session, f"http://127.0.0.1:{runner.addresses[0][1]}/health", interval=0.05)
        probing = asyncio.create_task(haproxy.run())
        async with asyncio.timeout(5):
            while haproxy.requests_buffered != 7:
                await asyncio.sleep(0.01)
        assert not probing.done()
        probing.cancel()

        envoy = BalancerProbe(client.session, client.base + "/api/v1/picker/health", interval=0.05)
        async with asyncio.timeout(5):
            await envoy.run()  # returns: nothing to probe, the picker counts its own queue
        assert envoy.balancer_is_picker and envoy.requests_buffered is None
    finally:
        await runner.cleanup()


async def test_statsd_reporter_sends_paddlers_gauges_to_a_real_udp_socket() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2.0)
    try:
        config = StatsdConfig(Address("127.0.0.1", receiver.getsockname()[1]), prefix="llm.prod")
        reporter = StatsdReporter(config, Fleet().snapshot)
        reporter.report()
        reporter.close()
        lines = set()
        while not {"llm.prod.slots_idle:5|g", "llm.prod.requests_buffered:3|g"} <= lines:
            lines |= set((await asyncio.to_thread(receiver.recv, 65536)).decode().splitlines())
    finally:
        receiver.close()
    assert {"llm.prod.slots_idle:5|g", "llm.prod.slots_processing:1|g", "llm.prod.requests_buffered:3|g",
            "llm.prod.backends.gpu1.slots_processing:1|g", "llm.prod.backends.gpu2.slots_idle:0|g"} <= lines


async def test_picker_hands_out_endpoints_then_buffers_then_refuses_with_the_shared_bodies(
        api: tuple[Api, Fleet]) -> None:
    client, _ = api
    leases = []
    envoy = {"x-paddler-picker-token": PICKER_TOKEN}
    for _ in range(3):  # gpu1 has 3 free slots
        async with client.session.post(client.base + "/api/v1/picker/acquire", headers=envoy) as response:
            assert response.status == 200
            assert response.headers["x-paddler-endpoint"].split(",")[0] == "127.0.0.1:9001"  # then alternates
            leases.append((await response.json())["lease"])
    waiting = [asyncio.create_task(client.session.post(client.base + "/api/v1/picker/acquire", headers=envoy))
               for _ in range(2)]
    _status, text = await client.get("/api/v1/picker/health")
    assert json.loads(text)["slots_idle"] == 0
    wait = asyncio.get_running_loop().time()
    while json.loads((await client.get("/api/v1/picker/health"))[1])["requests_buffered"] < 2:
        assert asyncio.get_running_loop().time() - wait < 2, "the two requests never queued"
        await asyncio.sleep(0.01)
    async with client.session.post(client.base + "/api/v1/picker/acquire", headers=envoy) as response:
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert await response.text() == BUFFER_FULL
    async with client.session.post(client.base + f"/api/v1/picker/release/{leases[0]}", headers=envoy) as response:
        assert response.status == 204
    first, second = [await task for task in waiting]
    assert first.status == 200 and first.headers["x-paddler-endpoint"].split(",")[0] == "127.0.0.1:9001"
    assert second.status == 503 and await second.text() == BUFFER_TIMEOUT
    first.release()
    second.release()


async def test_the_pickers_health_counts_no_slot_idle_while_its_opening_settles() -> None:
    """Right after the agent starts, the picker places nothing until every backend has had a poll that began
    after OPEN_SETTLE_SECONDS (Picker.open); Envoy's /health says so, so a client can wait for the slots."""
    state = Fleet()
    runner, base = await serve(state, TOKEN)
    runner.app[PICKER_KEY].open(poll_interval=60.0)
    async with aiohttp.ClientSession() as session:
        client = Api(base, session)
        status, text = await client.get("/api/v1/picker/health")
        assert (status, json.loads(text)) == (200, {"status": "ok", "slots_idle": 0, "slots_processing": 1,
                                                    "requests_buffered": 0})
        trusted = time.monotonic() + OPEN_SETTLE_SECONDS
        state.model.record_poll("gpu1", ready(4, 1), now=trusted, window=PollWindow(trusted, trusted))
        assert json.loads((await client.get("/api/v1/picker/health"))[1])["slots_idle"] == 3
    await runner.cleanup()


# The picker serves Envoy's filter only: its secret header, random lease ids released only by their holder.

MISSING_TOKEN = {"error": {"code": 403, "message": "missing x-paddler-picker-token: the picker serves Envoy's "
                                                   "paddler.lua filter only"}}
WRONG_TOKEN = {"error": {"code": 403, "message": "wrong picker token: paddler-gen envoy and paddler-agent must "
                                                 "read the same agent.picker_token_env"}}


async def test_a_cross_origin_text_plain_post_gets_no_lease(api: tuple[Api, Fleet]) -> None:
    # What any web page can send to 127.0.0.1 without a CORS preflight: a "simple" POST, no custom header.
    client, _ = api
    assert await client.slots_idle() == 3
    status, text = await client.picker("/api/v1/picker/acquire", token=None, Origin="http://evil.example",
                                       **{"Content-Type": "text/plain"})
    assert (status, json.loads(text)) == (403, MISSING_TOKEN)
    assert await client.slots_idle() == 3


async def test_the_preflight_a_page_needs_for_the_header_is_never_granted(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    async with client.session.options(client.base + "/api/v1/picker/acquire", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-paddler-picker-token"}) as response:
        assert response.status == 405
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    assert await client.slots_idle() == 3


@pytest.mark.parametrize("token", ["picker-secret-from-the-environmenT", PICKER_TOKEN_UNSET, "", "\u00e9" * 20],
                         ids=["one-letter-off", "the-unset-marker", "empty", "non-ascii"])
async def test_a_wrong_picker_token_gets_no_lease_and_releases_nothing(api: tuple[Api, Fleet], token: str) -> None:
    client, _ = api
    status, text = await client.picker("/api/v1/picker/acquire")
    lease = json.loads(text)["lease"]
    assert status == 200 and await client.slots_idle() == 2
    assert await client.picker("/api/v1/picker/acquire", token=token) == (403, json.dumps(WRONG_TOKEN))
    assert await client.picker(f"/api/v1/picker/release/{lease}", token=token) == (403, json.dumps(WRONG_TOKEN))
    assert await client.slots_idle() == 2


async def test_without_a_configured_token_the_picker_still_needs_the_filters_header() -> None:
    state = Fleet()
    runner, base = await serve(state, None, picker_token=PICKER_TOKEN_UNSET)
    try:
        async with aiohttp.ClientSession() as session:
            client = Api(base, session)
            assert (await client.picker("/api/v1/picker/acquire", token=None))[0] == 403
            assert (await client.picker("/api/v1/picker/acquire", token="anything-else-at-all"))[0] == 403
            status, text = await client.picker("/api/v1/picker/acquire", token="paddler-picker-token-unset")
            assert status == 200 and json.loads(text)["endpoint"] == "127.0.0.1:9001"
    finally:
        await runner.cleanup()


async def test_lease_ids_are_random_tokens_and_only_the_exact_one_releases_its_slot(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    first = json.loads((await client.picker("/api/v1/picker/acquire"))[1])["lease"]
    second = json.loads((await client.picker("/api/v1/picker/acquire"))[1])["lease"]
    assert len(first) == len(second) == 22 and first != second
    assert await client.slots_idle() == 1
    guesses = [("AAAAAAAAAAAAAAAAAAAAAA", 404), (first[:-1] + ("A" if first[-1] != "A" else "B"), 404),
               ("1", 400), ("2", 400), (first + "x", 400), (first[:21], 400), ("%2E%2E%2Fagents%2Fx%2Fdrain", 400)]
    for guess, expected in guesses:
        status, text = await client.picker(f"/api/v1/picker/release/{guess}")
        assert (status, json.loads(text)["error"]["code"]) == (expected, expected), guess
    assert await client.slots_idle() == 1, "a guessed lease id freed a slot someone holds"
    assert await client.picker(f"/api/v1/picker/release/{second}") == (204, "")
    assert await client.slots_idle() == 2  # exactly the holder's one slot
    status, _ = await client.picker(f"/api/v1/picker/release/{second}")
    assert status == 404  # released once: a second release frees nothing more
    assert await client.slots_idle() == 2


async def test_a_failure_report_takes_the_token_and_a_lease_id_and_stops_placements(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    lease = json.loads((await client.picker("/api/v1/picker/acquire"))[1])["lease"]
    assert await client.picker(f"/api/v1/picker/failed/{lease}", token=None) == (403, json.dumps(MISSING_TOKEN))
    assert (await client.picker("/api/v1/picker/failed/1"))[0] == 400
    assert (await client.picker("/api/v1/picker/failed/AAAAAAAAAAAAAAAAAAAAAA"))[0] == 404
    assert await client.picker(f"/api/v1/picker/failed/{lease}", **{"x-paddler-endpoint": "127.0.0.1:9001"}) == (
        204, "")
    status, text = await client.picker("/api/v1/picker/acquire")  # the only ready primary refused: standby
    assert status == 200 and json.loads(text)["endpoint"] == "127.0.0.1:9003"
    assert await client.picker(f"/api/v1/picker/release/{lease}") == (204, "")


def test_the_picker_token_rule() -> None:
    # One rule (fleet/contract.py) for paddler-gen envoy, which renders the token into the Lua route,
    # and paddler-agent, which compares it.
    unset = parse_fleet({"backends": [{"name": "a", "address": "127.0.0.1:1"}]}, source="fleet.yaml")
    named = parse_fleet({"backends": [{"name": "a", "address": "127.0.0.1:1"}],
                         "agent": {"picker_token_env": "PICKER"}}, source="fleet.yaml")
    assert resolve_picker_token(unset, {}) == "paddler-picker-token-unset"
    assert resolve_picker_token(named, {"PICKER": PICKER_TOKEN}) == PICKER_TOKEN
    for bad in ({}, {"PICKER": ""}, {"PICKER": "short-token"}, {"PICKER": "has a space in the token"},
                {"PICKER": "line-break-in-the\ntoken"}, {"PICKER": "non-ascii-\u00e9-token-value"}):
        with pytest.raises(FleetError) as refused:
            resolve_picker_token(named, bad)
        assert str(refused.value) == ("fleet.yaml: agent.picker_token_env: environment variable PICKER must "
                                      "hold 16 or more printable ASCII characters, no spaces")


def test_the_rendered_envoy_route_carries_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PADDLER_TEST_PICKER_TOKEN", PICKER_TOKEN)
    fleet = parse_fleet({"backends": [{"name": "a", "address": "127.0.0.1:1"}],
                         "agent": {"picker_token_env": "PADDLER_TEST_PICKER_TOKEN"}})
    assert '\n                      picker_token: "picker-secret-from-the-environment"\n' in \
        render_envoy(fleet)


# Envoy's REST EDS: the picker token in the node's metadata, the request held while nothing changes.

def discovery_request(version: str = "", token: object = PICKER_TOKEN) -> dict:
    return {"version_info": version, "node": {"id": "paddler-envoy", "metadata": {"paddler_picker_token": token}},
            "resource_names": ["llama"], "type_url": TYPE_URL}


async def discover(client: Api, body: object) -> tuple[int, dict | None]:
    # Envoy names its xDS cluster in Host.
    async with client.session.post(client.base + "/v3/discovery:endpoints", data=io.BytesIO(json.dumps(body).encode()),
                                   headers={"Host": "paddler_agent", "Content-Type": "application/json"}) as response:
        return response.status, (await response.json() if response.status in (200, 400, 403) else None)


async def test_envoy_gets_every_endpoint_then_waits_for_a_change(api: tuple[Api, Fleet],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    client, state = api
    status, response = await discover(client, discovery_request())
    assert status == 200 and response is not None
    assert [endpoint["metadata"]["filter_metadata"]["paddler"]["name"]
            for group in response["resources"][0]["endpoints"] for endpoint in group["lb_endpoints"]] == [
        "gpu1", "gpu2", "backup"]
    version = response["version_info"]
    monkeypatch.setattr("fleet.contract.EDS_HOLD_SECONDS", 0.05)
    assert await discover(client, discovery_request(version)) == (304, None)
    monkeypatch.setattr("fleet.contract.EDS_HOLD_SECONDS", 5.0)
    held = asyncio.create_task(discover(client, discovery_request(version)))
    await asyncio.sleep(0.05)
    assert not held.done()
    state.model.add(Backend("gpu3", Address("127.0.0.1", 9004)), Origin.REGISTERED)
    status, response = await asyncio.wait_for(held, 2.0)
    assert status == 200 and response is not None and response["version_info"] != version
    assert "9004" in json.dumps(response)


async def test_envoys_request_is_read_whole_though_its_node_lists_every_extension(api: tuple[Api, Fleet]) -> None:
    client, _ = api
    request = discovery_request()
    request["node"]["extensions"] = [{"name": f"envoy.extension.{n}", "category": "envoy.filters"}
                                     for n in range(2000)]  # about 130 KB, more than registrations may send
    assert (await discover(client, request))[0] == 200
    request["node"]["extensions"] *= 10
    status, response = await discover(client, request)
    assert status == 413 and response is None


@pytest.mark.parametrize("body", [discovery_request(token=None), discovery_request(token="wrong-picker-token"),
                                  discovery_request(token=7), {"version_info": ""}])
async def test_without_the_picker_token_envoy_gets_the_endpoints_but_cannot_hold_the_picker_back(
        api: tuple[Api, Fleet], body: dict) -> None:
    client, state = api
    status, response = await discover(client, body)  # a token slip must not empty Envoy's cluster
    assert status == 200 and response is not None
    state.model.add(Backend("gpu3", Address("127.0.0.1", 9004)), Origin.REGISTERED)
    # Its version_info ("", older) would say Envoy has nothing yet: not believed, the picker still places.
    assert await client.slots_idle() == 3


@pytest.mark.parametrize("body", [[], "text", {**discovery_request(), "version_info": 3}])
async def test_a_request_that_is_no_discovery_request_is_400(api: tuple[Api, Fleet], body: object) -> None:
    client, _ = api
    status, response = await discover(client, body)
    assert status == 400 and response is not None and response["error"]["code"] == 400


# Host names: a page whose DNS name was rebound to the agent's address sends its own name and is refused.

HOST_REFUSED = {"error": {"code": 421, "message": "this agent does not serve that Host: reach it by IP address, "
                                                  "localhost or its management address's host name"}}
ENDPOINTS = [("GET", "/"), ("GET", "/api/v1/agents"), ("GET", "/health"), ("GET", "/metrics"),
             ("GET", "/api/v1/picker/health"), ("POST", "/api/v1/picker/acquire"),
             ("POST", "/api/v1/agents/gpu1/drain"), ("GET", "/no/such/page")]


@pytest.mark.parametrize("host", ["evil.example:8085", "evil.example", "localhost.evil.example:8085",
                                  "paddler-agent.evil.example", "127.0.0.1.evil.example", "dash.example.com", ""])
@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_a_foreign_host_is_refused_on_every_endpoint_and_changes_nothing(
        api: tuple[Api, Fleet], host: str, method: str, path: str) -> None:
    client, state = api
    headers = {"Host": host, "Authorization": f"Bearer {TOKEN}", "x-paddler-picker-token": PICKER_TOKEN}
    async with client.session.request(method, client.base + path, headers=headers) as response:
        assert response.status == 421
        assert await response.json() == HOST_REFUSED
    assert await client.slots_idle() == 3 and not state.is_drained("gpu1")


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "localhost",
                                  "[::1]:{port}", "paddler-agent", "paddler-agent:{port}", "10.0.0.7:8085",
                                  "[fd00::7]:8085", "dash.example.com:{port}", "DASH.example.com"])
async def test_ip_addresses_localhost_the_filters_name_and_listed_names_are_served(host: str) -> None:
    state = Fleet()
    runner, base = await serve(state, TOKEN, host_names=("dash.example.com",))
    port = base.rsplit(":", 1)[1]
    try:
        async with aiohttp.ClientSession() as session:
            for method, path in ENDPOINTS:
                headers = {"Host": host.format(port=port), "Authorization": f"Bearer {TOKEN}",
                           "x-paddler-picker-token": PICKER_TOKEN}
                async with session.request(method, base + path, headers=headers) as response:
                    assert response.status == (404 if path == "/no/such/page" else 200), (method, path)
    finally:
        await runner.cleanup()
    assert state.is_drained("gpu1")


@pytest.mark.parametrize(("host", "refused"), [
    (None, False), ("127.0.0.1:8085", False), ("[::1]", False), ("2130706433", True), ("[evil.example]:80", True),
    ("evil.example:80:80", True), (":8085", True), ("localhost.", True), ("Paddler-Agent", False)])
def test_host_refusal(host: str | None, refused: bool) -> None:
    assert (host_refusal(host, ["paddler-agent"]) is not None) == refused


async def test_a_backend_registers_heartbeats_and_leaves_through_the_api(api: tuple[Api, Fleet]) -> None:
    client, state = api
    assert (await client.send("PUT", "/api/v1/backends/gpu7", body={"address": "127.0.0.1:9007"}))[0] == 401

    status, body = await client.send("PUT", "/api/v1/backends/gpu7", TOKEN, {"address": "127.0.0.1:9007", "slots": 2})
    assert (status, body["name"], body["address"], body["origin"], body["leaving"]) == (
        201, "gpu7", "127.0.0.1:9007", "registered", False)
    status, body = await client.send("POST", "/api/v1/backends", TOKEN,
                                     {"name": "gpu7", "address": "127.0.0.1:9007", "slots": 2})
    assert status == 200  # the same registration again: a heartbeat
    rows = {row["name"]: row for row in json.loads((await client.get("/api/v1/agents"))[1])["agents"]}
    assert (rows["gpu7"]["registered"], rows["gpu7"]["state"], rows["gpu1"]["registered"]) == (True, "pending", False)

    status, body = await client.send("DELETE", "/api/v1/backends/gpu7", TOKEN)
    assert (status, body) == (202, {"name": "gpu7", "leaving": True})
    listed = {row["name"]: row for row in json.loads((await client.get("/api/v1/backends"))[1])["backends"]}
    assert (listed["gpu7"]["leaving"], listed["gpu7"]["expires_in"], listed["gpu1"]["origin"]) == (
        True, None, "fleet file")
    state.membership.sweep()  # never polled ready: nothing can run there, so it goes at once
    assert "gpu7" not in state.model


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("PUT", "/api/v1/backends/bad name", {"address": "127.0.0.1:9007"}, 400,
     "backend.name: 'bad name' is not allowed: use 1-63 characters from A-Z a-z 0-9 _ . - , "
     "starting with a letter or digit"),
    ("PUT", "/api/v1/backends/gpu7", {"address": "127.0.0.1:99999"}, 400,
     "backend.address: port must be 1-65535, got '99999'"),
    ("PUT", "/api/v1/backends/gpu7", {"address": "127.0.0.1:9007", "api_key_env": "PADDLER_OPERATOR_TOKEN"}, 400,
     "api_key_env: not allowed in a registration (allowed: address, api_key, models, name, slots)"),
    ("PUT", "/api/v1/backends/gpu7", ["127.0.0.1:9007"], 400,
     'expected a JSON object like {"name": "gpu7", "address": "10.0.0.17:8080"}'),
    ("PUT", "/api/v1/backends/gpu7", {"name": "gpu8", "address": "127.0.0.1:9007"}, 400,
     "name: the body names another backend than the URL"),
    ("POST", "/api/v1/backends", {"address": "127.0.0.1:9007"}, 400, "backend.name: required key is missing"),
    ("PUT", "/api/v1/backends/gpu1", {"address": "127.0.0.1:9001"}, 409,
     "'gpu1' is in the fleet file; change it there"),
    ("PUT", "/api/v1/backends/gpu7", {"address": "127.0.0.1:9002"}, 409, "127.0.0.1:9002 is already backend 'gpu2'"),
    ("PUT", "/api/v1/backends/gpu7", {"address": "127.0.0.1:8085"}, 409,
     "127.0.0.1:8085 is this fleet's agent.management"),
    ("PUT", "/api/v1/backends/paddler-spare-1", {"address": "127.0.0.1:9007"}, 400,
     "backend.name: 'paddler-spare-1' is not allowed: names starting with 'paddler-spare-' are HAProxy's spare "
     "servers"),
    ("DELETE", "/api/v1/backends/gpu1", None, 409,
     "'gpu1' is in the fleet file; remove it there and send the agent SIGHUP"),
    ("DELETE", "/api/v1/backends/gpu9", None, 404, "no backend named 'gpu9'"),
])
async def test_a_bad_registration_gets_a_4xx_with_one_line_and_changes_nothing(
        api: tuple[Api, Fleet], method: str, path: str, body: object, status: int, message: str) -> None:
    client, state = api
    before = list(state.model)
    assert await client.send(method, path, TOKEN, body) == (status, {"error": {"code": status, "message": message}})
    assert list(state.model) == before


async def test_registrations_beyond_the_maximum_and_bodies_that_are_not_json_are_refused(
        api: tuple[Api, Fleet]) -> None:
    client, state = api
    for number in (7, 8):
        assert (await client.send("PUT", f"/api/v1/backends/gpu{number}", TOKEN,
                                  {"address": f"127.0.0.1:900{number}"}))[0] == 201
    status, body = await client.send("PUT", "/api/v1/backends/gpu9", TOKEN, {"address": "127.0.0.1:9009"})
    assert (status, body["error"]["message"]) == (409, "at most 2 registered backends (agent.max_registered_backends)")
    status, body = await client.send("PUT", "/api/v1/backends/gpu9", TOKEN, raw=b"{not json")
    assert status == 400 and body["error"]["message"].startswith("the body is not JSON: ")
    status, body = await client.send("PUT", "/api/v1/backends/gpu9", TOKEN, raw=b"x" * (65 * 1024))
    assert (status, body["error"]["message"]) == (413, "the body is over 65536 bytes")
    assert "gpu9" not in state.model


# --- models: what each backend serves, per-model /health, /metrics and StatsD -------------------------------

ROUTER = BackendStatus(State.READY, slots_total=2, slots_processing=1, slot_source=SlotSource.SLOTS, router=True,
                       models=(ModelStatus("alpha", ModelLoad.LOADED, 2, 1), ModelStatus("beta", ModelLoad.UNLOADED)))
PLAIN = BackendStatus(State.READY, slots_total=4, slots_processing=1, slot_source=SlotSource.SLOTS, model="alpha",
                      models=(ModelStatus("alpha", ModelLoad.LOADED, 4, 1),))


class ModelsFleet(Fleet):
    """A router discovering alpha (loaded) and beta (unloaded); a plain server the fleet declares serving alpha
    and gamma while it discovers alpha; a down server declared to serve delta."""

    def __init__(self) -> None:
        backends = [Backend("router1", Address("127.0.0.1", 9001)),
                    Backend("plain1", Address("127.0.0.1", 9002), models=("gamma", "alpha")),
                    Backend("down1", Address("127.0.0.1", 9003), models=("delta",))]
        self.model = FleetModel(backends)
        self.replies = AgentCheckReplies(self.model)
        self.model.subscribe(self.replies.on_member_change)
        self.polls = PollCounters()
        self.polls.count("router1", replace(ROUTER, models=(ModelStatus("alpha", ModelLoad.UNLOADED),
                                                            ModelStatus("beta", ModelLoad.UNLOADED))))
        for name, status in (("router1", ROUTER), ("plain1", PLAIN),
                             ("down1", BackendStatus.down(State.UNREACHABLE, "connection failed"))):
            self.model.record_poll(name, status, now=1000.0, window=PollWindow(50.0, 50.0))
            self.polls.count(name, status)
        self.membership = Membership(self.model, parse_fleet({"backends": [
            {"name": b.name, "address": str(b.address)} for b in backends]}))

    def snapshot(self) -> dict:
        # Four requests wait for alpha (its picker queue, or its HAProxy backend); the others' queues are unknown.
        return fleet_snapshot(self.model, self.replies.reply_for, 3, lambda name: True,
                              buffered_for={"alpha": 4}.get)


@pytest.fixture
async def models_api() -> AsyncIterator[Api]:
    runner, base = await serve(ModelsFleet(), TOKEN)
    async with aiohttp.ClientSession() as session:
        yield Api(base, session)
    await runner.cleanup()


def model_row(name: str, load: str | None, total: int = 0, processing: int = 0, declared: bool = False,
              discovered: bool = True) -> dict[str, object]:
    return {"name": name, "load": load, "slots_idle": total - processing, "slots_processing": processing,
            "slots_total": total, "declared": declared, "discovered": discovered}


async def test_agents_list_each_backends_models_declared_and_discovered(models_api: Api) -> None:
    status, text = await models_api.get("/api/v1/agents")
    body = json.loads(text)
    rows = {row["name"]: row for row in body["agents"]}

    assert status == 200
    assert (rows["router1"]["router"], rows["router1"]["models_declared"]) == (True, False)
    assert rows["router1"]["models"] == [model_row("alpha", "loaded", 2, 1), model_row("beta", "unloaded")]
    # Declared first, in the fleet's order; gamma is declared but the server does not list it.
    assert (rows["plain1"]["router"], rows["plain1"]["models_declared"]) == (False, True)
    assert rows["plain1"]["models"] == [model_row("gamma", None, declared=True, discovered=False),
                                        model_row("alpha", "loaded", 4, 1, declared=True)]
    assert rows["down1"]["models"] == [model_row("delta", None, declared=True, discovered=False)]
    # Per model, the slots of the balancer's pools (agentcheck.model_routing): the plain server's 4 slots are
    # split between its two declared names, each share counted as busy as it can be.
    assert body["models"] == {
        "alpha": {"slots_idle": 2, "slots_processing": 2, "slots_total": 4, "usable": True, "requests_buffered": 4},
        "beta": {"slots_idle": 0, "slots_processing": 0, "slots_total": 0, "usable": True, "requests_buffered": None},
        "gamma": {"slots_idle": 1, "slots_processing": 1, "slots_total": 2, "usable": True, "requests_buffered": None},
        "delta": {"slots_idle": 0, "slots_processing": 0, "slots_total": 0, "usable": False,
                  "requests_buffered": None}}


async def test_an_undeclared_model_a_server_discovers_is_listed_as_such() -> None:
    state = ModelsFleet()
    state.model.record_poll("plain1", replace(PLAIN, models=(ModelStatus("omega", ModelLoad.LOADED, 4, 1),)),
                            now=1001.0, window=PollWindow(51.0, 51.0))

    rows = {row["name"]: row for row in state.snapshot()["agents"]}

    assert rows["plain1"]["models"] == [model_row("gamma", None, declared=True, discovered=False),
                                        model_row("alpha", None, declared=True, discovered=False),
                                        model_row("omega", "loaded", 4, 1)]
    assert "omega" not in state.snapshot()["models"]  # the balancer routes only declared models there


@pytest.mark.parametrize(("model", "status", "expected"), [
    pytest.param("alpha", 200, {"status": "ok", "slots_idle": 2, "slots_processing": 2, "requests_buffered": 4},
                 id="two-backends-and-its-queue"),
    pytest.param("beta", 200, {"status": "ok", "slots_idle": 0, "slots_processing": 0},
                 id="unloaded-on-a-router-a-request-loads-it"),
    pytest.param("gamma", 200, {"status": "ok", "slots_idle": 1, "slots_processing": 1}, id="declared"),
    pytest.param("delta", 503, {"status": "unavailable", "slots_idle": 0, "slots_processing": 0},
                 id="only-on-a-down-backend"),
])
async def test_health_of_one_model_counts_only_its_slots(models_api: Api, model: str, status: int,
                                                         expected: dict[str, object]) -> None:
    answer, text = await models_api.get(f"/health?model={model}")

    assert (answer, json.loads(text)) == (status, expected)


async def test_health_of_a_model_nothing_serves_is_an_openai_style_404(models_api: Api) -> None:
    status, text = await models_api.get("/health?model=" + "x" * 300)

    assert status == 404
    error = json.loads(text)["error"]
    assert (error["code"], error["type"]) == (404, "model_not_found")
    assert error["message"] == f"no backend serves the model {'x' * 128 + '...'!r}"


async def test_metrics_per_model_slots_load_state_and_cold_loads(models_api: Api) -> None:
    status, text = await models_api.get("/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, backend: str, model: str, **labels: str) -> float:
        return samples[name, tuple(sorted({"backend": backend, "model": model, **labels}.items()))]

    assert status == 200
    assert value("paddler_model_slots_idle", "router1", "alpha") == 1
    assert value("paddler_model_slots_processing", "plain1", "alpha") == 1
    assert value("paddler_model_slots_total", "plain1", "alpha") == 4
    assert value("paddler_model_slots_total", "router1", "beta") == 0
    assert value("paddler_model_load_state", "router1", "beta", state="unloaded") == 1
    assert value("paddler_model_load_state", "router1", "beta", state="loaded") == 0
    assert value("paddler_model_load_state", "router1", "alpha", state="loaded") == 1
    assert samples["paddler_model_requests_buffered", (("model", "alpha"),)] == 4
    assert ("paddler_model_requests_buffered", (("model", "beta"),)) not in samples  # unknown: no sample
    assert ("paddler_model_load_state", (("backend", "plain1"), ("model", "gamma"), ("state", "loaded"))) \
        not in samples  # declared, not discovered: no load state to tell
    # The fixture's first poll saw alpha unloaded, the next loaded: one cold load; beta never loaded.
    assert value("paddler_model_cold_loads_total", "router1", "alpha") == 1
    assert not [key for key in samples if key[0] == "paddler_model_cold_loads_total" and ("model", "beta") in key[1]]


async def test_statsd_reports_each_models_slots_under_a_safe_name() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2.0)
    state = ModelsFleet()
    state.model.record_poll("router1", replace(ROUTER, models=(
        ModelStatus("org/alpha:q4", ModelLoad.LOADED, 2, 1), ModelStatus("beta", ModelLoad.UNLOADED))),
        now=1001.0, window=PollWindow(51.0, 51.0))
    expected = {"p.model.org_alpha_q4.slots_idle:1|g", "p.model.org_alpha_q4.slots_processing:1|g",
                "p.model.alpha.slots_idle:1|g", "p.model.alpha.requests_buffered:4|g", "p.model.delta.slots_idle:0|g",
                "p.model.beta.slots_processing:0|g"}
    try:
        reporter = StatsdReporter(StatsdConfig(Address("127.0.0.1", receiver.getsockname()[1]), prefix="p"),
                                  state.snapshot)
        reporter.report()
        reporter.close()
        lines: set[str] = set()
        while not expected <= lines:
            lines |= set((await asyncio.to_thread(receiver.recv, 65536)).decode().splitlines())
    finally:
        receiver.close()


def test_a_cold_load_is_counted_once_from_unloaded_through_loading_to_loaded() -> None:
    counters = PollCounters()

    def poll(*loads: ModelLoad) -> None:
        counters.count("r", replace(ROUTER, models=tuple(ModelStatus(f"m{index}", load)
                                                         for index, load in enumerate(loads))))

    poll(ModelLoad.LOADED, ModelLoad.UNLOADED)  # m0 was loaded when first seen: not a load the agent saw
    poll(ModelLoad.LOADED, ModelLoad.LOADING)
    counters.count("r", BackendStatus.down(State.UNREACHABLE, "no answer within 0.8s"))  # remembers the loads
    poll(ModelLoad.UNLOADED, ModelLoad.LOADED)
    poll(ModelLoad.LOADED, ModelLoad.UNLOADED)
    poll(ModelLoad.LOADED, ModelLoad.LOADED)

    assert counters.cold_loads == Counter({("r", "m1"): 2, ("r", "m0"): 1})
    counters.forget("r")
    assert counters.cold_loads == Counter()
