"""The real agent process against backends that load, refuse, lie, hang or hang up.

Each faulty backend must go down with its reason while the agent keeps answering, promptly
and correctly, for every other backend in the same fleet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devstack.processes import AgentProcess, LlamaServer, free_port, wait_until
from tests.integration import misbehaving
from tests.integration.misbehaving import BackgroundServers

pytestmark = pytest.mark.real

INTERVAL = 0.5
API_KEY = "test-secret-key"


@pytest.fixture(scope="module")
def api_llama(llama_binary: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with LlamaServer(llama_binary, tiny_model, tmp_path_factory.mktemp("api-llama"), slots=2,
                     api_key=API_KEY, name="keyed") as server:
        yield server


@pytest.fixture(scope="module")
def fleet_agent(api_llama: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    workdir = tmp_path_factory.mktemp("fault-agent")
    with BackgroundServers() as stubs:
        backends = {
            "healthy": stubs.http(misbehaving.llama_like()),
            # Like llama-server while loading: 503 on every endpoint, /health included.
            "loading": stubs.http(misbehaving.llama_like(health=misbehaving.loading_health,
                                                         slots=misbehaving.loading_health)),
            "malformed": stubs.http(misbehaving.llama_like(slots=misbehaving.malformed_slots)),
            "hanging": stubs.http(misbehaving.llama_like(health=misbehaving.hanging, slots=misbehaving.hanging)),
            "hangs-up": stubs.cut_mid_response(),
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


@pytest.mark.parametrize(("name", "expected"), [
    ("healthy", "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"),
    ("loading", "down #loading\n"),
    ("malformed", "down #error: GET /slots: body is not valid JSON\n"),
    ("hanging", "down #unreachable: no answer within 0.4s\n"),
    ("hangs-up", "down #unreachable: connection closed mid-response\n"),
    ("keyed-without-key", "down #unauthorized: GET /slots answered HTTP 401\n"),
    ("keyed-with-key", "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"),
])
def test_each_backend_gets_its_own_verdict(fleet_agent: AgentProcess, name: str, expected: str) -> None:
    assert fleet_agent.check(f"{name}\n".encode()) == expected


def test_refused_connection_is_unreachable_with_reason(fleet_agent: AgentProcess) -> None:
    reply = fleet_agent.check(b"nobody-home\n")
    assert reply.startswith("down #unreachable: connection failed")
    assert reply.endswith("\n") and reply.count("\n") == 1


def test_agent_keeps_answering_quickly_while_a_backend_hangs(fleet_agent: AgentProcess) -> None:
    """Many checks in a row, across several poll intervals: the hanging backend delays none of them."""
    replies = [fleet_agent.check(b"healthy\n", timeout=1.0) for _ in range(50)]
    assert set(replies) == {"up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"}
    assert fleet_agent.running


def test_unknown_and_missing_names_are_visible_misconfigurations(fleet_agent: AgentProcess) -> None:
    assert fleet_agent.check(b"gpu9\n") == "down #paddler-agent: unknown backend 'gpu9', check agent-send\n"
    assert fleet_agent.check(b"\n") == (
        "down #paddler-agent: agent-send must name a backend (this agent watches several)\n")
    assert fleet_agent.running


def test_garbage_from_clients_does_not_disturb_the_agent(fleet_agent: AgentProcess) -> None:
    assert fleet_agent.check(b"\xff\xfe\x00binary\n").startswith("down #paddler-agent: agent-send is not ASCII")
    assert fleet_agent.check(b"x" * 10_000).startswith("down #paddler-agent: agent-send longer than")
    assert fleet_agent.check(b"healthy\n") == "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"


def test_loading_backend_comes_up_when_it_finishes_loading(tmp_path: Path) -> None:
    state = {"loading": True}

    async def health():  # type: ignore[no-untyped-def]
        if state["loading"]:
            return await misbehaving.loading_health()
        return misbehaving.json_response({"status": "ok"})

    async def slots():  # type: ignore[no-untyped-def]
        if state["loading"]:
            return await misbehaving.loading_health()
        return misbehaving.json_response(misbehaving.TWO_IDLE_SLOTS)

    with BackgroundServers() as stubs:
        address = stubs.http(misbehaving.llama_like(health=health, slots=slots))
        with AgentProcess(tmp_path, ["--backend", f"gpu1={address}", "--interval", "200ms"]) as agent:
            assert agent.check() == "down #loading\n"  # single-backend mode: no agent-send needed
            state["loading"] = False
            wait_until(lambda: agent.check().startswith("up ready"), timeout=5, what="the backend to be ready")
