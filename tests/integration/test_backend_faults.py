"""The real agent process against backends that load, refuse, lie, hang, trickle or hang up.

The fleet is a real llama-server with an API key (asked with and without it) and the
stand-ins of ``misbehaving`` for what a real server cannot be made to do on demand. Each
backend gets its own exact one-line verdict with a reason, while the agent keeps answering,
promptly and correctly, for every backend in the same fleet, and never logs a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import AgentProcess, LlamaServer, free_port, http_get, wait_until
from tests.integration import misbehaving
from tests.integration.misbehaving import BackgroundServers

pytestmark = pytest.mark.real

INTERVAL = 0.5
API_KEY = "test-secret-key"
READY_TWO_IDLE = "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"
POLL_TIMEOUT = 0.4  # 0.8 x INTERVAL: no reply may take this long

# Every backend's exact agent-check reply ("nobody-home" aside: its reason quotes the OS).
EXPECTED = {
    "keyed-with-key": READY_TWO_IDLE,
    "keyed-without-key": "down #unauthorized: GET /slots answered HTTP 401\n",
    "loading": "down #loading\n",
    "malformed": "down #error: GET /slots: body is not valid JSON\n",
    "hanging": "down #unreachable: no answer within 0.4s\n",
    "hangs-up": "down #unreachable: connection closed mid-response\n",
    "trickle": "down #unreachable: no answer within 0.4s\n",
    "reset": "down #unreachable: connection closed mid-response\n",
    "endless-chunked": "down #unreachable: GET /slots: response larger than 4194304 bytes\n",
    "oversized": "down #unreachable: GET /slots: response larger than 4194304 bytes\n",
    "html-500": "down #error: GET /slots answered HTTP 500\n",
    "auth-proxy": "down #unauthorized: GET /health answered HTTP 401\n",
    "slots-as-object": "down #error: GET /slots: expected a JSON list of slots\n",
    "string-is-processing": "down #error: GET /slots: slot 0 has no boolean is_processing\n",
    # The agent reads only is_processing: ids and n_ctx it does not use cannot make a backend unusable.
    "odd-slot-fields": "up ready 50% maxconn:2 #idle=1 processing=1 via slots\n",
    "slow-props": READY_TWO_IDLE,
    "hanging-props": READY_TWO_IDLE,
}


@pytest.fixture(scope="module")
def api_llama(llama_binary: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with LlamaServer(llama_binary, tiny_model, tmp_path_factory.mktemp("api-llama"), slots=2,
                     api_key=API_KEY, name="keyed") as server:
        yield server


@pytest.fixture(scope="module")
def fleet_agent(api_llama: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    workdir = tmp_path_factory.mktemp("fault-agent")
    like = misbehaving.llama_like
    with BackgroundServers() as stubs:
        backends = {
            # Like llama-server while loading: 503 on every endpoint, /health included.
            "loading": stubs.http(like(health=misbehaving.loading_health, slots=misbehaving.loading_health,
                                       props=misbehaving.loading_health)),
            "malformed": stubs.http(like(slots=misbehaving.malformed_slots)),
            "hanging": stubs.http(like(health=misbehaving.hanging, slots=misbehaving.hanging)),
            "hangs-up": stubs.cut_mid_response(),
            "trickle": stubs.http(like(slots=misbehaving.trickling_slots)),
            "reset": stubs.reset(),
            "endless-chunked": stubs.http(like(slots=misbehaving.endless_chunked_slots)),
            "oversized": stubs.http(like(slots=misbehaving.oversized_slots)),
            "html-500": stubs.http(like(slots=misbehaving.html_500)),
            "auth-proxy": stubs.http(like(health=misbehaving.proxy_401, slots=misbehaving.proxy_401,
                                          props=misbehaving.proxy_401)),
            "slots-as-object": stubs.http(like(slots=misbehaving.slots_as_object)),
            "string-is-processing": stubs.http(like(slots=misbehaving.slots_with_string_is_processing)),
            "odd-slot-fields": stubs.http(like(slots=misbehaving.slots_with_odd_fields)),
            "slow-props": stubs.http(like(props=misbehaving.slow_props)),
            "hanging-props": stubs.http(like(props=misbehaving.hanging)),
            "nobody-home": f"127.0.0.1:{free_port()}",
            # The fleet refuses one address twice, so this entry reaches the same server through a relay.
            "keyed-without-key": stubs.relay(api_llama.address),
        }
        entries = [{"name": name, "address": address} for name, address in backends.items()]
        entries.append({"name": "keyed-with-key", "address": api_llama.address, "api_key_env": "KEYED_API_KEY"})
        fleet_file = workdir / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump({"backends": entries, "agent": {"interval": f"{int(INTERVAL * 1000)}ms"}}))
        with AgentProcess(workdir, ["--fleet", str(fleet_file)], extra_env={"KEYED_API_KEY": API_KEY}) as agent:
            yield agent


@pytest.mark.parametrize(("name", "expected"), EXPECTED.items(), ids=list(EXPECTED))
def test_each_backend_gets_its_own_verdict(fleet_agent: AgentProcess, name: str, expected: str) -> None:
    assert fleet_agent.check(f"{name}\n".encode()) == expected


def test_refused_connection_is_unreachable_with_reason(fleet_agent: AgentProcess) -> None:
    reply = fleet_agent.check(b"nobody-home\n")
    assert reply.startswith("down #unreachable: connection failed")
    assert reply.endswith("\n") and reply.count("\n") == 1


def test_slow_or_hanging_props_leaves_the_model_unknown_and_the_backend_up(fleet_agent: AgentProcess) -> None:
    """/props is optional: the stand-ins' model never arrives, their /slots verdict stands (above),
    while the real server's /props, asked with its key, names its model."""
    status, body = http_get(fleet_agent.management_url + "/api/v1/agents")
    assert status == 200
    models = {agent["name"]: agent["model"] for agent in json.loads(body)["agents"]}
    assert (models["slow-props"], models["hanging-props"], models["keyed-with-key"]) == (None, None, "keyed")


def test_agent_keeps_answering_quickly_while_backends_misbehave(fleet_agent: AgentProcess) -> None:
    """Every backend asked in turn across several poll intervals: each reply is its verdict, and
    none waits for a poll (a reply that did would take the poll timeout)."""
    loop_until = time.monotonic() + 4 * INTERVAL
    slowest = 0.0
    for _ in range(1000):  # a bound; the loop normally ends on time after a few dozen rounds
        for name, expected in EXPECTED.items():
            started = time.monotonic()
            assert fleet_agent.check(f"{name}\n".encode(), timeout=1.0) == expected, name
            slowest = max(slowest, time.monotonic() - started)
        if time.monotonic() > loop_until:
            break
    assert time.monotonic() > loop_until
    assert slowest < POLL_TIMEOUT
    assert fleet_agent.running


def test_unknown_and_missing_names_are_visible_misconfigurations(fleet_agent: AgentProcess) -> None:
    assert fleet_agent.check(b"gpu9\n") == "down #paddler-agent: unknown backend 'gpu9', check agent-send\n"
    assert fleet_agent.check(b"\n") == (
        "down #paddler-agent: agent-send must name a backend (this agent watches several)\n")
    assert fleet_agent.running


def test_garbage_from_clients_does_not_disturb_the_agent(fleet_agent: AgentProcess) -> None:
    assert fleet_agent.check(b"\xff\xfe\x00binary\n").startswith("down #paddler-agent: agent-send is not ASCII")
    assert fleet_agent.check(b"x" * 10_000).startswith("down #paddler-agent: agent-send longer than")
    assert fleet_agent.check(b"keyed-with-key\n") == READY_TWO_IDLE


def test_loading_backend_comes_up_when_it_finishes_loading(tmp_path: Path) -> None:
    state = {"loading": True}

    async def health(request: web.Request) -> web.StreamResponse:
        if state["loading"]:
            return await misbehaving.loading_health(request)
        return await misbehaving.ok_health(request)

    async def slots(request: web.Request) -> web.StreamResponse:
        if state["loading"]:
            return await misbehaving.loading_health(request)
        return await misbehaving.ok_slots(request)

    with BackgroundServers() as stubs:
        address = stubs.http(misbehaving.llama_like(health=health, slots=slots))
        with AgentProcess(tmp_path, ["--backend", f"gpu1={address}", "--interval", "200ms"]) as agent:
            assert agent.check() == "down #loading\n"  # single-backend mode: no agent-send needed
            state["loading"] = False
            wait_until(lambda: agent.check().startswith("up ready"), timeout=5, what="the backend to be ready")


def test_the_agent_never_logged_a_traceback(fleet_agent: AgentProcess) -> None:
    """Last in the module: by now every misbehaving backend has been polled many times."""
    def polled_at_least(times: int) -> bool:
        status, body = http_get(fleet_agent.management_url + "/metrics")
        polls = {sample.labels["backend"]: sample.value
                 for family in text_string_to_metric_families(body.decode()) if family.name == "paddler_backend_polls"
                 for sample in family.samples if sample.name == "paddler_backend_polls_total"}
        return status == 200 and set(polls) == {*EXPECTED, "nobody-home"} and min(polls.values()) >= times

    wait_until(lambda: polled_at_least(5), timeout=10, what="five polls of every backend")
    assert fleet_agent.running
    log = fleet_agent.log_path.read_text(errors="replace")
    assert "Traceback" not in log, fleet_agent.log_tail()
