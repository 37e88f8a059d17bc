"""Periodic reporting: the balancer's buffered-request count, and StatsD gauges with Paddler's names."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import statsd

from agentcheck.monitor import FleetState
from agentcheck.snapshot import fleet_snapshot
from fleet import StatsdConfig

log = logging.getLogger("paddler.agent")


async def probe_balancer_forever(session: aiohttp.ClientSession, url: str, state: FleetState,
                                 interval: float) -> None:
    """Keep ``state.requests_buffered`` current from the balancer's aggregated /health.

    The agent sees llama.cpp; only the balancer knows how many requests wait in front of it.
    Unknown (None) while the balancer does not answer.
    """
    while True:
        state.requests_buffered = await _buffered(session, url, timeout=interval * 0.8)
        await asyncio.sleep(interval)


async def _buffered(session: aiohttp.ClientSession, url: str, timeout: float) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            value = json.loads(await response.read()).get("requests_buffered")
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class StatsdReporter:
    """Gauges every ``interval``: fleet totals as ``<prefix>.slots_idle`` (Paddler's names) and
    per backend as ``<prefix>.backends.<name>.slots_idle``."""

    def __init__(self, config: StatsdConfig, state: FleetState, standby: frozenset[str]) -> None:
        self._config = config
        self._state = state
        self._standby = standby
        self._client = statsd.StatsClient(config.address.host, config.address.port, prefix=config.prefix)

    def report(self) -> None:
        snapshot = fleet_snapshot(self._state, self._standby)
        with self._client.pipeline() as pipe:
            pipe.gauge("slots_idle", snapshot["totals"]["slots_idle"])
            pipe.gauge("slots_processing", snapshot["totals"]["slots_processing"])
            if snapshot["requests_buffered"] is not None:
                pipe.gauge("requests_buffered", snapshot["requests_buffered"])
            for agent in snapshot["agents"]:
                pipe.gauge(f"backends.{agent['name']}.slots_idle", agent["slots_idle"])
                pipe.gauge(f"backends.{agent['name']}.slots_processing", agent["slots_processing"])

    def close(self) -> None:
        self._client.close()

    async def run(self) -> None:
        try:
            while True:
                try:
                    self.report()
                except OSError as exc:  # an unreachable StatsD host must not stop the agent
                    log.warning("StatsD report failed: %s", exc)
                await asyncio.sleep(self._config.interval)
        finally:
            self.close()
