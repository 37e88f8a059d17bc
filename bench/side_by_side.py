"""What the side-by-side proxy-path benchmarks share (bench.envoy_picker_bench, bench.model_routing_overhead):
the SIMULATOR's backends, an open-loop load alternating between two proxies, and the report of the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from devstack.processes import wait_until


@contextlib.contextmanager
def simulated_backends(workdir: Path, count: int, slots: int) -> Iterator[list[int]]:
    """bench.slots_sim's fake llama-servers (instant canned answers, every slot idle); yields their ports."""
    ports_file = workdir / "ports.json"
    sim = subprocess.Popen([sys.executable, "-m", "bench.slots_sim", "--count", str(count), "--slots", str(slots),
                            "--idle", "--ports-file", str(ports_file)])
    try:
        yield wait_until(lambda: ports_file.exists() and json.loads(ports_file.read_text()), timeout=30,
                         what="the simulator")
    finally:
        sim.terminate()
        sim.wait()


async def measure(urls: dict[str, str], rate: float, seconds: float, path: str = "/completion",
                  body: str = json.dumps({"prompt": "hi", "n_predict": 1})) -> dict[str, list[float]]:
    """Open loop: requests alternate between ``urls`` at ``rate`` per second each; latency of each 200."""
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    failures: list[str] = []

    async def one(session: aiohttp.ClientSession, name: str) -> None:
        started = time.perf_counter()
        async with session.post(urls[name] + path, data=body) as response:
            await response.read()
            if response.status != 200:
                failures.append(f"{name}: {response.status} {(await response.text())[:90]}")
                return
        latencies[name].append(time.perf_counter() - started)

    names = list(urls)
    total = int(rate * seconds) * len(names)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(total):
            delay = start + i / (rate * len(names)) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, names[i % len(names)])))
        await asyncio.gather(*tasks)
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return latencies


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def report(latencies: dict[str, list[float]], baseline: str, candidate: str, heading: str) -> None:
    """Each path's p50 and p99, then what ``candidate`` adds to ``baseline``."""
    print(heading)
    for name, values in latencies.items():
        print(f"{name:14} n={len(values):5}  p50 {quantile(values, 50) * 1000:6.3f} ms  "
              f"p99 {quantile(values, 99) * 1000:6.3f} ms")
    added50 = quantile(latencies[candidate], 50) - quantile(latencies[baseline], 50)
    added99 = quantile(latencies[candidate], 99) - quantile(latencies[baseline], 99)
    print(f"{candidate} adds  p50 {added50 * 1000:+.3f} ms  p99 {added99 * 1000:+.3f} ms")
