"""The agent process: start-up, serving, shutdown, in that fixed order.

Start-up polls every backend once before any port opens, so HAProxy never hears "not
polled yet" from a freshly restarted agent. Shutdown stops listening for agent-checks,
lets in-flight checks finish (bounded), stops the management server, then cancels the
background tasks and closes the HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any, Coroutine, Mapping

import aiohttp
from aiohttp import web

from agentcheck.config import AgentSettings
from agentcheck.llamacpp import LlamaCppClient
from agentcheck.management import create_app
from agentcheck.metrics import FleetCollector, build_registry
from agentcheck.monitor import FleetState, Monitor
from agentcheck.picker import Picker
from agentcheck.policy import invalid_request_reply, unknown_backend_reply
from agentcheck.protocol import AgentCheckProtocol, Request
from agentcheck.reporting import StatsdReporter, probe_balancer_forever
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
        self.checks_served: Counter[str] = Counter()
        self._api_keys = resolve_api_keys(settings.backends, environ)
        self._session: aiohttp.ClientSession | None = None
        self._server: asyncio.AbstractServer | None = None
        self._management: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[AgentCheckProtocol] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    @property
    def port(self) -> int:
        """The agent-check port actually bound (useful when configured as 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def answer(self, request: Request) -> str:
        reply, kind = self._answer(request)
        self.checks_served[kind] += 1
        return reply

    def _answer(self, request: Request) -> tuple[str, str]:
        if request.problem is not None:
            return invalid_request_reply(request.problem), "invalid"
        name = request.name
        if name is None:
            single = self.settings.single_backend
            if single is None:
                return invalid_request_reply("agent-send must name a backend (this agent watches several)"), "invalid"
            name = single.name
        reply = self.state.reply_for(name)
        if reply is None:
            return unknown_backend_reply(name), "unknown"
        return reply, reply.split(" ", 2)[1] if reply.startswith("up ") else "down"

    async def start(self) -> None:
        settings = self.settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.poll_timeout),
        )
        client = LlamaCppClient(self._session)
        monitor = Monitor(settings.backends, self.state,
                          lambda backend: client.poll(backend, self._api_keys[backend.name]),
                          settings.interval, settings.poll_timeout)
        await monitor.poll_all()
        self._background(monitor.run(), "monitor")
        if settings.balancer_health_url:
            self._background(probe_balancer_forever(self._session, settings.balancer_health_url, self.state,
                                                    settings.interval), "balancer-probe")
        if settings.statsd is not None:
            self._background(StatsdReporter(settings.statsd, self.state, settings.standby).run(), "statsd")
        if settings.management is not None:
            await self._start_management()
        wait = settings.single_backend_request_wait if settings.single_backend else settings.request_wait
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._track(AgentCheckProtocol(self.answer, wait, on_close=self._untrack)),
            host=settings.listen.host, port=settings.listen.port, reuse_address=True, backlog=1024,
        )
        log.info("agent-check listening on %s:%d for %d backend(s)", settings.listen.host, self.port,
                 len(settings.backends))

    async def _start_management(self) -> None:
        settings = self.settings
        assert settings.management is not None
        registry = build_registry(FleetCollector(self.state, self.checks_served, settings.standby))
        picker = Picker(self.state, settings.standby, settings.max_buffered_requests,
                        settings.buffered_request_timeout)
        app = create_app(self.state, registry, settings.operator_token, settings.standby, picker)
        # handler_cancellation: a request that gives up while queued in the picker leaves the queue.
        self._management = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._management.setup()
        await web.TCPSite(self._management, settings.management.host, settings.management.port).start()
        log.info("management API and dashboard on http://%s/ (operator endpoints %s)", settings.management,
                 "enabled" if settings.operator_token else "disabled: no token configured")

    def _background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coroutine, name=name))

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
        if self._management is not None:
            await self._management.cleanup()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        log.info("agent stopped")
