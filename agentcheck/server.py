"""The agent process: start-up, serving, shutdown, in that fixed order.

Start-up polls every backend once before the agent-check port opens, so HAProxy never
hears "not polled yet" from a freshly restarted agent. Shutdown stops listening, lets
in-flight checks finish (bounded), then cancels polling and closes the HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Mapping

import aiohttp

from agentcheck.config import AgentSettings
from agentcheck.llamacpp import LlamaCppClient
from agentcheck.monitor import FleetState, Monitor
from agentcheck.policy import invalid_request_reply, unknown_backend_reply
from agentcheck.protocol import AgentCheckProtocol, Request
from fleet import Backend, FleetError

log = logging.getLogger("paddler.agent")

SHUTDOWN_TIMEOUT = 2.0


def resolve_api_keys(backends: tuple[Backend, ...], environ: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """Read ``api_key_env`` variables once, failing loudly at start-up rather than at the first poll."""
    keys = {}
    for backend in backends:
        key = backend.resolve_api_key(environ)
        if backend.api_key_env and not key:
            raise FleetError("environment", f"{backend.name}.api_key_env",
                             f"environment variable {backend.api_key_env} is not set or empty")
        keys[backend.name] = key
    return keys


class Agent:
    def __init__(self, settings: AgentSettings, environ: Mapping[str, str] = os.environ) -> None:
        self.settings = settings
        self.state = FleetState(settings.backends, settings.weight)
        self._api_keys = resolve_api_keys(settings.backends, environ)
        self._session: aiohttp.ClientSession | None = None
        self._server: asyncio.AbstractServer | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._connections: set[AgentCheckProtocol] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    @property
    def port(self) -> int:
        """The agent-check port actually bound (useful when configured as 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def answer(self, request: Request) -> str:
        if request.problem is not None:
            return invalid_request_reply(request.problem)
        name = request.name
        if name is None:
            single = self.settings.single_backend
            if single is None:
                return invalid_request_reply("agent-send must name a backend (this agent watches several)")
            name = single.name
        reply = self.state.reply_for(name)
        return reply if reply is not None else unknown_backend_reply(name)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.poll_timeout),
        )
        client = LlamaCppClient(self._session)
        monitor = Monitor(self.settings.backends, self.state,
                          lambda backend: client.poll(backend, self._api_keys[backend.name]),
                          self.settings.interval, self.settings.poll_timeout)
        await monitor.poll_all()
        self._monitor_task = asyncio.create_task(monitor.run(), name="monitor")
        wait = (self.settings.single_backend_request_wait if self.settings.single_backend
                else self.settings.request_wait)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._track(AgentCheckProtocol(self.answer, wait, on_close=self._untrack)),
            host=self.settings.listen.host, port=self.settings.listen.port,
            reuse_address=True, backlog=1024,
        )
        log.info("agent-check listening on %s:%d for %d backend(s)",
                 self.settings.listen.host, self.port, len(self.settings.backends))

    def _track(self, connection: AgentCheckProtocol) -> AgentCheckProtocol:
        """Remember open connections so shutdown can let them finish their one line."""
        self._connections.add(connection)
        self._all_closed.clear()
        return connection

    def _untrack(self, connection: AgentCheckProtocol) -> None:
        self._connections.discard(connection)
        if not self._connections:
            self._all_closed.set()

    async def serve(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        try:
            await asyncio.wait_for(self._all_closed.wait(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("%d agent-check connection(s) still open at shutdown", len(self._connections))
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            try:
                await self._monitor_task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()
        log.info("agent stopped")
