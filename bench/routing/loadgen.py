"""Open-loop load: a seeded trace of requests (Poisson or bursty on/off arrivals, long-tailed prompt and
output lengths), replayed as streaming completions; records time to first token, end-to-end time and
status per request.

The trace is pure data, so the same requests feed the ideal-queue simulation and every strategy.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass

import aiohttp

from bench.routing.model import RequestSpec, ServerSpec


@dataclass(frozen=True)
class TraceConfig:
    seed: int = 42
    duration: float = 15.0
    rate: float = 10.0  # mean arrivals per second
    pattern: str = "poisson"  # or "bursty": on/off periods with the same mean rate
    prompt_median: int = 200
    prompt_max: int = 4000
    output_median: int = 60
    output_max: int = 600


def mean_output_tokens(config: TraceConfig) -> float:
    """Mean of the clipped log-normal used below, estimated once from a large seeded sample."""
    rng = random.Random(config.seed ^ 0x5EED)
    draws = [_output_tokens(rng, config) for _ in range(20_000)]
    return sum(draws) / len(draws)


def capacity_requests_per_second(fleet: list[ServerSpec], config: TraceConfig) -> float:
    """What the fleet sustains with every slot busy: full-batch token throughput / mean output."""
    return sum(spec.tokens_per_second_full() for spec in fleet) / mean_output_tokens(config)


def _output_tokens(rng: random.Random, config: TraceConfig) -> int:
    # Long tail: sigma 0.9 puts p99 near 8x the median, like chat traffic's few long answers.
    return max(4, min(config.output_max, round(rng.lognormvariate(math.log(config.output_median), 0.9))))


def make_trace(config: TraceConfig) -> list[RequestSpec]:
    rng = random.Random(config.seed)
    trace: list[RequestSpec] = []
    now = 0.0
    period = 2.0  # bursty: 2 s at twice the rate, 2 s silent
    while True:
        rate = config.rate
        if config.pattern == "bursty":
            rate = 2 * config.rate
            if int(now // period) % 2 == 1:
                now = (int(now // period) + 1) * period
        now += rng.expovariate(rate)
        if now >= config.duration:
            return trace
        prompt = max(16, min(config.prompt_max, round(rng.lognormvariate(math.log(config.prompt_median), 0.8))))
        trace.append(RequestSpec(len(trace), now, prompt, _output_tokens(rng, config)))


@dataclass
class Result:
    id: int
    status: int
    ttft: float | None
    e2e: float
    bypass: bool
    error: str = ""


async def _one(session: aiohttp.ClientSession, url: str, request: RequestSpec, bypass: bool,
               timeout: float) -> Result:
    body = {"prompt": "x" * (4 * request.prompt_tokens), "n_prompt_tokens": request.prompt_tokens,
            "n_predict": request.output_tokens, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/completion", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                await response.read()
                return Result(request.id, response.status, None, time.perf_counter() - started, bypass)
            async for line in response.content:
                if line.startswith(b"data: ") and ttft is None:
                    ttft = time.perf_counter() - started
            return Result(request.id, 200, ttft, time.perf_counter() - started, bypass)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Result(request.id, 0, ttft, time.perf_counter() - started, bypass, type(exc).__name__)


async def replay(trace: list[RequestSpec], balancer_url: str, bypass_url: str | None = None,
                 bypass_fraction: float = 0.0, seed: int = 0, timeout: float = 120.0) -> list[Result]:
    """Send each request at its arrival time (open loop: never waits for earlier answers).

    With ``bypass_url``, a seeded ``bypass_fraction`` of requests goes straight to that server,
    the way other tools in a real deployment skip the balancer.
    """
    rng = random.Random(seed)
    routes = [bypass_url is not None and rng.random() < bypass_fraction for _ in trace]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for request, bypass in zip(trace, routes, strict=False):
            delay = start + request.arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url = bypass_url if bypass and bypass_url else balancer_url
            tasks.append(asyncio.create_task(_one(session, url, request, bypass, timeout)))
        return list(await asyncio.gather(*tasks))


def trace_summary(trace: list[RequestSpec]) -> str:
    return json.dumps({"requests": len(trace), "prompt_tokens_mean": round(sum(r.prompt_tokens for r in trace) /
                                                                          max(1, len(trace))),
                       "output_tokens_mean": round(sum(r.output_tokens for r in trace) / max(1, len(trace)))})
