"""The agent process: start-up, serving, shutdown, in that fixed order.

Start-up polls every backend once before any port opens, so HAProxy never hears "not
polled yet" from a freshly restarted agent. Shutdown stops listening for agent-checks,
lets in-flight checks finish (bounded), stops the management server, then cancels the
background tasks and closes the HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from agentcheck.config import AgentSettings
from agentcheck.eds import EndpointDiscovery
from agentcheck.haproxy_runtime import RuntimeAPI, SparePool
from agentcheck.llamacpp import LlamaCppClient
from agentcheck.management import create_app
from agentcheck.membership import Membership
from agentcheck.metrics import FleetCollector, build_registry
from agentcheck.model import FleetModel
from agentcheck.monitor import Monitor
from agentcheck.picker import Picker
from agentcheck.protocol import AgentCheckProtocol
from agentcheck.replies import AgentCheckReplies
from agentcheck.reporting import BalancerProbe, StatsdReporter
from agentcheck.snapshot import fleet_snapshot
from fleet import Fleet, contract

log = logging.getLogger("paddler.agent")

SHUTDOWN_TIMEOUT = 2.0


class Agent:
    """The parts of the agent and their wiring. Each part owns its state: the model the fleet's,
    the replies their cache and counts, the monitor its poll counters, the picker its leases and
    queue, the discovery the endpoint list Envoy is served and what it has applied, the probe HAProxy's
    queue length. Parts hear of fleet changes through the model's
    subscriptions, made here in ``start`` and nowhere else."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.model = FleetModel.from_fleet(settings.fleet)
        self.membership = Membership(self.model, settings.fleet)
        self.replies = AgentCheckReplies(self.model, settings.weight,
                                         return_window=contract.agent_return_window(settings.interval))
        self.discovery = EndpointDiscovery(self.model)
        self.picker = Picker(self.model, settings.fleet.balancer.max_buffered_requests,
                             settings.fleet.balancer.buffered_request_timeout,
                             in_balancer=self.discovery.acknowledged, limits=settings.fleet.limits,
                             poll_soon=self._poll_soon, affinity_wait=settings.fleet.balancer.affinity_wait or 0.0)
        balancer = settings.fleet.balancer
        self.spares = (SparePool(self.model, self.replies, RuntimeAPI(balancer.stats_socket), contract.HAPROXY_BACKEND,
                                 contract.spare_server_names(balancer.spare_servers), settings.interval,
                                 adopt_for=settings.fleet.agent.registration_timeout)
                       if balancer.stats_socket and balancer.spare_servers else None)
        # Read before anything starts: a configured but missing token stops the agent.
        self.picker_token = contract.resolve_picker_token(settings.fleet)
        self.monitor: Monitor | None = None
        self._probe: BalancerProbe | None = None
        self._session: aiohttp.ClientSession | None = None  # the balancer probe's; polls have their own client
        self._client: LlamaCppClient | None = None
        self._server: asyncio.Server | None = None
        self._management: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[AgentCheckProtocol] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    @property
    def port(self) -> int:
        """The agent-check port actually bound (useful when configured as 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def requests_buffered(self) -> int | None:
        """Requests waiting in front of the fleet: in the picker's queue (Envoy) or in HAProxy's,
        as its /health last said; None while HAProxy's count is unknown."""
        return self._buffered(self.picker.waiting, lambda probe: probe.requests_buffered)

    def requests_buffered_for(self, model: str) -> int | None:
        """Requests waiting for one model: in the picker's queue for it, or in its HAProxy backend's."""
        return self._buffered(self.picker.waiting_for(model),
                              lambda probe: probe.requests_buffered_by_model.get(model))

    def _poll_soon(self, name: str, delay: float) -> None:
        if self.monitor is not None:
            self.monitor.poll_soon(name, delay)

    def _buffered(self, picker: int, haproxy: Callable[[BalancerProbe], int | None]) -> int | None:
        if self._probe is None or self._probe.balancer_is_picker:
            return picker
        counted = haproxy(self._probe)
        if counted is None:
            return picker or None
        return counted + picker

    def snapshot(self) -> dict[str, Any]:
        return fleet_snapshot(self.model, self.replies.reply_for, self.requests_buffered(),
                              self.discovery.acknowledged, self.spares, self.requests_buffered_for)

    async def start(self) -> None:
        settings = self.settings
        self.model.subscribe(self.replies.on_member_change)
        self.model.subscribe(self.picker.on_member_change)
        self.model.subscribe(self.discovery.on_member_change)
        self.discovery.when_acknowledged(self.picker.wake)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.poll_timeout),
        )
        client = self._client = LlamaCppClient(timeout=settings.poll_timeout)
        self.monitor = Monitor(self.model,
                               lambda backend: client.poll(backend, settings.api_keys.get(backend.name)),
                               settings.interval, settings.poll_timeout)
        self.model.subscribe(self.monitor.on_member_change)
        await self.monitor.poll_all()
        self._background(self.monitor.run(), "monitor")
        self._background(self._sweep_membership(), "membership")
        if self.spares is not None:
            self.model.subscribe(self.spares.on_member_change)
            self._background(self.spares.run(), "spare-servers")
        elif settings.fleet.balancer.spare_servers:
            log.info("HAProxy's spare servers stay empty (no balancer.stats_socket): backends that join at run "
                     "time reach HAProxy after paddler-gen haproxy and a reload")
        self._probe = BalancerProbe(self._session, settings.balancer_health_url, settings.interval,
                                    settings.fleet.model_names())
        self._background(self._probe.run(), "balancer-probe")
        if settings.fleet.statsd is not None:
            self._background(StatsdReporter(settings.fleet.statsd, self.snapshot).run(), "statsd")
        if settings.management is not None:
            await self._start_management()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._track(AgentCheckProtocol(self.replies.answer, settings.agent_send_wait,
                                                   on_close=self._untrack)),
            host=settings.listen.host, port=settings.listen.port, reuse_address=True, backlog=1024,
        )
        log.info("agent-check listening on %s:%d for %d backend(s)", settings.listen.host, self.port,
                 len(self.model))

    async def _start_management(self) -> None:
        settings = self.settings
        assert settings.management is not None and self.monitor is not None
        registry = build_registry(FleetCollector(self.snapshot, self.monitor.counters, self.replies.served))
        app = create_app(self.model, self.replies, self.snapshot, registry, settings.operator_token, self.picker,
                         self.membership, picker_token=self.picker_token,
                         host_names=(settings.management.host,), discovery=self.discovery)
        # handler_cancellation: a request that gives up while queued in the picker leaves the queue.
        self._management = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._management.setup()
        await web.TCPSite(self._management, settings.management.host, settings.management.port).start()
        log.info("management API and dashboard on http://%s/ (operator endpoints %s; picker token %s)",
                 settings.management, "enabled" if settings.operator_token else "disabled: no token configured",
                 "not configured" if self.picker_token == contract.PICKER_TOKEN_UNSET else "configured")
        self.picker.open(settings.interval)

    def reload_fleet(self, fleet: Fleet) -> None:
        """SIGHUP: the fleet file's backends as re-read join or leave; other settings wait for a restart."""
        self.membership.reload(fleet)
        log.info("fleet file re-read: %d backend(s)", len(self.model))

    async def _sweep_membership(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            self.membership.sweep()

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
            self.discovery.close()
            await self._management.cleanup()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._session is not None:
            await self._session.close()
        log.info("agent stopped")
