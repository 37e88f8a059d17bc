"""Tiny misbehaving HTTP servers: the llama.cpp failures a real server rarely shows on demand.

They run on their own event loop in a background thread, so the agent under test can be
the real ``paddler-agent`` process and the test itself stays plain synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from devstack.processes import free_port

HOLD_FOREVER = 3600.0
TWO_IDLE_SLOTS = [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def llama_like(health: Callable[[], Awaitable[web.StreamResponse]] | None = None,
               slots: Callable[[], Awaitable[web.StreamResponse]] | None = None) -> web.Application:
    """A llama.cpp look-alike whose /health and /slots can be swapped for faulty handlers."""

    async def ok_health() -> web.StreamResponse:
        return json_response({"status": "ok"})

    async def ok_slots() -> web.StreamResponse:
        return json_response(TWO_IDLE_SLOTS)

    def route(handler: Callable[[], Awaitable[web.StreamResponse]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(_: web.Request) -> web.StreamResponse:
            return await handler()
        return handle

    app = web.Application()
    app.router.add_get("/health", route(health or ok_health))
    app.router.add_get("/slots", route(slots or ok_slots))
    app.router.add_get("/props", route(ok_props))
    return app


async def ok_props() -> web.StreamResponse:
    return json_response({"total_slots": 2, "model_path": "/models/stub.gguf", "is_sleeping": False})


async def loading_health() -> web.StreamResponse:
    return json_response({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 503)


async def malformed_slots() -> web.StreamResponse:
    return web.Response(text='[{"id": 0, "is_processing": fal', content_type="application/json")


async def hanging() -> web.StreamResponse:
    await asyncio.sleep(HOLD_FOREVER)
    raise AssertionError("unreachable")


async def _cut_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Promise a 200 body, send part of it, then drop the connection."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sta")
    await writer.drain()
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

    def cut_mid_response(self) -> str:
        port = free_port()

        async def start() -> None:
            server = await asyncio.start_server(_cut_mid_response, "127.0.0.1", port)

            async def close() -> None:
                server.close()

            self._cleanups.append(close)

        self._run(start())
        return f"127.0.0.1:{port}"

    def relay(self, target: str) -> str:
        """A second address for one server: each connection is forwarded to target as is."""
        port = free_port()
        host, target_port = target.rsplit(":", 1)

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target_port))
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

        async def start() -> None:
            server = await asyncio.start_server(forward, "127.0.0.1", port)

            async def close() -> None:
                server.close()

            self._cleanups.append(close)

        self._run(start())
        return f"127.0.0.1:{port}"
