"""Fault-injection llama.cpp stand-ins: what a real llama-server cannot be made to do on demand.

Each stand-in is used only where a real llama-server cannot show the case: hang, trickle,
reset the connection, cut a response short, send an endless or oversized body, answer 500
with an HTML page or invalid JSON, sit behind an authenticating proxy that refuses even
``/health`` (llama-server's own ``/health`` is public), answer valid JSON of the wrong shape,
serve a slow or hanging ``/props`` next to a fine ``/slots``, or stay loading (a real server
loads the tiny test model too fast to be caught at it). What a real server does show, such
as a missing API key, is tested against a real one.

They run on their own event loop in a background thread, so the agent under test can be
the real ``paddler-agent`` process and the test itself stays plain synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agentcheck.llamacpp import MAX_BODY_BYTES
from devstack.processes import free_port

HOLD_FOREVER = 3600.0
TWO_IDLE_SLOTS = [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}]
TRICKLE_PAUSE = 0.05  # per byte: the 70-byte /slots body takes 3.5 s, far past any poll timeout
SLOW_PROPS_SECONDS = 0.9  # past the poll timeout (0.4 s) of an agent polling every 0.5 s

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def llama_like(health: Handler | None = None, slots: Handler | None = None,
               props: Handler | None = None) -> web.Application:
    """A llama.cpp look-alike whose /health, /slots and /props can be swapped for faulty handlers."""
    app = web.Application()
    app.router.add_get("/health", health or ok_health)
    app.router.add_get("/slots", slots or ok_slots)
    app.router.add_get("/props", props or ok_props)
    return app


async def ok_health(_: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def ok_slots(_: web.Request) -> web.StreamResponse:
    return json_response(TWO_IDLE_SLOTS)


async def ok_props(_: web.Request) -> web.StreamResponse:
    return json_response({"total_slots": 2, "model_path": "/models/stub.gguf", "is_sleeping": False})


async def loading_health(_: web.Request) -> web.StreamResponse:
    return json_response({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 503)


async def malformed_slots(_: web.Request) -> web.StreamResponse:
    return web.Response(text='[{"id": 0, "is_processing": fal', content_type="application/json")


async def hanging(_: web.Request) -> web.StreamResponse:
    await asyncio.sleep(HOLD_FOREVER)
    raise AssertionError("unreachable")


async def slow_props(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(SLOW_PROPS_SECONDS)
    return await ok_props(request)


async def trickling_slots(request: web.Request) -> web.StreamResponse:
    """A correct /slots answer, one byte at a time."""
    body = json.dumps(TWO_IDLE_SLOTS).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    try:
        for index in range(len(body)):
            await response.write(body[index:index + 1])
            await asyncio.sleep(TRICKLE_PAUSE)
    except ConnectionError:  # the agent gave up: the point of this stand-in
        pass
    return response


async def endless_chunked_slots(request: web.Request) -> web.StreamResponse:
    """A chunked /slots that never ends: 256 KiB chunks until the agent hangs up."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = b"[" + b" " * (256 * 1024 - 1)
    try:
        while True:
            await response.write(chunk)
    except ConnectionError:
        pass
    return response


async def oversized_slots(request: web.Request) -> web.StreamResponse:
    """A /slots whose Content-Length is one byte more than the agent accepts."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = MAX_BODY_BYTES + 1
    await response.prepare(request)
    try:
        await response.write(b" " * (MAX_BODY_BYTES + 1))
    except ConnectionError:
        pass
    return response


async def html_500(_: web.Request) -> web.StreamResponse:
    return web.Response(status=500, content_type="text/html",
                        text="<html><head><title>500 Internal Server Error</title></head>"
                             "<body><h1>Internal Server Error</h1></body></html>")


async def proxy_401(_: web.Request) -> web.StreamResponse:
    """An authenticating proxy in front of llama-server: every path, /health included, wants a key."""
    return web.Response(status=401, text="401 Authorization Required", headers={"WWW-Authenticate": "Basic"})


async def slots_as_object(_: web.Request) -> web.StreamResponse:
    return json_response({"slots": TWO_IDLE_SLOTS})


async def slots_with_odd_fields(_: web.Request) -> web.StreamResponse:
    """String ids and negative n_ctx: fields the agent does not read, around is_processing it does."""
    return json_response([{"id": "a", "n_ctx": -4096, "is_processing": True},
                          {"id": "b", "n_ctx": -1, "is_processing": False}])


async def slots_with_string_is_processing(_: web.Request) -> web.StreamResponse:
    return json_response([{"id": 0, "is_processing": "false"}, {"id": 1, "is_processing": "false"}])


async def _cut_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Promise a 200 body, send part of it, then drop the connection."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sta")
    await writer.drain()
    writer.close()


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, then reset the connection (SO_LINGER 0 makes close send RST, not FIN)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class BackgroundServers:
    """Runs any number of stub servers on one loop in a daemon thread; stops them all on exit."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._cleanups: list[Callable[[], Awaitable[None]]] = []

    def __enter__(self) -> BackgroundServers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        async def cleanup() -> None:
            for close in reversed(self._cleanups):
                await close()
            # Connections still held (hanging handlers, relays): end them before the loop closes.
            held = asyncio.all_tasks() - {asyncio.current_task()}
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def _run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def http(self, app: web.Application) -> str:
        """Serve an aiohttp app on a free loopback port; returns host:port."""
        port = free_port()

        async def start() -> None:
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._cleanups.append(runner.cleanup)

        self._run(start())
        return f"127.0.0.1:{port}"

    def raw(self, handle: RawHandler) -> str:
        """Serve each connection with ``handle`` on raw streams, for what aiohttp will not send."""
        port = free_port()

        async def start() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", port)

            async def close() -> None:
                server.close()

            self._cleanups.append(close)

        self._run(start())
        return f"127.0.0.1:{port}"

    def cut_mid_response(self) -> str:
        return self.raw(_cut_mid_response)

    def reset(self) -> str:
        return self.raw(_reset)

    def relay(self, target: str) -> str:
        """A second address for one server: each connection is forwarded to target as is."""
        host, target_port = target.rsplit(":", 1)

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target_port))
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

        return self.raw(forward)
