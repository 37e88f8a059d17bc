"""How much the choice of server costs, apart from everything else: the ideal queue (one perfect FIFO, exact
instant knowledge, bench.routing.model.ideal) with its own placement rule and with the rules the balancers
use, on the same seeded traces. SIMULATED service model, virtual time: no proxy, no agent, no clock, so
tens of thousands of requests per cell in seconds, and a p99 that is not one of a few slow requests.

What a live run adds on top (knowledge one poll old, the proxy's and agent's own time, a loaded host) is
the difference between this and ``bench.routing.run``. ``--slower`` shows how sensitive the ideal's own p99 is
to that: the same trace on a fleet a few percent slower than the model (a hand-off between a finished request
and the next costs a live balancer at least one decode step, which the ideal's instant hand-off does not).

On conversations (``--scenario conversation``) it also compares affinity rules: a turn sent back to the server
that took the previous one only when that server has a slot free (what ships), or held for it up to a budget
(``--affinity-wait``, or its re-prefill elsewhere); ``--prompt-ratio`` sets how much cheaper a prompt token is than
a decode step (a GPU's 80 by default; CPUs and Apple silicon are far lower).

    python -m bench.routing.placement --fleet a:1:6,b:2:9,c:3:12,d:4:15,e:6:17 --fleet a:8:6,b:1:18,c:4:12,d:2:9
    python -m bench.routing.placement --scenario conversation --fleet a:2:6,b:4:8,c:4:10,d:8:12 --prompt-ratio 10 \
        --baseline "leastconn, weight idle (paddler-haproxy)" --affinity-wait 0.5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace

from agentcheck.policy import speed_class
from bench.routing.model import Hold, Placement, RequestSpec, ServerState, first_token_soonest, ideal
from bench.routing.run import Scenario, percentile, workload
from bench.routing.simulator import parse_fleet

Key = Callable[[ServerState, float], tuple[float, ...]]  # (a server, the fleet's fastest token_ms) → its key


def lowest(key: Key) -> Placement:
    """The server with a free slot whose key is lowest; servers come sorted by name, so ties go by name."""
    def place(servers: list[ServerState], _: RequestSpec, _waited: float) -> int | None:
        fastest = min(state.spec.token_ms for state in servers)
        free = [index for index, state in enumerate(servers) if state.free > 0]
        return min(free, key=lambda index: key(servers[index], fastest), default=None)
    return place


def _leastconn_idle(state: ServerState) -> float:
    """HAProxy leastconn with the agent's default weight (idle fraction): connections over weight, with
    the weight as if polled this instant."""
    return (state.busy + 1) * state.spec.slots / state.free


Budget = Callable[[ServerState, RequestSpec], float]  # (the server it would go to instead, the request) → s


def reprefill(other: ServerState, request: RequestSpec) -> float:
    """The issue's load guard: as long as re-reading the uncached prompt on the other server would take."""
    return other.spec.prompt_seconds(request.prompt_tokens - other.cached_if_sent(request))


def affine(fallback: Placement, budget: Budget | None = None) -> Callable[[], Placement]:
    """A conversation's next turn goes to the server that took its previous turn when that one has a slot free
    (the balancers' affinity, docs/affinity.md), else where ``fallback`` puts it. With ``budget``, while that
    server is full the turn is held instead, for as long as the budget for the fallback's choice, counted from
    when it was first held (another server had a slot free). Stateful: one per run."""
    def make() -> Placement:
        served: dict[int, int] = {}  # request id → the server it went to
        held: dict[int, float] = {}  # request id → how long it had waited when first held

        def place(servers: list[ServerState], request: RequestSpec, waited: float) -> int | Hold | None:
            home = served.get(request.follows) if request.follows is not None else None
            choice = home if home is not None and servers[home].free > 0 else fallback(servers, request, waited)
            if budget is not None and isinstance(choice, int) and home is not None and choice != home:
                since = waited - held.setdefault(request.id, waited)
                allowed = budget(servers[choice], request)
                if since < allowed - 1e-9:
                    return Hold(allowed - since)
            if isinstance(choice, int):
                served[request.id] = choice
            return choice
        return place
    return make


LEASTCONN_IDLE = lowest(lambda state, _: (_leastconn_idle(state),))

# Each rule as a maker of a fresh placement per run (an affinity rule remembers where each turn went).
RULES: dict[str, Callable[[], Placement]] = {
    "ideal (first token soonest)": lambda: first_token_soonest,
    "most free slots (Paddler)": lambda: lowest(lambda state, _: (-state.free,)),
    "leastconn, weight idle (paddler-haproxy)": lambda: LEASTCONN_IDLE,
    "leastconn, weight idle x speed": lambda: lowest(
        lambda state, fastest: (_leastconn_idle(state) * state.spec.token_ms / fastest,)),
    "speed class, then most free (paddler-envoy)": lambda: lowest(
        lambda state, fastest: (speed_class(state.spec.token_ms, fastest), -state.free)),
    "leastconn + affinity when free (paddler-haproxy-affinity)": affine(LEASTCONN_IDLE),
    "leastconn + affinity, waits up to the re-prefill": affine(LEASTCONN_IDLE, reprefill),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", action="append", help="name:slots:token_ms,... (repeat for several fleets)")
    parser.add_argument("--load", type=float, default=0.8, help="offered load as a fraction of capacity")
    parser.add_argument("--scenario", choices=["poisson", "conversation"], default="poisson")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of arrivals (virtual time)")
    parser.add_argument("--prompt-ratio", type=float, default=None,
                        help="every server's prompt tokens per decode-step time (default: the fleet's, else "
                        "PP_TG_RATIO, a GPU's; a CPU's is nearer 5)")
    parser.add_argument("--affinity-wait", type=float, action="append", default=[],
                        help="also leastconn + affinity waiting up to this many seconds (repeatable)")
    parser.add_argument("--baseline", choices=list(RULES), default="ideal (first token soonest)",
                        help="the rule the others are a multiple of")
    parser.add_argument("--slower", default="", help="also the ideal on the fleet slower by these factors "
                        "(comma-separated, e.g. 1.02,1.05)")
    args = parser.parse_args()
    slower = [float(factor) for factor in filter(None, args.slower.split(","))]
    # Without conversations the affinity rules are their fallback's rule.
    rules = {name: make for name, make in RULES.items() if args.scenario == "conversation" or "affinity" not in name}
    for wait in args.affinity_wait if args.scenario == "conversation" else ():
        rules[f"leastconn + affinity, waits up to {wait:g} s"] = affine(LEASTCONN_IDLE, lambda *_, wait=wait: wait)

    ratios: dict[str, list[float]] = {name: [] for name in rules}
    for fleet_text in args.fleet or ["a:1:6,b:2:9,c:3:12,d:4:15,e:6:17"]:
        fleet = parse_fleet(fleet_text)
        if args.prompt_ratio is not None:
            fleet = [replace(spec, prompt_ms_per_token=spec.token_ms / args.prompt_ratio) for spec in fleet]
        ratio = fleet[0].token_ms / fleet[0].prompt_ms
        print(f"fleet {fleet_text}, {args.scenario} at {args.load:.0%}, prompt {ratio:g}x faster per token than a "
              f"decode step: TTFT p99 s (multiple of {args.baseline}'s), cached share")
        for seed in range(1, args.seeds + 1):
            trace = workload(Scenario(args.scenario, args.load), fleet, seed, args.duration).trace
            outcomes = {name: ideal(trace, fleet, make()) for name, make in rules.items()}
            p99 = {name: percentile([o.ttft for o in got], 99) for name, got in outcomes.items()}
            reference = p99[args.baseline]
            assert reference is not None
            prompt = sum(request.prompt_tokens for request in trace)
            cells = []
            for name, value in p99.items():
                assert value is not None
                ratios[name].append(value / reference)
                cached = sum(o.cached_tokens for o in outcomes[name]) / prompt
                cells.append(f"{name} {value:.3f} ({value / reference:.2f}x, {cached:.2f})")
            print(f"  seed {seed}, {len(trace)} requests: " + "; ".join(cells), flush=True)
            for factor in slower:
                slow = [replace(spec, token_ms=spec.token_ms * factor, prompt_ms_per_token=spec.prompt_ms * factor)
                        for spec in fleet]
                value = percentile([o.ttft for o in ideal(trace, slow)], 99)
                assert value is not None
                print(f"    the ideal on a fleet {factor:g}x slower: {value:.3f} ({value / reference:.2f}x)",
                      flush=True)
    print(f"geometric mean of the p99 ratios to {args.baseline}, and their range:")
    for name, values in ratios.items():
        mean = math.exp(statistics.fmean(math.log(value) for value in values))
        print(f"  {name:58} {mean:.2f}x  ({min(values):.2f}-{max(values):.2f}x over {len(values)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
