"""The spare pool's I/O edge against a fake runtime API socket: what it sends, what it survives."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agentcheck.haproxy_runtime import REFILL_WAIT, RuntimeAPI, SparePool, command_failed
from agentcheck.metrics import FleetCollector, build_registry
from agentcheck.model import FleetModel, Origin, PollWindow
from agentcheck.monitor import PollCounters
from agentcheck.protocol import Request
from agentcheck.replies import AgentCheckReplies
from agentcheck.snapshot import fleet_snapshot
from agentcheck.status import BackendStatus, SlotSource, State
from fleet import Address, Backend

HEADER = "# pxname,svname,scur,status,addr,\n"


class FakeHAProxy:
    """Answers `show stat` from ``servers`` (name → (status, addr, scur)) and records every other command."""

    def __init__(self) -> None:
        self.servers = {"gpu1": ("UP", "127.0.0.1:8081", 0), "paddler-spare-1": ("MAINT", "0.0.0.0:0", 0),
                        "paddler-spare-2": ("MAINT", "0.0.0.0:0", 0)}
        self.commands: list[str] = []
        self.during: Callable[[], None] = lambda: None  # called as each command arrives
        self.reads = 0
        self.refuse = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().strip()
        if line.startswith("show stat"):
            self.reads += 1
            rows = "".join(f"llama,{name},{scur},{status},{addr},\n"
                           for name, (status, addr, scur) in self.servers.items())
            writer.write((HEADER + rows + "\n").encode())
        else:
            self.commands.append(line)
            self.during()
            writer.write(b"Permission denied\n\n" if self.refuse else b"\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def haproxy(tmp_path: Path) -> AsyncIterator[tuple[FakeHAProxy, str]]:
    fake = FakeHAProxy()
    path = str(tmp_path / "admin.sock")
    server = await asyncio.start_unix_server(fake.handle, path)
    async with server:
        yield fake, path


def pool_for(path: str, model: FleetModel, replies: AgentCheckReplies, resolved: dict[str, str] | None = None
             ) -> SparePool:
    async def resolver(host: str, port: int) -> str:
        if resolved is None or host not in resolved:
            raise OSError("Name or service not known")
        return resolved[host]

    return SparePool(model, replies, RuntimeAPI(path, timeout=1.0), "llama", ["paddler-spare-1", "paddler-spare-2"],
                     interval=0.05, resolver=resolver)


def join(model: FleetModel, name: str, host: str, port: int) -> None:
    """A registration and its first poll: ready with 2 slots."""
    model.add(Backend(name, Address(host, port)), Origin.REGISTERED)
    model.record_poll(name, BackendStatus(State.READY, slots_total=2, slot_source=SlotSource.SLOTS), now=1.0,
                      window=PollWindow(0.0, 0.1))


def fleet() -> tuple[FleetModel, AgentCheckReplies]:
    model = FleetModel([Backend("gpu1", Address("127.0.0.1", 8081))])
    replies = AgentCheckReplies(model)
    model.subscribe(replies.on_member_change)
    return model, replies


async def test_a_registered_member_is_filled_and_its_spare_answered_for_it(haproxy: tuple[FakeHAProxy, str]) -> None:
    fake, path = haproxy
    model, replies = fleet()
    pool = pool_for(path, model, replies, resolved={"gpu7.internal": "10.0.0.7"})
    join(model, "gpu7", "gpu7.internal", 8087)
    answered_meanwhile: list[str | None] = []
    fake.during = lambda: answered_meanwhile.append(replies.reply_for("paddler-spare-1"))
    await pool.reconcile()
    # gpu7's weight must not land before `state ready`: the spare would come UP weighted.
    assert set(answered_meanwhile) == {"up 0% #paddler-agent: empty spare server\n"}
    assert fake.commands == ["set server llama/paddler-spare-1 addr 10.0.0.7 port 8087",
                             "set maxconn server llama/paddler-spare-1 2", "set weight llama/paddler-spare-1 0",
                             "set server llama/paddler-spare-1 state ready"]
    assert replies.answer(Request(name="paddler-spare-1")) == "up 100% maxconn:2 #idle=2 processing=0 via slots\n"
    assert pool.server_of("gpu7") == "paddler-spare-1"
    assert pool.summary() == {"total": 2, "used": 1, "unplaced": [], "waiting_for_other_requests": []}


async def test_an_unresolvable_name_is_reported_and_retried(haproxy: tuple[FakeHAProxy, str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    fake, path = haproxy
    model, replies = fleet()
    resolved: dict[str, str] = {}
    pool = pool_for(path, model, replies, resolved=resolved)
    join(model, "gpu7", "gpu7.internal", 8087)
    with caplog.at_level(logging.WARNING, logger="paddler.agent"):
        await pool.reconcile()
    assert fake.commands == [] and pool.summary()["unplaced"] == ["gpu7"]
    assert "gpu7: cannot resolve gpu7.internal" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="paddler.agent"):
        await pool.reconcile()
    assert caplog.text == ""  # once is enough
    resolved["gpu7.internal"] = "10.0.0.7"
    await pool.reconcile()
    assert fake.commands[0] == "set server llama/paddler-spare-1 addr 10.0.0.7 port 8087"


async def test_refused_commands_and_a_missing_socket_are_logged_never_raised(haproxy: tuple[FakeHAProxy, str],
                                                                            tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    fake, path = haproxy
    fake.refuse = True
    model, replies = fleet()
    join(model, "gpu7", "127.0.0.1", 8087)
    with caplog.at_level(logging.WARNING, logger="paddler.agent"):
        await pool_for(path, model, replies).reconcile()
        await pool_for(str(tmp_path / "missing.sock"), model, replies).reconcile()
    assert ("HAProxy refused 'set server llama/paddler-spare-1 addr 127.0.0.1 port 8087': Permission denied"
            in caplog.text)
    assert "cannot read HAProxy's servers on" in caplog.text


async def test_the_loop_reconciles_at_once_when_a_member_joins(haproxy: tuple[FakeHAProxy, str]) -> None:
    fake, path = haproxy
    model, replies = fleet()
    pool = SparePool(model, replies, RuntimeAPI(path), "llama", ["paddler-spare-1"], interval=3600)
    model.subscribe(pool.on_member_change)
    task = asyncio.create_task(pool.run())
    try:
        async with asyncio.timeout(2):
            while fake.reads == 0:  # the first round, with nothing to do
                await asyncio.sleep(0.01)
            join(model, "gpu7", "127.0.0.1", 8087)
            while "set server llama/paddler-spare-1 state ready" not in fake.commands:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()


async def test_a_failing_round_does_not_end_the_loop(haproxy: tuple[FakeHAProxy, str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    fake, path = haproxy
    model, replies = fleet()
    pool = SparePool(model, replies, RuntimeAPI(path), "llama", ["paddler-spare-1"], interval=0.01)
    rounds = 0
    reconcile = pool.reconcile

    async def flaky() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise RuntimeError("a bug")
        await reconcile()

    pool.reconcile = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(pool.run())
    try:
        async with asyncio.timeout(2):
            while fake.reads == 0:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert "spare servers: reconcile failed" in caplog.text


async def test_spares_show_in_the_snapshot_and_metrics_with_backends_left_without_one(
        haproxy: tuple[FakeHAProxy, str]) -> None:
    _, path = haproxy
    model, replies = fleet()
    pool = pool_for(path, model, replies)
    for port in (8087, 8088, 8089):
        join(model, f"gpu{port}", "127.0.0.1", port)
    await pool.reconcile()
    snapshot = fleet_snapshot(model, replies.reply_for, None, lambda name: True, pool)
    assert {row["name"]: row["spare_server"] for row in snapshot["agents"]} == {
        "gpu1": None, "gpu8087": "paddler-spare-1", "gpu8088": "paddler-spare-2", "gpu8089": None}
    assert snapshot["spare_servers"] == {"total": 2, "used": 2, "unplaced": ["gpu8089"],
                                         "waiting_for_other_requests": []}
    registry = build_registry(FleetCollector(lambda: snapshot, PollCounters(), Counter()))
    assert registry.get_sample_value("paddler_backends_without_haproxy_server") == 1
    assert registry.get_sample_value("paddler_spare_servers_used") == 2


async def test_a_spare_lost_by_a_reload_waits_for_busy_slots_at_most_refill_wait(
        haproxy: tuple[FakeHAProxy, str]) -> None:
    fake, path = haproxy
    model, replies = fleet()
    clock = [1000.0]
    pool = SparePool(model, replies, RuntimeAPI(path), "llama", ["paddler-spare-1"], interval=1.0,
                     clock=lambda: clock[0])
    join(model, "gpu7", "127.0.0.1", 8087)
    await pool.reconcile()
    fake.commands.clear()
    # A reload: the new worker's spare is disabled again, while the old worker's streams keep both slots busy.
    fake.servers["paddler-spare-1"] = ("MAINT", "0.0.0.0:0", 0)
    model.record_poll("gpu7", BackendStatus(State.READY, slots_total=2, slots_processing=2,
                                            slot_source=SlotSource.SLOTS), now=2.0, window=PollWindow(1.0, 1.1))
    await pool.reconcile()
    assert fake.commands == [] and pool.summary()["waiting_for_other_requests"] == ["paddler-spare-1"]
    clock[0] += REFILL_WAIT
    await pool.reconcile()
    assert fake.commands[-1] == "set server llama/paddler-spare-1 state ready"
    assert pool.summary()["waiting_for_other_requests"] == []


@pytest.mark.parametrize(("answer", "failed"), [
    ("\n", False), ("", False),
    ("IP changed from '0.0.0.0' to '127.0.0.1', port changed from '+0' to '8087' by 'stats socket command'\n", False),
    ("no need to change the addr, port\n", False),
    ("No such server.\n", True), ("Permission denied\n", True), ("Invalid addr 'x' by 'stats socket command'\n", True),
])
def test_haproxy_answers_nothing_to_a_set_it_performed(answer: str, failed: bool) -> None:
    assert command_failed(answer) is failed
