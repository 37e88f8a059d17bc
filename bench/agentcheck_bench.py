"""Agent benchmark: agent-check round trip and agent CPU while watching a large fleet.

Starts the SIMULATOR (bench/slots_sim.py: fake llama-servers, not llama.cpp) with
``--backends`` endpoints (plus ``--refused`` addresses where nothing listens), the real
``paddler-agent`` watching all of them at a 1 s interval, then sends HAProxy-like checks
(new connection, ``name\\n``, read one line, close) open-loop at ``--rate`` per second for
``--seconds``. Prints round-trip p50/p99, the agent's CPU use (utime+stime from /proc) as
a percentage of one core, the agent's log lines per second, and the CPU of the bench
client and the simulator, so that a bench that is itself the bottleneck shows.

    python -m bench.agentcheck_bench --backends 1000 --rate 1000 --seconds 20 --runs 3

``--agent-source DIR`` (repeatable) runs the agent from another checkout (e.g. a git
worktree of an older commit) by putting DIR first on its PYTHONPATH; with several, the
runs alternate between them so that a noisy machine hurts all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from devstack.processes import AgentProcess, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Check(asyncio.Protocol):
    """One HAProxy-style check: connect, send the name, collect the reply until the agent closes.

    A bare protocol (no streams, no task per check) so the bench's own cost stays small and
    its event loop adds as little as possible to the round trip it measures.
    """

    def __init__(self, name: bytes, done: Callable[[float, bytes], None]) -> None:
        self.name, self.done = name, done
        self.started = time.perf_counter()
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.name)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.done(time.perf_counter() - self.started, self.data)


async def check_load(port: int, names: list[bytes], rate: float, seconds: float) -> tuple[list[float], int]:
    """Open loop: check i starts at i/rate whatever happened to earlier ones (like HAProxy's timers)."""
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    latencies: list[float] = []
    finished = loop.create_future()
    outcome = {"failed": 0, "ended": 0}

    def done(elapsed: float, reply: bytes) -> None:
        if reply.startswith(b"up ready") and reply.endswith(b"\n"):
            latencies.append(elapsed)
        else:
            outcome["failed"] += 1
        outcome["ended"] += 1
        if outcome["ended"] == total and not finished.done():
            finished.set_result(None)

    async def one(name: bytes) -> None:
        try:
            await loop.create_connection(lambda: _Check(name, done), "127.0.0.1", port)
        except OSError:
            done(0.0, b"")

    start = loop.time()
    pending: set[asyncio.Task[None]] = set()
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(names[i % len(names)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if total:
        try:
            await asyncio.wait_for(finished, timeout=30)
        except TimeoutError:
            raise TimeoutError(f"{total - outcome['ended']} of {total} checks never ended") from None
    return latencies, outcome["failed"]


def run_checks(port: int, names: list[bytes], rate: float, seconds: float) -> tuple[list[float], int]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(check_load(port, names, rate, seconds))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(check_load(port, names, rate, seconds))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


def refused_ports(count: int) -> list[int]:
    """Loopback ports where nothing listens (bound, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def simulator(backends: int) -> Iterator[tuple[int, list[int]]]:
    """The SIMULATOR listening on ``backends`` loopback ports: yields its pid and the ports."""
    with tempfile.TemporaryDirectory(prefix="agent-bench-sim-") as tmp:
        ports_file = Path(tmp) / "ports.json"
        sim = subprocess.Popen([sys.executable, "-m", "bench.slots_sim", "--count", str(backends),
                                "--ports-file", str(ports_file)])

        def ports() -> list[int]:
            return list(json.loads(ports_file.read_text())) if ports_file.exists() else []

        try:
            yield sim.pid, wait_until(ports, timeout=60, what="the simulator")
        finally:
            sim.terminate()
            sim.wait()


def check_names(ports: list[int]) -> list[str]:
    return [f"b{i:05d}" for i in range(len(ports))]


@contextmanager
def agent_watching(workdir: Path, ports: list[int], refused: int, log_level: str,
                   source: str | None) -> Iterator[AgentProcess]:
    """The real agent polling ``ports`` (named by ``check_names``) plus ``refused`` dead addresses every 1 s."""
    entries: list[dict[str, Any]] = [{"name": n, "address": f"127.0.0.1:{p}"}
                                     for n, p in zip(check_names(ports), ports, strict=True)]
    entries += [{"name": f"gone{i:05d}", "address": f"127.0.0.1:{p}"}
                for i, p in enumerate(refused_ports(refused))]
    fleet = {"backends": entries, "agent": {"interval": "1s"}}
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    # PYTHONSAFEPATH: the current directory must not shadow the source under test.
    env = {"PYTHONPATH": source, "PYTHONSAFEPATH": "1"} if source else None
    agent = AgentProcess(workdir, ["--fleet", str(workdir / "fleet.yaml"), "--log-level", log_level], extra_env=env)
    with agent:
        yield agent


@dataclass
class Window:
    """One measured stretch of checks: round trips, and CPU as a percentage of one core."""

    latencies: list[float]
    failures: int
    wall: float
    cpu: float
    bench_cpu: float
    sim_cpu: float

    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000 if self.latencies else float("nan")

    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000 if self.latencies else float("nan")


def measure(pid: int, port: int, names: list[bytes], sim_pid: int, rate: float, seconds: float) -> Window:
    """Checks against ``port`` for ``seconds``, with the CPU that ``pid``, this process and the simulator used."""
    cpu_before, own_before, sim_before = cpu_seconds(pid), own_cpu_seconds(), cpu_seconds(sim_pid)
    wall_before = time.monotonic()
    latencies, failures = run_checks(port, names, rate, seconds)
    wall = time.monotonic() - wall_before
    return Window(latencies, failures, wall, (cpu_seconds(pid) - cpu_before) / wall * 100,
                  (own_cpu_seconds() - own_before) / wall * 100, (cpu_seconds(sim_pid) - sim_before) / wall * 100)


@dataclass
class Result:
    source: str
    p50_ms: float
    p99_ms: float
    agent_cpu: float
    log_lines_per_s: float
    bench_cpu: float
    sim_cpu: float
    failures: int


def one_run(args: argparse.Namespace, source: str | None) -> Result:
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp, simulator(args.backends) as (sim_pid, ports):
        with agent_watching(Path(tmp), ports, args.refused, args.log_level, source) as agent:
            assert agent.proc is not None
            encoded = [f"{n}\n".encode() for n in check_names(ports)]
            run_checks(agent.port, encoded, args.rate, args.warmup)
            log_before = agent.log_path.read_bytes().count(b"\n")
            window = measure(agent.proc.pid, agent.port, encoded, sim_pid, args.rate, args.seconds)
            log_lines = (agent.log_path.read_bytes().count(b"\n") - log_before) / window.wall
    return Result(source or "(this checkout)", window.p50_ms(), window.p99_ms(), window.cpu, log_lines,
                  window.bench_cpu, window.sim_cpu, window.failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--refused", type=int, default=0, help="extra backends where nothing listens")
    parser.add_argument("--rate", type=float, default=1000.0, help="agent-checks per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window (bounded load)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=1, help="runs per agent source; medians are printed")
    parser.add_argument("--agent-source", action="append", default=[], metavar="DIR",
                        help="run the agent from this checkout; repeatable, runs alternate")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args()
    if args.backends < 1 and args.rate > 0:
        parser.error("agent-checks need at least one simulated backend")

    sources: list[str | None] = list(args.agent_source) or [None]
    results: list[Result] = []
    print(f"{args.backends} simulated backends + {args.refused} refusing, polled every 1s; "
          f"{args.rate:g} agent-checks/s for {args.seconds:g}s; agent log level {args.log_level}")
    print(f"{'agent source':<28} {'p50 ms':>7} {'p99 ms':>8} {'agent CPU':>9} {'log/s':>6} "
          f"{'bench CPU':>9} {'sim CPU':>7} {'failed':>6}")
    for _ in range(args.runs):
        for source in sources:
            r = one_run(args, source)
            results.append(r)
            print(f"{r.source:<28} {r.p50_ms:7.2f} {r.p99_ms:8.2f} {r.agent_cpu:8.1f}% {r.log_lines_per_s:6.1f} "
                  f"{r.bench_cpu:8.1f}% {r.sim_cpu:6.1f}% {r.failures:6d}", flush=True)
    if args.runs > 1:
        print("medians:")
        for source in sources:
            mine = [r for r in results if r.source == (source or "(this checkout)")]
            def med(f: Callable[[Result], float], mine: list[Result] = mine) -> float:
                return statistics.median(f(r) for r in mine)
            print(f"{mine[0].source:<28} {med(lambda r: r.p50_ms):7.2f} {med(lambda r: r.p99_ms):8.2f} "
                  f"{med(lambda r: r.agent_cpu):8.1f}% {med(lambda r: r.log_lines_per_s):6.1f} "
                  f"{med(lambda r: r.bench_cpu):8.1f}% {med(lambda r: r.sim_cpu):6.1f}%")
    return 0 if all(r.failures == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
