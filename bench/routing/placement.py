"""How much the choice of server costs, apart from everything else: the ideal queue (one perfect FIFO, exact
instant knowledge, bench.routing.model.ideal) with its own placement rule and with the rules the balancers
use, on the same seeded traces. SIMULATED service model, virtual time: no proxy, no agent, no clock, so
tens of thousands of requests per cell in seconds, and a p99 that is not one of a few slow requests.

What a live run adds on top (knowledge one poll old, the proxy's and agent's own time, a loaded host) is
the difference between this and ``bench.routing.run``. ``--slower`` shows how sensitive the ideal's own p99 is
to that: the same trace on a fleet a few percent slower than the model (a hand-off between a finished request
and the next costs a live balancer at least one decode step, which the ideal's instant hand-off does not).

    python -m bench.routing.placement --fleet a:1:6,b:2:9,c:3:12,d:4:15,e:6:17 --fleet a:8:6,b:1:18,c:4:12,d:2:9
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace

from agentcheck.policy import speed_class
from bench.routing.model import Placement, RequestSpec, ServerState, first_token_soonest, ideal
from bench.routing.run import Scenario, percentile, workload
from bench.routing.simulator import parse_fleet

Key = Callable[[ServerState, float], tuple[float, ...]]  # (a server, the fleet's fastest token_ms) → its key


def lowest(key: Key) -> Placement:
    """The server with a free slot whose key is lowest; servers come sorted by name, so ties go by name."""
    def place(servers: list[ServerState], _: RequestSpec) -> int | None:
        fastest = min(state.spec.token_ms for state in servers)
        free = [index for index, state in enumerate(servers) if state.free > 0]
        return min(free, key=lambda index: key(servers[index], fastest), default=None)
    return place


def _leastconn_idle(state: ServerState) -> float:
    """HAProxy leastconn with the agent's default weight (idle fraction): connections over weight, with
    the weight as if polled this instant."""
    return (state.busy + 1) * state.spec.slots / state.free


PLACEMENTS: dict[str, Placement] = {
    "ideal (first token soonest)": first_token_soonest,
    "most free slots (Paddler)": lowest(lambda state, _: (-state.free,)),
    "leastconn, weight idle (paddler-haproxy)": lowest(lambda state, _: (_leastconn_idle(state),)),
    "leastconn, weight idle x speed": lowest(
        lambda state, fastest: (_leastconn_idle(state) * state.spec.token_ms / fastest,)),
    "speed class, then most free (paddler-envoy)": lowest(
        lambda state, fastest: (speed_class(state.spec.token_ms, fastest), -state.free)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", action="append", help="name:slots:token_ms,... (repeat for several fleets)")
    parser.add_argument("--load", type=float, default=0.8, help="offered load as a fraction of capacity")
    parser.add_argument("--scenario", choices=["poisson", "conversation"], default="poisson")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of arrivals (virtual time)")
    parser.add_argument("--slower", default="", help="also the ideal on the fleet slower by these factors "
                        "(comma-separated, e.g. 1.02,1.05)")
    args = parser.parse_args()
    slower = [float(factor) for factor in filter(None, args.slower.split(","))]

    ratios: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    for fleet_text in args.fleet or ["a:1:6,b:2:9,c:3:12,d:4:15,e:6:17"]:
        fleet = parse_fleet(fleet_text)
        print(f"fleet {fleet_text}, {args.scenario} at {args.load:.0%}: TTFT p99 s (multiple of the ideal's)")
        for seed in range(1, args.seeds + 1):
            trace = workload(Scenario(args.scenario, args.load), fleet, seed, args.duration).trace
            p99 = {name: percentile([o.ttft for o in ideal(trace, fleet, place)], 99)
                   for name, place in PLACEMENTS.items()}
            reference = p99["ideal (first token soonest)"]
            assert reference is not None
            cells = []
            for name, value in p99.items():
                assert value is not None
                ratios[name].append(value / reference)
                cells.append(f"{name} {value:.3f} ({value / reference:.2f}x)")
            print(f"  seed {seed}, {len(trace)} requests: " + "; ".join(cells), flush=True)
            for factor in slower:
                slow = [replace(spec, token_ms=spec.token_ms * factor, prompt_ms_per_token=spec.prompt_ms * factor)
                        for spec in fleet]
                value = percentile([o.ttft for o in ideal(trace, slow)], 99)
                assert value is not None
                print(f"    the ideal on a fleet {factor:g}x slower: {value:.3f} ({value / reference:.2f}x)",
                      flush=True)
    print("geometric mean of the p99 ratios to the ideal rule, and their range:")
    for name, values in ratios.items():
        mean = math.exp(statistics.fmean(math.log(value) for value in values))
        print(f"  {name:45} {mean:.2f}x  ({min(values):.2f}-{max(values):.2f}x over {len(values)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
