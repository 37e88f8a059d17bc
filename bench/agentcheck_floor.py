"""The floor under the agent's cost: the agent's traffic served by stand-ins that do nothing else.

The agent's CPU target (≤ 10% of one core at 1,000 backends polled once a second and 1,000
agent-checks a second) is only reachable if a Python asyncio process can carry that traffic
(1,000 new TCP connections answered and 1,000 keep-alive HTTP exchanges a second) in less.
This bench measures what the least possible work for that traffic costs, next to the agent:

- ``floor-uvloop``: one uvloop process with a bare ``asyncio.Protocol`` that answers every
  agent-check connection with a fixed line on its first bytes and closes, and a bare
  keep-alive poller that writes a fixed ``GET /slots`` to each backend once a second (a batch
  every 10 ms, so the backends are spread across the second as the agent spreads them) and
  reads each response only up to its Content-Length, parsing nothing else;
- ``floor-asyncio``: the same on asyncio's default loop;
- ``agent``: the real ``paddler-agent`` (this checkout, or each ``--agent-source DIR``).

The floors are NOT the agent: they answer no real question (every check gets the same line,
no poll is interpreted). They only say what the traffic alone costs in Python.

Same simulator, load generator and measurement as ``bench.agentcheck_bench`` (imported from
it); the variants alternate run by run, so a noisy machine hurts all of them alike. CPU is
the process's CPU time over the wall time of the measured window, as a percentage of one core.

    python -m bench.agentcheck_floor --backends 1000 --rate 1000 --seconds 20 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bench.agentcheck_bench import Window, agent_watching, check_names, measure, run_checks, simulator
from devstack.processes import _Process, accepts_connections, free_port

CHECK_REPLY = b"up ready 100% maxconn:4 #idle=4 processing=0 via /slots\n"  # as long as the agent's
POLL_TICK = 0.01  # seconds between batches of polls
POLLS_LINE = "floor polls answered: "


class _FloorCheck(asyncio.Protocol):
    """Answer the first bytes of a check connection with the fixed line, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self.transport.write(CHECK_REPLY)
        self.transport.close()


class _FloorPoll(asyncio.Protocol):
    """One kept-alive backend connection; a response ends Content-Length bytes after its head."""

    answered = 0  # responses completed, over all connections

    def __init__(self) -> None:
        self.buffer = b""
        self.end = -1  # where the response in flight ends in ``buffer``, once its head is in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.end < 0:
            head = self.buffer.find(b"\r\n\r\n")
            if head < 0:
                return
            # The simulator writes exactly this header; a real client would have to parse the head.
            start = self.buffer.index(b"Content-Length: ") + 16
            self.end = head + 4 + int(self.buffer[start:self.buffer.index(b"\r\n", start)])
        if len(self.buffer) >= self.end:
            self.buffer, self.end = b"", -1
            _FloorPoll.answered += 1


async def _stand_in(port: int, backends: list[int]) -> None:
    """Connect to every backend, then listen for checks and poll each backend once a second until SIGTERM."""
    loop = asyncio.get_running_loop()
    polls = [(await loop.create_connection(_FloorPoll, "127.0.0.1", p))[1] for p in backends]
    requests = [f"GET /slots HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nUser-Agent: paddler-agent\r\nAccept: */*\r\n\r\n"
                .encode() for p in backends]
    per_tick = max(1, round(len(polls) * POLL_TICK))
    started = loop.time()

    def tick(index: int, at: float) -> None:
        for poll, request in zip(polls[index:index + per_tick], requests[index:index + per_tick], strict=True):
            poll.transport.write(request)
        index = index + per_tick if index + per_tick < len(polls) else 0
        loop.call_at(at + POLL_TICK, tick, index, at + POLL_TICK)

    loop.call_soon(tick, 0, started)
    server = await loop.create_server(_FloorCheck, "127.0.0.1", port, reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    print(f"{POLLS_LINE}{_FloorPoll.answered} in {loop.time() - started:.3f}s", flush=True)


def stand_in_main(loop_name: str, port: int, ports_file: str) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backends = json.loads(Path(ports_file).read_text())
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_name == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_stand_in(port, backends))


class FloorProcess(_Process):
    """A stand-in as a child process, ready when its check port accepts (after it has connected to every backend)."""

    def __init__(self, workdir: Path, loop_name: str, ports: list[int]) -> None:
        self.name = f"floor-{loop_name}"
        super().__init__(workdir)
        self.loop_name = loop_name
        self.port = free_port()
        self.ports_file = self.workdir / "ports.json"
        self.ports_file.write_text(json.dumps(ports))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.agentcheck_floor", "--stand-in", self.loop_name,
                "--port", str(self.port), "--ports-file", str(self.ports_file)]

    def ready(self) -> bool:
        return accepts_connections(self.port)

    def polls_per_second(self) -> float:
        """From the line the stand-in prints once stopped (over its whole life, warm-up included)."""
        for line in self.log_path.read_text().splitlines():
            if line.startswith(POLLS_LINE):
                answered, _, seconds = line.removeprefix(POLLS_LINE).partition(" in ")
                return int(answered) / float(seconds.removesuffix("s"))
        return float("nan")


FLOORS = ("floor-uvloop", "floor-asyncio")


@dataclass
class Run:
    variant: str
    window: Window
    polls_per_s: float  # measured for the floors only: proves they carried the polling traffic


def _measure(pid: int, port: int, sim_pid: int, ports: list[int], args: argparse.Namespace) -> Window:
    names = [f"{n}\n".encode() for n in check_names(ports)]
    run_checks(port, names, args.rate, args.warmup)
    return measure(pid, port, names, sim_pid, args.rate, args.seconds)


def one_run(variant: str, sim_pid: int, ports: list[int], args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory(prefix="agent-floor-") as tmp:
        if variant not in FLOORS:  # "agent" or "agent DIR"
            source = variant.removeprefix("agent").strip() or None
            with agent_watching(Path(tmp), ports, 0, "warning", source) as agent:
                assert agent.proc is not None
                return Run(variant, _measure(agent.proc.pid, agent.port, sim_pid, ports, args), float("nan"))
        floor = FloorProcess(Path(tmp), variant.removeprefix("floor-"), ports)
        with floor:
            assert floor.proc is not None
            window = _measure(floor.proc.pid, floor.port, sim_pid, ports, args)
        return Run(variant, window, floor.polls_per_second())  # the stand-in prints its count once stopped


def _row(label: str, cpu: float, p50: float, p99: float, polls: float, bench: float, sim: float,
         failed: int | str) -> str:
    polls_text = f"{polls:7.0f}" if polls == polls else f"{'-':>7}"
    return f"{label:<24} {cpu:8.1f}% {p50:7.2f} {p99:7.2f} {polls_text} {bench:8.1f}% {sim:6.1f}% {failed:>6}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="agent-checks per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=1, help="runs per variant; medians are printed")
    parser.add_argument("--agent-source", action="append", default=[], metavar="DIR",
                        help="run the agent from this checkout; repeatable")
    parser.add_argument("--stand-in", choices=["uvloop", "asyncio"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_in:
        stand_in_main(args.stand_in, args.port, args.ports_file)
        return 0
    if args.backends < 1 or args.rate <= 0:
        parser.error("the floor needs backends and checks")

    print(f"{args.backends} simulated backends polled every 1s; {args.rate:g} agent-checks/s for {args.seconds:g}s "
          f"per run; variants alternate")
    print("floor-* are NOT the agent: they answer every check with one fixed line and interpret no poll;")
    print("they show what this traffic alone costs a Python asyncio process.")
    print(f"{'variant':<24} {'CPU':>9} {'p50 ms':>7} {'p99 ms':>7} {'polls/s':>7} {'bench CPU':>9} {'sim CPU':>7} "
          f"{'failed':>6}")
    variants = [*FLOORS, *([f"agent {source}" for source in args.agent_source] or ["agent"])]
    runs: list[Run] = []
    started = time.monotonic()
    with simulator(args.backends) as (sim_pid, ports):
        for _ in range(args.runs):
            for variant in variants:
                try:
                    run = one_run(variant, sim_pid, ports, args)
                except TimeoutError as exc:  # the host starved someone for seconds: no CPU figure to keep
                    print(f"{variant:<24} run discarded: {exc}", flush=True)
                    continue
                runs.append(run)
                w = run.window
                print(_row(variant, w.cpu, w.p50_ms(), w.p99_ms(), run.polls_per_s, w.bench_cpu, w.sim_cpu,
                           w.failures), flush=True)
    medians: dict[str, float] = {}
    print(f"medians of the runs kept ({time.monotonic() - started:.0f}s in all):")
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        if not mine:
            print(f"{variant:<24} no run kept")
            return 1

        def med(f: Callable[[Run], float], mine: list[Run] = mine) -> float:
            return statistics.median(f(r) for r in mine)

        medians[variant] = med(lambda r: r.window.cpu)
        print(_row(variant, medians[variant], med(lambda r: r.window.p50_ms()), med(lambda r: r.window.p99_ms()),
                   med(lambda r: r.polls_per_s), med(lambda r: r.window.bench_cpu),
                   med(lambda r: r.window.sim_cpu), sum(r.window.failures for r in mine)))
    for variant in variants[len(FLOORS):]:
        print(f"{variant} CPU / floor-uvloop CPU: {medians[variant] / medians['floor-uvloop']:.2f}x; "
              f"/ floor-asyncio: {medians[variant] / medians['floor-asyncio']:.2f}x")
    return 0 if len(runs) == args.runs * len(variants) and all(r.window.failures == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
