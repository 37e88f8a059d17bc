"""Backends that join and leave a running agent: real llama-servers, the real agent, real `paddler-agent register`.

What the proxies do with the change is tested with each of them; here: the agent's own view (its management
API and agent-check replies) through registration, heartbeat, agent restart, deregistration while a stream
runs, a register process that dies, and SIGHUP re-reading the fleet file.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devstack.chaos import OK, Outcome, stream_chat
from devstack.processes import AgentProcess, LlamaServer, RegisterProcess, http_get, wait_until

pytestmark = pytest.mark.real

TOKEN = "registration-test-operator-token"
HEARTBEAT = 0.5
REGISTRATION_TIMEOUT = 2.0
INTERVAL = 0.2


def rows(agent: AgentProcess) -> dict[str, dict]:
    status, body = http_get(f"{agent.management_url}/api/v1/agents", timeout=2.0)
    return {row["name"]: row for row in json.loads(body)["agents"]} if status == 200 else {}


def ready(agent: AgentProcess, name: str) -> bool:
    row = rows(agent).get(name)
    return bool(row) and row["state"] == "ready" and not row["leaving"]


def write_fleet(path: Path, servers: list[LlamaServer]) -> None:
    path.write_text(yaml.safe_dump({
        "backends": [{"name": server.name, "address": server.address} for server in servers],
        "agent": {"operator_token_env": "PADDLER_OPERATOR_TOKEN", "interval": f"{int(INTERVAL * 1000)}ms",
                  "registration_timeout": f"{int(REGISTRATION_TIMEOUT * 1000)}ms"},
    }))


@pytest.fixture
def fleet(make_llama: Callable[..., LlamaServer], tmp_path: Path) -> Iterator[tuple[AgentProcess, list[LlamaServer]]]:
    servers = [make_llama(name, slots=1, ctx_per_slot=8192).start() for name in ("gpu1", "gpu2", "gpu3")]
    write_fleet(tmp_path / "fleet.yaml", servers[:1])
    agent = AgentProcess(tmp_path, ["--fleet", str(tmp_path / "fleet.yaml")],
                         extra_env={"PADDLER_OPERATOR_TOKEN": TOKEN})
    agent.start()
    try:
        yield agent, servers
    finally:
        agent.stop()


def register(agent: AgentProcess, server: LlamaServer, tmp_path: Path) -> RegisterProcess:
    process = RegisterProcess(tmp_path, agent.management_url, server.name, server.address, TOKEN,
                              heartbeat=f"{int(HEARTBEAT * 1000)}ms")
    process.start(timeout=10)
    return process


def test_registered_servers_are_ready_within_a_poll_and_come_back_after_an_agent_restart(
        fleet: tuple[AgentProcess, list[LlamaServer]], tmp_path: Path) -> None:
    agent, servers = fleet
    registers = [register(agent, server, tmp_path) for server in servers[1:]]
    try:
        for server in servers[1:]:
            wait_until(lambda server=server: ready(agent, server.name), timeout=2, what=f"{server.name} ready")
            assert agent.check(f"{server.name}\n".encode()).startswith("up ready 100% maxconn:1 ")

        agent.kill()
        agent.start()
        back_at = time.monotonic()
        for server in servers[1:]:
            wait_until(lambda server=server: ready(agent, server.name), timeout=2 * HEARTBEAT + 1,
                       what=f"{server.name} registered again")
        print(f"registrations back {time.monotonic() - back_at:.2f}s after the agent answered again")
        assert [register.running for register in registers] == [True, True]
    finally:
        for process in registers:
            process.stop()


def test_a_deregistered_server_finishes_its_stream_then_leaves(
        fleet: tuple[AgentProcess, list[LlamaServer]], tmp_path: Path) -> None:
    agent, servers = fleet
    gpu2 = servers[1]
    process = register(agent, gpu2, tmp_path)
    wait_until(lambda: ready(agent, "gpu2"), timeout=2, what="gpu2 ready")
    outcome: list[Outcome] = []
    port = int(gpu2.address.rpartition(":")[2])
    stream = threading.Thread(target=lambda: outcome.append(stream_chat("127.0.0.1", port, 6000, 0, 60.0)))
    stream.start()
    wait_until(lambda: rows(agent)["gpu2"]["slots_processing"] == 1, timeout=5, what="the stream to run on gpu2")

    process.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert process.proc.wait(10) == 0  # type: ignore[union-attr]
    row = rows(agent)["gpu2"]
    assert row["leaving"] and row["agent_check_reply"].startswith("up drain maxconn:1 #leaving the fleet")

    wait_until(lambda: "gpu2" not in rows(agent), timeout=60, what="gpu2 to be removed")
    stream.join(60)
    assert outcome and outcome[0].kind == OK, "the stream was cut when its server left"
    assert agent.check(b"gpu2\n").startswith("down #paddler-agent: unknown backend")


def test_a_registration_whose_process_died_leaves_after_the_timeout(
        fleet: tuple[AgentProcess, list[LlamaServer]], tmp_path: Path) -> None:
    agent, servers = fleet
    process = register(agent, servers[2], tmp_path)
    wait_until(lambda: ready(agent, "gpu3"), timeout=2, what="gpu3 ready")
    process.kill()
    killed_at = time.monotonic()
    wait_until(lambda: "gpu3" not in rows(agent), timeout=REGISTRATION_TIMEOUT + 3, what="gpu3 to leave")
    gone_after = time.monotonic() - killed_at
    print(f"removed {gone_after:.2f}s after its register process died")
    assert gone_after >= REGISTRATION_TIMEOUT - HEARTBEAT


def test_sighup_rereads_the_fleet_file(fleet: tuple[AgentProcess, list[LlamaServer]], tmp_path: Path) -> None:
    agent, servers = fleet
    write_fleet(tmp_path / "fleet.yaml", servers[1:])
    agent.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: ready(agent, "gpu2") and ready(agent, "gpu3") and "gpu1" not in rows(agent), timeout=3,
               what="gpu2 and gpu3 to join and gpu1 to leave")

    (tmp_path / "fleet.yaml").write_text("backends: [{name: gpu1, address: 'not an address'}]\n")
    agent.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "fleet reload refused, nothing changed" in agent.log_tail(), timeout=3,
               what="the broken file to be refused")
    assert sorted(rows(agent)) == ["gpu2", "gpu3"] and agent.running
