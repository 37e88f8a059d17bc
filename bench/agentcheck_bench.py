"""Agent benchmark: agent-check round trip and agent CPU while watching a large fleet.

Starts the SIMULATOR (bench/slots_sim.py: fake llama-servers, not llama.cpp) with
``--backends`` endpoints, the real ``paddler-agent`` watching all of them at a 1 s
interval, then sends HAProxy-like checks (new connection, ``name\\n``, read one line,
close) open-loop at ``--rate`` per second for ``--seconds``. Prints round-trip p50/p99
and the agent's CPU use (utime+stime from /proc) as a percentage of one core.

    python -m bench.agentcheck_bench --backends 1000 --rate 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from devstack.processes import AgentProcess, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def one_check(port: int, name: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(name)
    reply = await reader.read(512)
    writer.close()
    return time.perf_counter() - started, reply.decode(errors="replace")


async def check_load(port: int, names: list[bytes], rate: float, seconds: float) -> tuple[list[float], int]:
    """Open loop: check i starts at i/rate whatever happened to earlier ones (like HAProxy's timers)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * seconds)
    tasks = []
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_check(port, names[i % len(names)])))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    latencies = [r[0] for r in results if isinstance(r, tuple) and r[1].startswith("up ready")]
    return latencies, total - len(latencies)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="agent-checks per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window (bounded load)")
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        workdir = Path(tmp)
        ports_file = workdir / "ports.json"
        sim = subprocess.Popen([sys.executable, "-m", "bench.slots_sim", "--count", str(args.backends),
                                "--ports-file", str(ports_file)])
        try:
            ports = wait_until(lambda: ports_file.exists() and json.loads(ports_file.read_text()), timeout=60,
                               what="the simulator")
            names = [f"b{i:05d}" for i in range(len(ports))]
            fleet = {"backends": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(names, ports)],
                     "agent": {"interval": "1s"}}
            (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet))
            with AgentProcess(workdir, ["--fleet", str(workdir / "fleet.yaml"), "--log-level", "warning"]) as agent:
                assert agent.proc is not None
                encoded = [f"{n}\n".encode() for n in names]
                asyncio.run(check_load(agent.port, encoded, args.rate, args.warmup))
                cpu_before, wall_before = cpu_seconds(agent.proc.pid), time.monotonic()
                latencies, failures = asyncio.run(check_load(agent.port, encoded, args.rate, args.seconds))
                cpu = (cpu_seconds(agent.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
        finally:
            sim.terminate()
            sim.wait()

    print(f"backends watched        {args.backends} (simulated, polled every 1s)")
    print(f"agent-checks            {len(latencies) + failures} at {args.rate:g}/s over {args.seconds:g}s, "
          f"{failures} failed")
    print(f"round trip p50          {percentile(latencies, 50) * 1000:.2f} ms")
    print(f"round trip p99          {percentile(latencies, 99) * 1000:.2f} ms")
    print(f"agent CPU               {cpu * 100:.1f}% of one core")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
