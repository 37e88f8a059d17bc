"""Does the simulator's ranking of strategies hold on real llama-servers? A smaller run to check.

Two real llama-servers (tiny model, 2 and 4 slots, one thread each) behind each strategy, the same
seeded open-loop trace for all, at ``--load`` of the fleet's measured token throughput. llama.cpp
has no cumulative deferral counter, so ``llamacpp:requests_deferred`` is sampled every 20 ms and
reported as deferred-request-seconds.

    python -m bench.routing.real_check --load 0.9 --duration 12
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.routing.loadgen import TraceConfig, make_trace, mean_output_tokens, replay
from bench.routing.run import percentile
from bench.routing.strategies import STRATEGIES, run_strategy
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LlamaServer
from devstack.sampling import DeferralWatch

# The tiny model on one core makes ~1,250 tokens/s per server whatever the batch (measured; see
# docs/agent.md), so the fleet's capacity is about twice that.
TOKENS_PER_SECOND_PER_SERVER = 1250.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()

    # The tiny model's byte-level vocabulary makes each prompt character a token (the load generator
    # sends 4 characters per prompt token): cap prompts so prompt + output fit a 2,048-token slot.
    shape = {"prompt_median": 40, "prompt_max": 200, "output_median": 120, "output_max": 1000}
    config = TraceConfig(seed=args.seed, duration=args.duration, **shape)
    rate = args.load * 2 * TOKENS_PER_SECOND_PER_SERVER / mean_output_tokens(config)
    trace = make_trace(TraceConfig(seed=args.seed, duration=args.duration, rate=rate, **shape))
    print(f"real llama-servers (2 and 4 slots), {len(trace)} requests at {rate:.1f}/s ({args.load:.0%} load)")
    with tempfile.TemporaryDirectory(prefix="real-check-") as tmp:
        workdir = Path(tmp)
        model = write_tiny_model(workdir / "tiny.gguf")
        servers = [LlamaServer(llama_server_binary(), model, workdir, slots=slots, name=name, ctx_per_slot=2048)
                   for name, slots in (("small", 2), ("large", 4))]
        with servers[0], servers[1]:
            addresses = {s.name: s.address for s in servers}
            for strategy in args.strategies.split(","):
                with run_strategy(strategy, addresses, {s.name: s.slots for s in servers},
                                  workdir / strategy) as url, DeferralWatch({s.name: s for s in servers}) as meter:
                    results = asyncio.run(replay(trace, url, seed=args.seed))
                ok = [r.ttft for r in results if r.status == 200 and r.ttft is not None]
                print(f"{strategy:16} ttft p50 {percentile(ok, 50):.3f}s  p99 {percentile(ok, 99):.3f}s  "
                      f"non-2xx {sum(r.status != 200 for r in results)}  "
                      f"llama.cpp deferred-request-seconds {meter.deferred_seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
