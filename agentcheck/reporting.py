"""Periodic reporting: how many requests wait in the balancer, and StatsD gauges with Paddler's names."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp
import statsd

from agentcheck.snapshot import Snapshot
from fleet import StatsdConfig

log = logging.getLogger("paddler.agent")

# The picker marks its own /health answer with this header, so the agent can tell that the
# balancer in front is Envoy routing /health back to the picker rather than HAProxy.
PICKER_SOURCE_HEADER = "X-Paddler-Source"
_STATSD_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def statsd_name(model: str) -> str:
    """A model name as one part of a StatsD metric name: anything but ``[A-Za-z0-9_]`` (dots would add parts,
    ``:`` and ``|`` end the name) becomes ``_``, so names that differ only there share one gauge."""
    return _STATSD_UNSAFE.sub("_", model)


class BalancerProbe:
    """The number of requests waiting in HAProxy (its queue plus requests paddler.lua holds), read
    from HAProxy's aggregated /health; None while it does not answer.

    The agent sees llama.cpp; only HAProxy knows its queue. Behind Envoy the waiting requests are
    the picker's own, counted where they wait: when the balancer's /health turns out to be the
    picker's answer, the probe stops and reports nothing.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, interval: float,
                 models: tuple[str, ...] = ()) -> None:
        """``models``: the fleet's routed models, whose queues HAProxy reports one by one (/health?model=)."""
        self._session = session
        self._url = url
        self._interval = interval
        self._models = models
        self.requests_buffered: int | None = None
        self.requests_buffered_by_model: dict[str, int] = {}
        self.balancer_is_picker = False

    async def run(self) -> None:
        while not self.balancer_is_picker:
            self.requests_buffered = await self._read(self._url)
            by_model = {}
            for model in self._models:
                if not self.balancer_is_picker and (waiting := await self._read(self._url, model)) is not None:
                    by_model[model] = waiting
            self.requests_buffered_by_model = by_model
            await asyncio.sleep(self._interval)
        log.info("the balancer's /health is the picker's own: requests_buffered comes from the picker")

    async def _read(self, url: str, model: str | None = None) -> int | None:
        try:
            async with self._session.get(url, params={"model": model} if model else None,
                                         timeout=aiohttp.ClientTimeout(total=self._interval * 0.8)) as response:
                if response.headers.get(PICKER_SOURCE_HEADER) == "picker":
                    self.balancer_is_picker = True
                    return None
                value = json.loads(await response.read()).get("requests_buffered")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class StatsdReporter:
    """Gauges every ``interval``: fleet totals as ``<prefix>.slots_idle`` (Paddler's names),
    per backend as ``<prefix>.backends.<name>.slots_idle``, and per model, over the backends serving it,
    as ``<prefix>.model.<model>.slots_idle`` and ``.requests_buffered`` (``statsd_name``)."""

    def __init__(self, config: StatsdConfig, snapshot: Snapshot) -> None:
        self._config = config
        self._snapshot = snapshot
        self._client = statsd.StatsClient(config.address.host, config.address.port, prefix=config.prefix)

    def report(self) -> None:
        snapshot = self._snapshot()
        with self._client.pipeline() as pipe:
            pipe.gauge("slots_idle", snapshot["totals"]["slots_idle"])
            pipe.gauge("slots_processing", snapshot["totals"]["slots_processing"])
            if snapshot["requests_buffered"] is not None:
                pipe.gauge("requests_buffered", snapshot["requests_buffered"])
            for agent in snapshot["agents"]:
                pipe.gauge(f"backends.{agent['name']}.slots_idle", agent["slots_idle"])
                pipe.gauge(f"backends.{agent['name']}.slots_processing", agent["slots_processing"])
            per_model: dict[str, tuple[int, int, int | None]] = {}
            for model, served in snapshot["models"].items():
                idle, processing, buffered = per_model.get(statsd_name(model), (0, 0, None))
                waiting = served["requests_buffered"]
                if waiting is not None:
                    buffered = (buffered or 0) + waiting
                per_model[statsd_name(model)] = (idle + served["slots_idle"],
                                                 processing + served["slots_processing"], buffered)
            for name, (idle, processing, buffered) in per_model.items():
                pipe.gauge(f"model.{name}.slots_idle", idle)
                pipe.gauge(f"model.{name}.slots_processing", processing)
                if buffered is not None:
                    pipe.gauge(f"model.{name}.requests_buffered", buffered)

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
