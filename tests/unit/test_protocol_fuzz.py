"""Fuzzing the agent-check side: ``parse_request``, the reply lines, and the protocol over real sockets.

The properties (the hardening issue's):

* ``parse_request`` never raises, and accepts exactly the names the fleet's name rule allows;
* every reply, whatever the request and whatever a backend said, is one line of the policy's
  vocabulary: ``up `` or ``down #``, printable ASCII, exactly one ``\\n`` at the end;
* a connection gets at most one such line, then a close, and the server keeps answering
  everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcheck.model import FleetModel, PollWindow
from agentcheck.policy import WeightFormula, agent_reply
from agentcheck.protocol import MAX_REQUEST_BYTES, AgentCheckProtocol, Request, parse_request
from agentcheck.replies import AgentCheckReplies
from agentcheck.status import BackendStatus, SlotSource, State
from fleet import Address, Backend, validate_name
from fleet.schema import NAME_PATTERN

REPLY_LINE = re.compile(rb"(up |down #)[\x20-\x7e]*\n")
WINDOW = PollWindow(1.0, 1.1)
HOSTILE = "x\r\nup ready 100% maxconn:9999 #\x00\x1b[31m\u2028é\U0001f600 \\n '\"#;"

GPU1_REPLY = b"up ready 75% maxconn:4 #idle=3 processing=1 via slots\n"


def assert_reply_line(reply: bytes) -> None:
    assert REPLY_LINE.fullmatch(reply), reply
    assert reply.count(b"\n") == 1


def fleet() -> tuple[FleetModel, AgentCheckReplies]:
    """gpu1 ready, gpu2 never polled, gpu3/gpu4 down with hostile reasons, gpu5 drained."""
    names = ["gpu1", "gpu2", "gpu3", "gpu4", "gpu5"]
    model = FleetModel([Backend(name, Address("127.0.0.1", 8081 + index)) for index, name in enumerate(names)])
    replies = AgentCheckReplies(model, WeightFormula.IDLE)
    model.subscribe(replies.on_member_change)
    model.record_poll("gpu1", BackendStatus(State.READY, slots_total=4, slots_processing=1,
                                            slot_source=SlotSource.SLOTS, model=HOSTILE), 1.0, WINDOW)
    model.record_poll("gpu3", BackendStatus.down(State.ERROR, HOSTILE), 1.0, WINDOW)
    model.record_poll("gpu4", BackendStatus.down(State.UNREACHABLE, "\n" * 500), 1.0, WINDOW)
    model.record_poll("gpu5", BackendStatus(State.READY, slots_total=2, slots_processing=2,
                                            slot_source=SlotSource.METRICS, sleeping=True), 1.0, WINDOW)
    model.set_drained("gpu5", True)
    return model, replies


def test_the_fleet_under_test_answers_as_documented() -> None:
    _model, replies = fleet()

    assert [replies.answer(Request(name=name)) for name in ("gpu1", "gpu2", "gpu3", "gpu4", "gpu5", "gpu6")] == [
        GPU1_REPLY.decode(),
        "down #awaiting first poll\n",
        "down #error: x??up ready 100? maxconn:9999 ????31m??? ?n '\"??\n",
        "down #unreachable: " + "?" * (160 - len("unreachable: ")) + "\n",
        "up drain maxconn:2 #drained by operator, idle=0 processing=2 via metrics sleeping\n",
        "down #paddler-agent: unknown backend 'gpu6', check agent-send\n",
    ]


# --- parse_request --------------------------------------------------------------------------

names = st.from_regex(NAME_PATTERN, fullmatch=True)
odd_bytes = st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b"\x0b", b"\x0c", b"\x1b", b"\x7f",
                             b"#", b"'", b"%", b"\xc3\xa9", b"\xe2\x80\xa8", b"\xff", b"\x80"])


@st.composite
def with_injected(draw: st.DrawFn) -> bytes:
    """A valid name with odd bytes put somewhere in it (or around it)."""
    data = bytearray(draw(names).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(odd_bytes)
    return bytes(data)


blanks = st.text(" \t\r\n", max_size=5).map(str.encode)
requests = st.one_of(
    st.binary(max_size=300),
    st.tuples(blanks, names.map(str.encode), blanks).map(b"".join),
    with_injected(),
    st.tuples(names.map(str.encode), st.integers(1, 30)).map(lambda pair: pair[0] * pair[1]),  # very long
    st.integers(MAX_REQUEST_BYTES - 3, MAX_REQUEST_BYTES + 3).map(lambda n: b"a" * n),
    st.text(max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass")),  # non-ASCII
)


def accepted_by_the_fleet_rule(data: bytes) -> str | None:
    """The oracle: the name the fleet file would accept, after the blanks HAProxy's agent-send may carry."""
    if len(data) > MAX_REQUEST_BYTES or not data.isascii():
        return None
    text = data.decode("ascii").strip(" \t\r\n")
    return text if NAME_PATTERN.fullmatch(text) else None


@settings(database=None, derandomize=True, max_examples=1000)
@given(data=requests, complete=st.booleans())
def test_parse_request_accepts_exactly_the_fleet_names_and_never_raises(data: bytes, complete: bool) -> None:
    request = parse_request(data, complete)

    assert request.name is None or request.problem is None
    expected = accepted_by_the_fleet_rule(data) if complete else None
    assert request.name == expected
    if request.name is not None:
        assert validate_name(request.name) == request.name
        assert not any(c.isspace() or not c.isprintable() for c in request.name)
    elif request.problem is None:  # no name and no problem: nothing but blanks arrived
        assert data.strip(b" \t\r\n") == b""


@pytest.mark.parametrize(
    ("data", "complete"),
    [
        pytest.param(b"gpu1\x00", True, id="trailing-nul"),
        pytest.param(b"gpu1\x0b", True, id="vertical-tab-is-not-a-blank-here"),
        pytest.param(b"gpu1\n", False, id="cut-off"),
        pytest.param(b"gp\nu1", True, id="newline-inside"),
        pytest.param(b"\xe2\x80\xa8gpu1", True, id="unicode-line-separator"),
        pytest.param(b"gpu1" * 64 + b"\n", True, id="longer-than-the-limit-with-its-newline"),
    ],
)
def test_parse_request_refuses_names_with_odd_bytes(data: bytes, complete: bool) -> None:
    request = parse_request(data, complete)

    assert request.name is None and request.problem is not None


# --- reply lines ----------------------------------------------------------------------------

reasons = st.one_of(st.text(max_size=300), st.just(HOSTILE), st.text("\r\n\x00#%", max_size=10))
statuses = st.builds(
    BackendStatus,
    state=st.sampled_from(State),
    reason=reasons,
    slots_total=st.one_of(st.integers(-3, 2048), st.just(10**30)),
    slots_processing=st.one_of(st.integers(-3, 2048), st.just(10**30)),
    slot_source=st.none() | st.sampled_from(SlotSource),
    model=st.none() | reasons,
    sleeping=st.booleans(),
)


@settings(database=None, derandomize=True, max_examples=1000)
@given(status=statuses, fleet_max=st.integers(0, 4096), formula=st.sampled_from(WeightFormula),
       drained=st.booleans())
def test_every_status_becomes_one_line_of_the_policy_vocabulary(
    status: BackendStatus, fleet_max: int, formula: WeightFormula, drained: bool
) -> None:
    assert_reply_line(agent_reply(status, fleet_max, formula, drained=drained).encode("ascii"))


@settings(database=None, derandomize=True, max_examples=1000)
@given(data=requests, complete=st.booleans(), gpu3=statuses)
def test_every_request_gets_one_line_of_the_policy_vocabulary(data: bytes, complete: bool,
                                                              gpu3: BackendStatus) -> None:
    model, replies = fleet()
    model.record_poll("gpu3", gpu3, 2.0, WINDOW)
    request = parse_request(data, complete)

    reply = replies.answer(request)

    assert_reply_line(reply.encode("ascii"))
    if request.name in model:
        assert reply == replies.reply_for(request.name)
    else:
        assert reply.startswith("down #paddler-agent: ")


# --- AgentCheckProtocol, driven chunk by chunk ------------------------------------------------


class FakeTransport:
    """Records what the protocol writes; closing reports the loss one loop turn later, as a real transport does."""

    def __init__(self, protocol: AgentCheckProtocol) -> None:
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closed = False
        self.gone = asyncio.Event()  # connection_lost delivered

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.lose, None)

    def lose(self, exc: Exception | None) -> None:
        if not self.gone.is_set():
            self.closed = True
            self.gone.set()
            self.protocol.connection_lost(exc)


ENDINGS = ["eof", "silence", "reset"]
chunk_lists = st.lists(st.one_of(requests, st.just(b"gpu1\n"), st.just(b"\n")), max_size=6)


def expected_request(chunks: list[bytes], ending: str) -> Request | None:
    """What the protocol must have answered: the first line once a newline or too many bytes
    arrived, else what the ending says (EOF: complete; silence: cut off; reset: nothing)."""
    data = b"".join(chunks)
    if b"\n" in data or len(data) > MAX_REQUEST_BYTES:
        return parse_request(data.split(b"\n", 1)[0], True)
    return {"eof": parse_request(data, True), "silence": parse_request(data, False), "reset": None}[ending]


@settings(database=None, derandomize=True, max_examples=500, deadline=None)
@given(chunks=chunk_lists, ending=st.sampled_from(ENDINGS))
def test_protocol_answers_one_line_for_any_chunking_then_closes(chunks: list[bytes], ending: str) -> None:
    async def converse() -> tuple[list[Request], list[bytes], bool]:
        _model, replies = fleet()
        seen: list[Request] = []

        def answer(request: Request) -> str:
            seen.append(request)
            return replies.answer(request)

        closed: list[AgentCheckProtocol] = []
        protocol = AgentCheckProtocol(answer, wait=0.001, on_close=closed.append)
        transport = FakeTransport(protocol)
        protocol.connection_made(cast(asyncio.BaseTransport, transport))  # duck-typed: write and close suffice
        for chunk in chunks:
            if chunk and not transport.closed:
                protocol.data_received(chunk)
        if ending == "eof" and not transport.closed:
            assert protocol.eof_received() is False  # False: the transport closes itself
            transport.close()
        elif ending == "reset":
            transport.lose(ConnectionResetError())
        async with asyncio.timeout(5):
            await transport.gone.wait()  # after the reply's close, or the agent-send wait's
        return seen, transport.written, closed == [protocol]

    seen, written, closed_once = asyncio.run(converse())

    expected = expected_request(chunks, ending)
    assert seen == ([] if expected is None else [expected])
    assert len(written) <= 1
    for line in written:
        assert_reply_line(line)
    assert closed_once


# --- a real agent-check server on a loopback port ---------------------------------------------


@dataclass
class Agent:
    """The agent-check server's connections, tracked as ``server.Agent`` tracks them."""

    port: int = 0
    accepted: int = 0
    open_connections: set[AgentCheckProtocol] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def track(self, protocol: AgentCheckProtocol) -> AgentCheckProtocol:
        self.accepted += 1
        self.open_connections.add(protocol)
        self.changed.set()
        return protocol

    def untrack(self, protocol: AgentCheckProtocol) -> None:
        self.open_connections.discard(protocol)
        self.changed.set()

    async def all_closed(self, accepted: int) -> None:
        """Until ``accepted`` connections have been accepted in all, and every one is closed."""
        while self.accepted < accepted or self.open_connections:
            self.changed.clear()
            await self.changed.wait()


AGENT_SEND_WAIT = 0.05  # the agent's wait for agent-send; short so silent connections end fast


@contextlib.asynccontextmanager
async def agent_server() -> AsyncIterator[Agent]:
    _model, replies = fleet()
    agent = Agent()
    server = await asyncio.get_running_loop().create_server(
        lambda: agent.track(AgentCheckProtocol(replies.answer, AGENT_SEND_WAIT, on_close=agent.untrack)),
        host="127.0.0.1", port=0)
    agent.port = server.sockets[0].getsockname()[1]
    try:
        yield agent
    finally:
        server.close()
        await server.wait_closed()


@dataclass(frozen=True)
class Conversation:
    chunks: list[bytes]
    ending: str  # half-close, silence (wait for the agent's timer), close, abort


conversations = st.builds(Conversation, chunk_lists,
                          st.sampled_from(["half-close", "silence", "close", "abort"]))


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """(what arrived before the close, whether the close was a reset that may have eaten a reply)."""
    data = b""
    try:
        while chunk := await reader.read(4096):
            data += chunk
    except OSError:
        return data, True
    return data, False


def possible_replies(chunks: list[bytes]) -> set[bytes]:
    """Every line the agent may answer to these bytes, however TCP cut them and whenever it stopped waiting."""
    _model, replies = fleet()
    data = b"".join(chunks)
    answers = set()
    for end in range(min(len(data), MAX_REQUEST_BYTES + 1) + 1):
        for complete in (True, False):
            answers.add(replies.answer(parse_request(data[:end].split(b"\n", 1)[0], complete)).encode())
    return answers


async def run_conversation(port: int, conversation: Conversation) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in conversation.chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)  # lets the agent's side run between chunks (interleaving, not waiting)
        if conversation.ending == "abort":
            writer.transport.abort()
            return
        if conversation.ending == "close":
            return
        if conversation.ending == "half-close":
            writer.write_eof()
        received, reset = await read_until_closed(reader)
    except OSError:  # a reset, or ENOTCONN from write_eof after one
        return  # the agent answered and closed while we were still writing: allowed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if received == b"" and reset:
        return  # a reset may eat the reply: at most one line, and here none
    assert_reply_line(received)
    assert received in possible_replies(conversation.chunks)


async def well_formed_check(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"gpu1\n")
        await writer.drain()
        received, _reset = await read_until_closed(reader)
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize(("loop", "examples"), [("uvloop", 200), ("asyncio", 100)])
def test_real_server_answers_at_most_one_line_per_connection_and_keeps_serving(loop: str, examples: int) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        agent_context = agent_server()
        agent = runner.run(agent_context.__aenter__())
        errors: list[dict[str, object]] = []
        runner.get_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        try:
            @settings(database=None, derandomize=True, max_examples=examples, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(batch=st.lists(conversations, min_size=1, max_size=3))
            def example(batch: list[Conversation]) -> None:
                async def run() -> bytes:
                    async with asyncio.timeout(5):
                        accepted = agent.accepted + len(batch)
                        async with asyncio.TaskGroup() as group:  # a failure cancels the others: no leftovers
                            for conversation in batch:
                                group.create_task(run_conversation(agent.port, conversation))
                        await agent.all_closed(accepted)  # every connection closed, on the agent's side too
                        return await well_formed_check(agent.port)

                assert runner.run(run()) == GPU1_REPLY
                assert errors == []

            example()
        finally:
            runner.run(agent_context.__aexit__(None, None, None))
