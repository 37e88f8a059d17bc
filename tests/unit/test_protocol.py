"""agentcheck.protocol: parsing agent-send, and the one-line conversation over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from agentcheck.policy import invalid_request_reply
from agentcheck.protocol import MAX_REQUEST_BYTES, AgentCheckProtocol, Request, parse_request

NOT_TERMINATED = Request(problem="agent-send line not terminated in time")
TOO_LONG = Request(problem="agent-send longer than 256 bytes")

# --- parse_request --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "complete", "expected"),
    [
        pytest.param(b"gpu1\n", True, Request(name="gpu1"), id="name-with-newline"),
        pytest.param(b"gpu1", True, Request(name="gpu1"), id="name-at-eof"),
        pytest.param(b"gpu1\r\n", True, Request(name="gpu1"), id="crlf"),
        pytest.param(b"  gpu-1.a_b \t", True, Request(name="gpu-1.a_b"), id="surrounding-blanks"),
        pytest.param(b"", True, Request(), id="empty"),
        pytest.param(b" \t\r\n", True, Request(), id="whitespace-only"),
        pytest.param(b"", False, Request(), id="nothing-before-deadline"),
        pytest.param(b"a" * (MAX_REQUEST_BYTES + 1), True, TOO_LONG, id="oversized"),
        pytest.param(b"gpu\xc3\xa91", True, Request(problem="agent-send is not ASCII text"), id="non-ascii"),
        pytest.param(b"\xff\xfe\x00", True, Request(problem="agent-send is not ASCII text"), id="binary"),
        pytest.param(b"paddler-spare-3\n", True, Request(name="paddler-spare-3"), id="spare-server"),
        pytest.param(b"gpu1 model=qwen3-8b:Q4_K_M\n", True, Request(name="gpu1", model="qwen3-8b:Q4_K_M"),
                     id="a-model-pool"),
        pytest.param(b"gpu1 model=\n", True, Request(problem="agent-send names no valid model after model="),
                     id="model-key-without-a-model"),
        pytest.param(b"gpu1 model=a b\n", True, Request(problem="agent-send names no valid model after model="),
                     id="two-words-after-model"),
        pytest.param(b"gpu1 model=a#b\n", True, Request(problem="agent-send names no valid model after model="),
                     id="hash-in-model"),
        pytest.param(b"gpu1 alpha\n", True, Request(problem="agent-send is not a valid backend name"),
                     id="model-without-its-key"),
        pytest.param(b"gpu#1", True, Request(problem="agent-send is not a valid backend name"), id="hash-in-name"),
        pytest.param(b"gpu 1", True, Request(problem="agent-send is not a valid backend name"), id="space-in-name"),
        pytest.param(b"gpu1 8080 0 ", True, Request(problem="agent-send is not a valid backend name"),
                     id="several-words"),
        pytest.param(b"gp", False, NOT_TERMINATED, id="incomplete-partial-name"),
    ],
)
def test_parse_request(data: bytes, complete: bool, expected: Request) -> None:
    assert parse_request(data, complete) == expected


def test_request_of_exactly_max_bytes_is_not_refused_for_length() -> None:
    request = parse_request(b" " * (MAX_REQUEST_BYTES - 4) + b"gpu1", True)

    assert request == Request(name="gpu1")


# --- handle_connection over a real loopback socket ------------------------------------------


class Recorder:
    """The answer callback: records each Request and replies with a line that identifies it."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.changed = asyncio.Event()

    def __call__(self, request: Request) -> str:
        self.requests.append(request)
        self.changed.set()
        return self.line_for(request)

    @staticmethod
    def line_for(request: Request) -> str:
        if request.problem is not None:
            return invalid_request_reply(request.problem)
        return f"up ready 100% maxconn:1 #for {request.name or 'no name'}\n"


@contextlib.asynccontextmanager
async def agent_socket(wait: float) -> AsyncIterator[tuple[int, Recorder]]:
    recorder = Recorder()
    server = await asyncio.get_running_loop().create_server(
        lambda: AgentCheckProtocol(recorder, wait), host="127.0.0.1", port=0
    )
    try:
        yield server.sockets[0].getsockname()[1], recorder
    finally:
        server.close()
        await server.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the agent sends before closing; a reset after the reply also counts as closed."""
    data = b""
    try:
        while chunk := await reader.read(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_named_request_gets_its_reply_line_and_the_connection_closes() -> None:
    async with agent_socket(wait=1.0) as (port, recorder), asyncio.timeout(5):
        async with client(port) as (reader, writer):
            writer.write(b"gpu1\n")
            await writer.drain()
            received = await read_until_closed(reader)

    assert recorder.requests == [Request(name="gpu1")]
    assert received == b"up ready 100% maxconn:1 #for gpu1\n"


async def test_silent_client_gets_the_no_name_reply_after_the_wait() -> None:
    wait = 0.1
    async with agent_socket(wait=wait) as (port, recorder), asyncio.timeout(5):
        async with client(port) as (reader, _writer):
            loop = asyncio.get_running_loop()
            started = loop.time()
            received = await read_until_closed(reader)  # the client keeps its side open
            elapsed = loop.time() - started

    assert recorder.requests == [Request()]
    assert received == b"up ready 100% maxconn:1 #for no name\n"
    assert elapsed >= wait * 0.9


async def test_client_that_stalls_mid_name_gets_a_problem_reply() -> None:
    async with agent_socket(wait=0.1) as (port, recorder), asyncio.timeout(5):
        async with client(port) as (reader, writer):
            writer.write(b"gp")
            await writer.drain()
            received = await read_until_closed(reader)

    assert recorder.requests == [NOT_TERMINATED]
    assert received == b"down #paddler-agent: agent-send line not terminated in time\n"


async def test_oversized_request_gets_a_problem_reply_and_the_connection_is_closed() -> None:
    async with agent_socket(wait=1.0) as (port, recorder), asyncio.timeout(5):
        async with client(port) as (reader, writer):
            writer.write(b"a" * 10_240)
            await writer.drain()
            line = await reader.readline()
            rest = await read_until_closed(reader)

    assert recorder.requests == [TOO_LONG]
    assert line == b"down #paddler-agent: agent-send longer than 256 bytes\n"
    assert rest == b""


async def test_client_that_closes_at_once_does_not_stop_the_server() -> None:
    async with agent_socket(wait=1.0) as (port, recorder), asyncio.timeout(5):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
        await recorder.changed.wait()  # the first connection has been handled (answered into the void)

        async with client(port) as (reader, writer):
            writer.write(b"gpu2\n")
            await writer.drain()
            received = await read_until_closed(reader)

    assert recorder.requests[-1] == Request(name="gpu2")
    assert received == b"up ready 100% maxconn:1 #for gpu2\n"


async def test_many_concurrent_clients_are_each_answered() -> None:
    async def ask(port: int, name: str) -> bytes:
        async with client(port) as (reader, writer):
            writer.write(name.encode() + b"\n")
            await writer.drain()
            return await read_until_closed(reader)

    async with agent_socket(wait=1.0) as (port, _recorder), asyncio.timeout(10):
        names = [f"gpu{index}" for index in range(50)]
        replies = await asyncio.gather(*(ask(port, name) for name in names))

    assert replies == [f"up ready 100% maxconn:1 #for gpu{index}\n".encode() for index in range(50)]
