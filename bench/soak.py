"""Soak benchmark (not in CI): the chaos schedule and mixed streaming load for N minutes on real components.

The fleet of tests/integration/test_chaos.py (llama-servers with 1, 2 and 3 slots, a 2-slot standby,
the agent at 500 ms, the generated HAProxy or Envoy config), devstack/chaos.py's seeded schedule over
the whole run, and a bounded load of streaming chats of 16 to 400 tokens. Prints the agent's RSS,
open fds and CPU seconds at start and end, the status counts, unexcused failures and the highest
``requests_deferred`` per server incarnation.

The schedule kills llama-servers and the standby; the agent only with ``--agent-kills``, because a
leak shows only in an agent that lives the whole run (tests/integration/test_chaos.py kills it).

    python -m bench.soak --minutes 30 --seed 1 [--proxy haproxy|envoy] [--agent-kills]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from devstack import chaos
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LOOPBACK, AgentProcess, LlamaServer
from devstack.stack import BalancerStack

PRIMARIES = {"one": 1, "two": 2, "three": 3}
STANDBY = {"spare": 2}
CONCURRENCY = 9
REQUESTS_PER_MINUTE = 6000  # more than the fleet serves: the deadline ends the load


def mixed_tokens(index: int) -> int:
    """Mostly short chats, every seventh a long one: 16 to 400 tokens."""
    return 400 if index % 7 == 0 else 16 + (index * 53) % 180


def agent_usage(agent: AgentProcess) -> dict[str, Any]:
    """RSS (KiB), open fds and CPU seconds (user + system) of the running agent, from /proc."""
    if agent.proc is None or agent.proc.poll() is not None:
        return {"pid": None}
    pid = agent.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"pid": pid, "rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": round(cpu, 2)}


def run(minutes: float, seed: int, proxy: str, agent_kills: bool, workdir: Path) -> None:
    binary, model = llama_server_binary(), write_tiny_model(workdir / "tiny.gguf")
    servers = {name: LlamaServer(binary, model, workdir, slots=slots, name=name)
               for name, slots in {**PRIMARIES, **STANDBY}.items()}
    try:
        for server in servers.values():
            server.start()
        stack = BalancerStack(workdir / "lb", {name: servers[name].address for name in PRIMARIES},
                              standby={name: servers[name].address for name in STANDBY}, kind=proxy)
        with stack:
            stack.wait_slots({**PRIMARIES, **STANDBY})
            seconds = minutes * 60
            events = [event for event in chaos.schedule(seed, seconds - 10, list(PRIMARIES), list(STANDBY))
                      if agent_kills or event.kind != chaos.AGENT]
            runner = chaos.ChaosRunner(events, servers, stack.agent)
            load = chaos.Load(LOOPBACK, stack.port, int(REQUESTS_PER_MINUTE * minutes), CONCURRENCY,
                              deadline=seconds, max_tokens=mixed_tokens)
            # The first incarnation's usage is taken now, the last one's at the end: the agent runs warm in both.
            start = agent_usage(stack.agent)
            with chaos.IncarnationDeferrals(servers, interval=0.05) as deferrals:
                runner.start()
                ended_in_time = load.run()
                runner.stop()
            end = agent_usage(stack.agent)
    finally:
        for server in servers.values():
            server.stop()
    unexcused = chaos.unexcused_failures(load.outcomes, runner.kills)
    print(f"soak: {minutes:g} min, seed {seed}, {proxy}, {len(events)} events, {len(runner.kills)} played")
    print(f"agent at start: {start}")
    print(f"agent at end:   {end}")
    print(f"summary: {chaos.summary(load, runner.kills, deferrals)}")
    print(f"requests ended before the deadline: {ended_in_time}; restart errors: {runner.errors}")
    print(f"unexcused failures: {[(o.label(), o.server, round(o.started, 3)) for o in unexcused]}")
    print(f"highest requests_deferred per (server, pid): {deferrals.max_deferred}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--proxy", choices=["haproxy", "envoy"], default="haproxy")
    parser.add_argument("--agent-kills", action="store_true", help="kill the agent too (start and end are then "
                                                                       "two different agents)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="paddler-soak-") as workdir:
        run(args.minutes, args.seed, args.proxy, args.agent_kills, Path(workdir))


if __name__ == "__main__":
    main()
