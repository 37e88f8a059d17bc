"""Routing quality: every strategy against the ideal queue, on one heterogeneous SIMULATED fleet.

For each scenario (offered load as a fraction of capacity: Poisson requests with no prompt reuse; the
same with part of the load bypassing the balancer; conversations whose turns reuse their history) one
seeded workload is generated, served by the ideal queue (a discrete-event simulation with the
simulator's own service model and prompt cache) and replayed in real time through each strategy in
front of a fresh simulator. Prints progress and a table, writes bench/results/latest.json (with
``--append``, adds to it, replacing rows of the same strategy, scenario and load) and a PNG of TTFT
distributions. Per run, ``cached_token_ratio`` is the simulator's count of prompt tokens reused from
its cache over all prompt tokens. Peers (bench/peers.sh) that are not installed are skipped, and so
are chat-only peers in the /completion scenarios.

    python -m bench.routing.run --conversation-load 0        # the Poisson and bypass report
    python -m bench.routing.run --loads 0.8 --bypass-load 0 --conversation-load 0.8 \
        --strategies leastconn,paddler-haproxy-slots-only,paddler-haproxy-affinity,sglang-cache_aware
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.routing.loadgen import (
    Conversation,
    ConversationConfig,
    Result,
    TraceConfig,
    capacity_requests_per_second,
    conversation_trace,
    make_conversations,
    make_trace,
    mean_output_tokens,
    mean_prompt_tokens,
    new_prompt_tokens,
    replay,
    replay_conversations,
)
from bench.routing.model import RequestSpec, ServerSpec, ideal
from bench.routing.simulator import parse_fleet
from bench.routing.strategies import (
    CHAT_ONLY,
    DEFAULT_BUFFER,
    SESSION_HEADER,
    STRATEGIES,
    Buffer,
    PeerFailed,
    peer,
    peer_command,
    peer_version,
    proxy_report,
    run_strategy,
)
from devstack.processes import http_get, wait_until

DEFAULT_FLEET = "a:2:6,b:4:8,c:4:10,d:8:12"  # name:slots:token_ms — heterogeneous slots and speeds
RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class Scenario:
    name: str  # "poisson", "bypass" (open loop, /completion) or "conversation" (chat sessions)
    load: float
    pattern: str = "poisson"
    bypass_fraction: float = 0.0


@dataclass
class Workload:
    """A scenario's requests: the trace the ideal serves, and for conversations the sessions replayed."""

    trace: list[RequestSpec]
    conversations: list[Conversation] | None = None
    rate: float = 0.0  # requests (Poisson) or sessions (conversations) per second


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(trace: list[RequestSpec], ttfts: list[float], e2es: list[float], completed: int, non_2xx: int,
              deferrals: int, finished_at: float) -> dict[str, Any]:
    return {
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99), "e2e_p99_s": percentile(e2es, 99),
        "non_2xx": non_2xx, "deferrals": deferrals, "sent": len(trace), "completed": completed,
        "throughput_rps": completed / finished_at if finished_at > 0 else 0.0,
    }


def ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def ideal_run(trace: list[RequestSpec], fleet: list[ServerSpec]) -> tuple[dict[str, Any], list[float]]:
    """The ideal queue's row and its sorted TTFTs."""
    outcomes = ideal(trace, fleet)
    finished_at = max((o.arrival + o.e2e for o in outcomes), default=0.0)
    row = summarise(trace, [o.ttft for o in outcomes], [o.e2e for o in outcomes], len(outcomes), 0,
                    sum(o.deferred for o in outcomes), finished_at)
    row["cached_token_ratio"] = ratio(sum(o.cached_tokens for o in outcomes), sum(r.prompt_tokens for r in trace))
    return row, sorted(o.ttft for o in outcomes)


def measured_run(trace: list[RequestSpec], results: list[Result], stats: dict[str, dict[str, int]],
                 timeout: float) -> dict[str, Any]:
    """A strategy's row from what the client saw and the simulator's counters (``/sim/stats``)."""
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    refused = [r for r in results if r.status != 200]
    deferrals = sum(server["deferred_total"] for server in stats.values())
    summary = summarise(trace, [r.ttft for r in ok], [r.e2e for r in ok], len(ok), len(refused), deferrals,
                        max((r.sent + r.e2e for r in ok), default=0.0))
    summary["sent"] = len(results)  # a conversation whose turn failed sends none of its later turns
    summary["cached_token_ratio"] = ratio(sum(server["cached_tokens"] for server in stats.values()),
                                          sum(server["prompt_tokens"] for server in stats.values()))
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    if reported:  # what the answers said (timings.cache_n): the measure against real llama-servers
        summary["cached_token_ratio_reported"] = ratio(sum(r.cached_tokens or 0 for r in reported),
                                                       sum(r.prompt_tokens or 0 for r in reported))
    summary["refused_by_status"] = {str(s): sum(1 for r in refused if r.status == s)
                                    for s in sorted({r.status for r in refused})}
    summary["refused_late"] = sum(1 for r in refused if r.e2e > timeout + 1.0)
    summary["slots_polls_per_request"] = ratio(sum(server["slots_polls"] for server in stats.values()), len(results))
    summary["bypassed"] = sum(1 for r in results if r.bypass)
    return summary


class Simulator:
    """A fresh simulator process per run, so its deferral counters belong to that run alone."""

    def __init__(self, fleet_text: str, workdir: Path) -> None:
        self.ports_file = workdir / "sim-ports.json"
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.routing.simulator", "--fleet", fleet_text,
                                      "--ports-file", str(self.ports_file)])
        self.ports: dict[str, int] = wait_until(
            lambda: self.ports_file.exists() and json.loads(self.ports_file.read_text()), timeout=30,
            what="the simulator")

    def _get_json(self, path: str) -> Any:
        """One of the simulator's fleet-wide answers (any server's port serves them)."""
        first = next(iter(self.ports.values()))
        status, body = http_get(f"http://127.0.0.1:{first}{path}")
        if status != 200:
            raise RuntimeError(f"the simulator's {path} answered {status}")
        return json.loads(body)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per server: deferred_total, completed, busy, queued, prompt_tokens, cached_tokens, slots_polls."""
        result: dict[str, dict[str, int]] = self._get_json("/sim/stats")
        return result

    def handoffs(self) -> dict[str, Any]:
        """The simulator's HandOffs report: held_while_free_s, requests, requests_with_send_time."""
        report: dict[str, Any] = self._get_json("/sim/handoffs")
        return report

    def progress(self, what: str, every: float = 15.0) -> threading.Event:
        """Print how many requests the fleet has answered every ``every`` seconds until the event is set."""
        done = threading.Event()
        started = time.monotonic()

        def report() -> None:
            while not done.wait(every):
                try:
                    answered = sum(server["completed"] for server in self.stats().values())
                except (OSError, RuntimeError):
                    continue
                print(f"    {what}: {answered} answered after {time.monotonic() - started:.0f} s", flush=True)

        threading.Thread(target=report, daemon=True).start()
        return done

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


Distributions = dict[tuple[str, float, str], list[float]]


def workload(scenario: Scenario, fleet: list[ServerSpec], seed: int, duration: float) -> Workload:
    """The scenario's seeded requests at ``scenario.load`` of the fleet's capacity (loadgen's definition: output
    at full-batch speed plus uncached prompt; for conversations, the prompt a perfect cache would still read)."""
    if scenario.name == "conversation":
        sample = conversation_trace(make_conversations(ConversationConfig(seed=seed + 1, duration=300.0)))
        new = new_prompt_tokens(sample)
        capacity = capacity_requests_per_second(fleet, sum(r.output_tokens for r in sample) / len(sample),
                                                sum(new) / len(new))
        turns_per_session = len(sample) / sum(1 for r in sample if r.follows is None)
        rate = scenario.load * capacity / turns_per_session
        conversations = make_conversations(ConversationConfig(seed=seed, duration=duration, session_rate=rate))
        return Workload(conversation_trace(conversations), conversations, rate)
    config = TraceConfig(seed=seed, duration=duration, pattern=scenario.pattern)
    rate = scenario.load * capacity_requests_per_second(fleet, mean_output_tokens(config), mean_prompt_tokens(config))
    return Workload(make_trace(TraceConfig(seed=seed, duration=duration, rate=rate, pattern=scenario.pattern)),
                    rate=rate)


def peer_report(strategy: str, servers: dict[str, str], slots: dict[str, int],
                buffer: Buffer) -> dict[str, Any] | None:
    """A peer's package, version and exact flags (or a plain proxy's config; ports as 0, servers as 127.0.0.1:9000
    on: they change per run), for the report."""
    placeholders = {name: f"127.0.0.1:{9000 + index}" for index, name in enumerate(servers)}
    found = peer(strategy)
    if found is None:
        return proxy_report(strategy, placeholders, slots, buffer)
    command = peer_command(strategy, placeholders, slots, 0, 0, buffer)
    flags = command[command.index("sglang_router.launch_router") + 1:] if found[0] == "sglang-router" else command[1:]
    return {"package": found[0], "version": peer_version(strategy), "flags": flags}


def run(fleet_text: str, scenarios: list[Scenario], strategies: list[str], seed: int, duration: float,
        agent_interval: str, conversation_duration: float,
        buffer: Buffer) -> tuple[list[dict[str, Any]], Distributions]:
    fleet = parse_fleet(fleet_text)
    slots = {spec.name: spec.slots for spec in fleet}
    bypass_target = max(fleet, key=lambda spec: spec.slots).name
    runs = []
    ttfts: Distributions = {}
    for scenario in scenarios:
        chat = scenario.name == "conversation"
        work = workload(scenario, fleet, seed, conversation_duration if chat else duration)
        reference, ttfts[scenario.name, scenario.load, "ideal"] = ideal_run(work.trace, fleet)
        print(f"{scenario.name} at {scenario.load:.0%}: {len(work.trace)} requests "
              f"({work.rate:.2f} {'sessions' if chat else 'requests'}/s)", flush=True)
        rows = [{"strategy": "ideal", **reference, "scenario": scenario.name, "load": scenario.load}]
        _vs_ideal(rows[0], reference)
        print(format_row(rows[0]), flush=True)
        for strategy in strategies:
            if peer(strategy) is not None and peer_version(strategy) is None:
                print(f"  {strategy}: skipped, not installed (bash bench/peers.sh)", flush=True)
                continue
            if strategy in CHAT_ONLY and not chat:
                print(f"  {strategy}: skipped, it serves the chat API only", flush=True)
                continue
            print(f"  {strategy}: running", flush=True)
            try:
                row = _measure(strategy, work, fleet_text, slots, scenario, bypass_target, agent_interval, seed,
                               buffer, ttfts)
            except PeerFailed as exc:
                print(f"  {strategy}: skipped, {exc}", flush=True)
                continue
            rows.append(row)
            row.update(scenario=scenario.name, load=scenario.load)
            _vs_ideal(row, reference)
            print(format_row(row), flush=True)
        runs.extend(rows)
    return runs, ttfts


def _measure(strategy: str, work: Workload, fleet_text: str, slots: dict[str, int], scenario: Scenario,
             bypass_target: str, agent_interval: str, seed: int, buffer: Buffer,
             ttfts: Distributions) -> dict[str, Any]:
    """One strategy in front of a fresh simulator: its row (TTFTs go into ``ttfts``)."""
    with tempfile.TemporaryDirectory(prefix=f"route-{strategy}-") as tmp:
        simulator = Simulator(fleet_text, Path(tmp))
        try:
            servers = {name: f"127.0.0.1:{port}" for name, port in simulator.ports.items()}
            with run_strategy(strategy, servers, slots, Path(tmp) / "lb", agent_interval, buffer) as url:
                done = simulator.progress(strategy)
                try:
                    if work.conversations is not None:
                        results = asyncio.run(replay_conversations(work.conversations, url,
                                                                   session_header=strategy in SESSION_HEADER))
                    else:
                        bypass_url = f"http://{servers[bypass_target]}" if scenario.bypass_fraction else None
                        results = asyncio.run(replay(work.trace, url, bypass_url, scenario.bypass_fraction,
                                                     seed))
                finally:
                    done.set()
            row = {"strategy": strategy, **measured_run(work.trace, results, simulator.stats(), buffer.timeout),
                   "held_while_free_s": simulator.handoffs()["held_while_free_s"]}
            report = peer_report(strategy, servers, slots, buffer)
            if report is not None:
                row["peer"] = report
            ttfts[scenario.name, scenario.load, strategy] = sorted(
                r.ttft for r in results if r.status == 200 and r.ttft is not None)
            return row
        finally:
            simulator.stop()


def _vs_ideal(row: dict[str, Any], reference: dict[str, Any]) -> None:
    ideal_p99 = reference["ttft_p99_s"]
    row["ttft_p99_vs_ideal"] = (row["ttft_p99_s"] / ideal_p99) if row["ttft_p99_s"] and ideal_p99 else None


def fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def format_row(row: dict[str, Any]) -> str:
    ratio = row["ttft_p99_vs_ideal"]
    return (f"{row['scenario']:12} {row['load']:>5.2f} {row['strategy']:26} ttft p50 {fmt(row['ttft_p50_s']):>7} "
            f"p99 {fmt(row['ttft_p99_s']):>7} ({'-' if ratio is None else f'{ratio:.2f}x'} ideal)  "
            f"e2e p99 {fmt(row['e2e_p99_s']):>7}  non-2xx {row['non_2xx']:>3}  deferrals {row['deferrals']:>3}  "
            f"{row['throughput_rps']:.2f} req/s  {row['completed']}/{row['sent']}  cached "
            f"{fmt(row.get('cached_token_ratio'), '')}  held while a slot was free {fmt(row.get('held_while_free_s'))}")


def plot(ttfts: Distributions, path: Path) -> None:
    """One panel per scenario: the cumulative distribution of TTFT for each strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys((scenario, load) for scenario, load, _ in ttfts))
    figure, axes = plt.subplots(1, len(scenarios), figsize=(4 * len(scenarios), 3.6), sharey=True, squeeze=False)
    for axis, (scenario, load) in zip(axes[0], scenarios, strict=False):
        for (name, at, strategy), values in ttfts.items():
            if (name, at) == (scenario, load) and values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                axis.step([max(v, 1e-3) for v in values], fractions, where="post", label=strategy,
                          linewidth=2.2 if strategy == "ideal" else 1.3)
        axis.set_title(f"{scenario} at {load:.0%} of capacity", fontsize=9)
        axis.set_xscale("log")
        axis.set_xlabel("time to first token (s)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", default=DEFAULT_FLEET, help=f"name:slots:token_ms,... (default {DEFAULT_FLEET})")
    parser.add_argument("--loads", default="0.5,0.8,0.95,1.2", help="offered loads as fractions of capacity")
    parser.add_argument("--bypass-load", type=float, default=0.8, help="load of the bypass scenario (0: skip it)")
    parser.add_argument("--bypass-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals per open-loop run")
    parser.add_argument("--conversation-load", type=float, default=0.8, help="load of the conversation scenario "
                        "(0: skip it)")
    parser.add_argument("--conversation-duration", type=float, default=100.0,
                        help="seconds during which conversations start")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--agent-interval", default="1s")
    parser.add_argument("--max-buffered-requests", type=int, default=DEFAULT_BUFFER.requests,
                        help="requests that may wait for a slot, in every strategy that has a queue")
    parser.add_argument("--buffered-request-timeout", type=float, default=DEFAULT_BUFFER.timeout,
                        help="seconds a request may wait for a slot, in every strategy that has a queue")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the output's other runs (rows of the same strategy, scenario and load are replaced)")
    args = parser.parse_args()

    scenarios = [Scenario("poisson", float(load)) for load in filter(None, args.loads.split(","))]
    if args.bypass_load:
        scenarios.append(Scenario("bypass", args.bypass_load, bypass_fraction=args.bypass_fraction))
    if args.conversation_load:
        scenarios.append(Scenario("conversation", args.conversation_load))
    buffer = Buffer(args.max_buffered_requests, args.buffered_request_timeout)
    runs, ttfts = run(args.fleet, scenarios, args.strategies.split(","), args.seed, args.duration,
                      args.agent_interval, args.conversation_duration, buffer)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.output.exists():
        fresh = {(row["strategy"], row["scenario"], row["load"]) for row in runs}
        kept = [row for row in json.loads(args.output.read_text())["runs"]
                if (row["strategy"], row["scenario"], row["load"]) not in fresh]
        cells = list(dict.fromkeys((row["scenario"], row["load"]) for row in kept + runs))
        runs = sorted(kept + runs, key=lambda row: (cells.index((row["scenario"], row["load"])),
                                                    row["strategy"] != "ideal"))  # stable: each cell's ideal first
    args.output.write_text(json.dumps({"fleet": args.fleet, "seed": args.seed, "duration_s": args.duration,
                                       "conversation_duration_s": args.conversation_duration,
                                       "agent_interval": args.agent_interval, "buffer": buffer._asdict(),
                                       "runs": runs}, indent=1) + "\n")
    if args.append:  # the kept rows' TTFTs are not stored: a plot of this run alone would replace the report's
        print(f"wrote {args.output} (the plot is left as it was)")
    else:
        plot(ttfts, args.output.with_suffix(".png"))
        print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
