"""The polling HTTP client against a real aiohttp server, and raw sockets for what aiohttp won't send."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine

import pytest
import uvloop
from aiohttp import web

from agentcheck.http_client import HttpClient, HttpError, Response
from agentcheck.llamacpp import LlamaCppClient
from agentcheck.status import SlotSource, State
from fleet import Address, Backend


class Seen:
    """What the test server saw: request paths and the client ports they came from."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.peers: list[int] = []
        self.headers: list[dict[str, str]] = []

    @property
    def connections(self) -> int:
        return len(set(self.peers))


@contextlib.asynccontextmanager
async def aiohttp_server(routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]
                         ) -> AsyncIterator[tuple[int, Seen]]:
    seen = Seen()

    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        seen.paths.append(request.path)
        assert request.transport is not None
        seen.peers.append(request.transport.get_extra_info("peername")[1])
        seen.headers.append(dict(request.headers))
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, seen
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(answer: Callable[[int, bytes], bytes | None],
                     keep_open: bool = False) -> AsyncIterator[tuple[int, list[int]]]:
    """Answers the n-th request on a connection (0-based) with ``answer(n, head)``, then closes
    unless ``keep_open``; an answer of None closes without a word."""
    connections: list[int] = []
    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername")[1])
        try:
            for n in range(100):
                head = await reader.readuntil(b"\r\n\r\n")
                reply = answer(n, head)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if not keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.create_task(handle(reader, writer)))

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(5):  # the client has closed its side: every handler ends
            await asyncio.gather(*handlers)


@contextlib.asynccontextmanager
async def http_client(timeout: float = 5.0, max_body: int = 1024) -> AsyncIterator[HttpClient]:
    client = HttpClient(timeout=timeout, max_body=max_body)
    try:
        yield client
    finally:
        await client.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status)


async def test_content_length_bodies_on_one_kept_alive_connection() -> None:
    async def slots(request: web.Request) -> web.Response:
        return web.Response(body=b'[{"id":0}]', content_type="application/json")

    async with aiohttp_server({"/slots": slots}) as (port, seen), http_client() as client:
        answers = [await client.get("127.0.0.1", port, "/slots") for _ in range(3)]

    assert answers == [Response(200, b'[{"id":0}]')] * 3
    assert seen.paths == ["/slots"] * 3
    assert seen.connections == 1


async def test_headers_are_sent() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with aiohttp_server({"/x": ok}) as (port, seen), http_client() as client:
        await client.get("127.0.0.1", port, "/x", {"Authorization": "Bearer k"})

    assert seen.headers[0]["Authorization"] == "Bearer k"
    assert seen.headers[0]["Host"] == f"127.0.0.1:{port}"


async def test_chunked_body_is_reassembled() -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"[", b'{"id":0}', b",", b'{"id":1}', b"]"):
            await response.write(part)
        await response.write_eof()
        return response

    async with aiohttp_server({"/slots": chunked}) as (port, seen), http_client() as client:
        first = await client.get("127.0.0.1", port, "/slots")
        second = await client.get("127.0.0.1", port, "/slots")

    assert first == second == Response(200, b'[{"id":0},{"id":1}]')
    assert seen.connections == 1


async def test_connection_close_from_the_server_means_a_new_connection_next_time() -> None:
    async def closing(request: web.Request) -> web.Response:
        response = web.Response(text="bye")
        response.force_close()
        return response

    async with aiohttp_server({"/x": closing}) as (port, seen), http_client() as client:
        answers = [await client.get("127.0.0.1", port, "/x") for _ in range(2)]

    assert answers == [Response(200, b"bye")] * 2
    assert seen.connections == 2


async def test_error_statuses_are_answers_not_failures() -> None:
    async def missing(request: web.Request) -> web.Response:
        return await text("nope", 404)

    async with aiohttp_server({"/x": missing}) as (port, _), http_client() as client:
        assert await client.get("127.0.0.1", port, "/x") == Response(404, b"nope")
        assert await client.get("127.0.0.1", port, "/elsewhere") == Response(404, b"404: Not Found")


async def test_oversized_bodies_are_refused() -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 2000)

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"y" * 100)
        await response.write_eof()
        return response

    async with aiohttp_server({"/big": big, "/chunked": big_chunked}) as (port, _), \
            http_client(max_body=1024) as client:
        assert await client.get("127.0.0.1", port, "/big") == HttpError("response larger than 1024 bytes")
        assert await client.get("127.0.0.1", port, "/chunked") == HttpError("response larger than 1024 bytes")


async def test_a_server_that_never_answers_times_out_and_the_next_request_still_works() -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with aiohttp_server({"/hang": hang, "/ok": ok}) as (port, seen), http_client(timeout=0.2) as client:
        assert await client.get("127.0.0.1", port, "/hang") == HttpError("no answer within 0.2s")
        assert await client.get("127.0.0.1", port, "/ok") == Response(200, b"ok")
        release.set()
    assert seen.connections == 2  # the timed-out connection was not reused


async def test_refused_connection_is_a_connect_failure() -> None:
    async with http_client() as client:
        answer = await client.get("127.0.0.1", closed_port(), "/slots")
    assert isinstance(answer, HttpError)
    assert answer.connect
    assert answer.reason.startswith("connection failed (")


async def test_connection_cut_mid_body() -> None:
    async with raw_server(lambda n, head: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789") as (port, _), \
            http_client() as client:
        assert await client.get("127.0.0.1", port, "/x") == HttpError("connection closed mid-response")


async def test_connection_cut_mid_chunked_body() -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwor"
    async with raw_server(lambda n, head: reply) as (port, _), http_client() as client:
        assert await client.get("127.0.0.1", port, "/x") == HttpError("connection closed mid-response")


async def test_stale_kept_alive_connection_is_retried_once_on_a_new_one() -> None:
    """The server keeps the connection after the first answer but closes it on the next request."""
    def answer(n: int, head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if n == 0 else None

    async with raw_server(answer, keep_open=True) as (port, connections), http_client() as client:
        assert await client.get("127.0.0.1", port, "/x") == Response(200, b"ok")
        assert await client.get("127.0.0.1", port, "/x") == Response(200, b"ok")
    assert len(connections) == 2


async def test_body_delimited_by_the_end_of_the_connection() -> None:
    async with raw_server(lambda n, head: b"HTTP/1.0 200 OK\r\n\r\nuntil close") as (port, connections), \
            http_client() as client:
        first = await client.get("127.0.0.1", port, "/x")
        second = await client.get("127.0.0.1", port, "/x")
    assert first == second == Response(200, b"until close")
    assert len(connections) == 2


async def test_informational_response_is_skipped_and_204_has_no_body() -> None:
    def answer(n: int, head: bytes) -> bytes:
        if n == 0:
            return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    async with raw_server(answer, keep_open=True) as (port, connections), http_client() as client:
        assert await client.get("127.0.0.1", port, "/x") == Response(200, b"a")
        assert await client.get("127.0.0.1", port, "/x") == Response(204, b"")
    assert len(connections) == 1


async def test_garbage_is_an_invalid_response() -> None:
    cases = [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    ]
    for reply in cases:
        async with raw_server(lambda n, head, reply=reply: reply) as (port, _), http_client() as client:
            answer = await client.get("127.0.0.1", port, "/x")
        assert isinstance(answer, HttpError) and answer.reason.startswith("invalid HTTP response ("), (reply, answer)


async def test_endless_header_section_is_refused() -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 70_000
    async with raw_server(lambda n, head: reply) as (port, _), http_client() as client:
        too_large = HttpError("invalid HTTP response (header section too large)")
        assert await client.get("127.0.0.1", port, "/x") == too_large


async def test_header_values_cannot_inject_lines() -> None:
    async with http_client() as client:
        answer = await client.get("127.0.0.1", closed_port(), "/x", {"Authorization": "Bearer a\r\nX-Evil: 1"})
    assert answer == HttpError("header Authorization contains a line break")


async def test_concurrent_requests_to_one_host_each_get_their_own_answer() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.query_string)

    async with aiohttp_server({"/e": echo}) as (port, _), http_client() as client:
        answers = await asyncio.gather(*(client.get("127.0.0.1", port, f"/e?{i}") for i in range(10)))
    assert answers == [Response(200, str(i).encode()) for i in range(10)]


# LlamaCppClient over this client


def backend(port: int, slots: int | None = None) -> Backend:
    return Backend(name="gpu1", address=Address("127.0.0.1", port), slots=slots)


async def test_healthy_server_costs_one_slots_request_per_poll_and_props_now_and_then() -> None:
    async def slots(request: web.Request) -> web.Response:
        return web.json_response([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}])

    async def props(request: web.Request) -> web.Response:
        return web.json_response({"total_slots": 2, "model_alias": "tiny"})

    client = LlamaCppClient(timeout=5.0)
    try:
        async with aiohttp_server({"/slots": slots, "/props": props}) as (port, seen):
            statuses = [await client.poll(backend(port), "key") for _ in range(31)]  # /props again after 30
    finally:
        await client.close()

    assert {s.state for s in statuses} == {State.READY}
    assert statuses[0].slots_total == 2 and statuses[0].slots_processing == 1
    assert statuses[0].slot_source is SlotSource.SLOTS and statuses[0].model == "tiny"
    assert seen.paths.count("/slots") == 31
    assert seen.paths.count("/props") == 2
    assert "/health" not in seen.paths
    assert seen.connections == 1
    assert {h["Authorization"] for h in seen.headers} == {"Bearer key"}


async def test_unreachable_backend_costs_one_connection_attempt() -> None:
    client = LlamaCppClient(timeout=5.0)
    try:
        status = await client.poll(backend(closed_port()), None)
    finally:
        await client.close()
    assert status.state is State.UNREACHABLE
    assert status.reason.startswith("connection failed (")


async def test_loading_server_asks_health_to_say_why() -> None:
    async def loading(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)

    client = LlamaCppClient(timeout=5.0)
    try:
        async with aiohttp_server({"/slots": loading, "/health": loading, "/props": loading}) as (port, seen):
            status = await client.poll(backend(port), None)
    finally:
        await client.close()
    assert status.state is State.LOADING
    assert "/health" in seen.paths


# Every test above runs on both loops: the agent runs on uvloop, whose transports differ in
# small ways (they do not subclass asyncio.Transport, for one).

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _on_both_loops(test: Callable[[], Coroutine[None, None, None]]) -> Callable[[str], None]:
    @pytest.mark.parametrize("loop", list(LOOPS))
    def run(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(test())

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


for _name, _test in list(globals().items()):
    if _name.startswith("test_") and inspect.iscoroutinefunction(_test):
        globals()[_name] = _on_both_loops(_test)
