"""Routing quality: every strategy against the ideal queue, on one heterogeneous SIMULATED fleet.

For each scenario (offered load as a fraction of capacity; plus one where part of the load
bypasses the balancer) one seeded trace is generated, served by the ideal queue (a discrete-event
simulation with the simulator's own service model) and replayed in real time through each strategy
in front of a fresh simulator. Prints a table, writes bench/results/latest.json and a PNG of TTFT
distributions.

    python -m bench.routing.run                                   # the default report (< 10 min)
    python -m bench.routing.run --fleet a:2:8,b:8:12 --loads 0.5,0.9 --seed 7 --strategies paddler-haproxy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.routing.loadgen import Result, TraceConfig, capacity_requests_per_second, make_trace, replay
from bench.routing.model import RequestSpec, ServerSpec, ideal
from bench.routing.simulator import parse_fleet
from bench.routing.strategies import STRATEGIES, run_strategy
from devstack.processes import http_get, wait_until
from fleet import BalancerConfig

DEFAULT_FLEET = "a:2:6,b:4:8,c:4:10,d:8:12"  # name:slots:token_ms — heterogeneous slots and speeds
RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class Scenario:
    name: str
    load: float
    pattern: str = "poisson"
    bypass_fraction: float = 0.0


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


def ideal_run(trace: list[RequestSpec], fleet: list[ServerSpec]) -> dict[str, Any]:
    outcomes = ideal(trace, fleet)
    arrival = {r.id: r.arrival for r in trace}
    finished_at = max((arrival[o.id] + o.e2e for o in outcomes), default=0.0)
    return summarise(trace, [o.ttft for o in outcomes], [o.e2e for o in outcomes], len(outcomes), 0,
                     sum(o.deferred for o in outcomes), finished_at)


def measured_run(trace: list[RequestSpec], results: list[Result], deferrals: int,
                 timeout: float) -> dict[str, Any]:
    arrival = {r.id: r.arrival for r in trace}
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    refused = [r for r in results if r.status != 200]
    summary = summarise(trace, [r.ttft for r in ok], [r.e2e for r in ok], len(ok), len(refused), deferrals,
                        max((arrival[r.id] + r.e2e for r in ok), default=0.0))
    summary["refused_by_status"] = {str(s): sum(1 for r in refused if r.status == s)
                                    for s in sorted({r.status for r in refused})}
    summary["refused_late"] = sum(1 for r in refused if r.e2e > timeout + 1.0)
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

    def deferrals(self) -> int:
        first = next(iter(self.ports.values()))
        status, body = http_get(f"http://127.0.0.1:{first}/sim/stats")
        return sum(server["deferred_total"] for server in json.loads(body).values()) if status == 200 else -1

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


Distributions = dict[tuple[str, float, str], list[float]]


def run(fleet_text: str, scenarios: list[Scenario], strategies: list[str], seed: int, duration: float,
        agent_interval: str) -> tuple[list[dict[str, Any]], Distributions]:
    fleet = parse_fleet(fleet_text)
    slots = {spec.name: spec.slots for spec in fleet}
    bypass_target = max(fleet, key=lambda spec: spec.slots).name
    timeout = BalancerConfig().buffered_request_timeout
    runs = []
    ttfts: Distributions = {}
    for scenario in scenarios:
        config = TraceConfig(seed=seed, duration=duration, pattern=scenario.pattern)
        rate = scenario.load * capacity_requests_per_second(fleet, config)
        trace = make_trace(TraceConfig(seed=seed, duration=duration, rate=rate, pattern=scenario.pattern))
        reference = ideal_run(trace, fleet)
        ttfts[scenario.name, scenario.load, "ideal"] = sorted(o.ttft for o in ideal(trace, fleet))
        rows = [{"strategy": "ideal", **reference}]
        for strategy in strategies:
            with tempfile.TemporaryDirectory(prefix=f"route-{strategy}-") as tmp:
                simulator = Simulator(fleet_text, Path(tmp))
                try:
                    servers = {name: f"127.0.0.1:{port}" for name, port in simulator.ports.items()}
                    with run_strategy(strategy, servers, slots, Path(tmp) / "lb", agent_interval) as url:
                        bypass_url = f"http://{servers[bypass_target]}" if scenario.bypass_fraction else None
                        results = asyncio.run(replay(trace, url, bypass_url, scenario.bypass_fraction, seed))
                    rows.append({"strategy": strategy,
                                 **measured_run(trace, results, simulator.deferrals(), timeout)})
                    ttfts[scenario.name, scenario.load, strategy] = sorted(
                        r.ttft for r in results if r.status == 200 and r.ttft is not None)
                finally:
                    simulator.stop()
        for row in rows:
            ideal_p99 = reference["ttft_p99_s"]
            row.update(scenario=scenario.name, load=scenario.load,
                       ttft_p99_vs_ideal=(row["ttft_p99_s"] / ideal_p99) if row["ttft_p99_s"] and ideal_p99 else None)
            runs.append(row)
            print(format_row(row), flush=True)
    return runs, ttfts


def fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def format_row(row: dict[str, Any]) -> str:
    ratio = row["ttft_p99_vs_ideal"]
    return (f"{row['scenario']:12} {row['load']:>5.2f} {row['strategy']:16} ttft p50 {fmt(row['ttft_p50_s']):>7} "
            f"p99 {fmt(row['ttft_p99_s']):>7} ({'-' if ratio is None else f'{ratio:.2f}x'} ideal)  "
            f"e2e p99 {fmt(row['e2e_p99_s']):>7}  non-2xx {row['non_2xx']:>3}  deferrals {row['deferrals']:>3}  "
            f"{row['throughput_rps']:.2f} req/s  {row['completed']}/{row['sent']}")


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
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals per run")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--agent-interval", default="1s")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()

    scenarios = [Scenario("poisson", float(load)) for load in args.loads.split(",")]
    if args.bypass_load:
        scenarios.append(Scenario("bypass", args.bypass_load, bypass_fraction=args.bypass_fraction))
    runs, ttfts = run(args.fleet, scenarios, args.strategies.split(","), args.seed, args.duration,
                      args.agent_interval)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"fleet": args.fleet, "seed": args.seed, "duration_s": args.duration,
                                       "agent_interval": args.agent_interval, "runs": runs}, indent=1) + "\n")
    plot(ttfts, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
