"""Does the simulator's ranking of strategies hold on real llama-servers? A smaller run to check.

Two real llama-servers (tiny model, 2 and 4 slots, one thread each) behind each strategy, the same
seeded open-loop trace for all, at ``--load`` of the fleet's measured token throughput. llama.cpp
has no cumulative deferral counter, so ``llamacpp:requests_deferred`` is sampled every 20 ms and
reported as deferred-request-seconds.

``--conversation``: three real llama-servers (2 slots each) and the seeded conversation workload, scaled to
the tiny model's 2,048-token slots; per strategy, the share of follow-up turns that took at least half their
prompt from llama-server's cache (``timings.cache_n``) and their time to first token.

    python -m bench.routing.real_check --load 0.9 --duration 12
    python -m bench.routing.real_check --conversation --duration 30 \
        --strategies leastconn,paddler-haproxy-slots-only,paddler-haproxy-affinity,paddler-envoy,paddler-envoy-affinity
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.routing.loadgen import (
    ConversationConfig,
    Result,
    TraceConfig,
    make_conversations,
    make_trace,
    mean_output_tokens,
    replay,
    replay_conversations,
)
from bench.routing.run import percentile
from bench.routing.strategies import STRATEGIES, run_strategy
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LlamaServer
from devstack.sampling import DeferralWatch

# The tiny model on one core makes ~1,250 tokens/s per server whatever the batch (measured; see
# docs/agent.md), so the fleet's capacity is about twice that.
TOKENS_PER_SECOND_PER_SERVER = 1250.0
# The conversation workload in the tiny model's terms (each prompt character is a token, 4 per generated
# "token" of text): system prompts of 240-600 characters, 3-6 turns, the longest history well inside a slot.
REAL_CONVERSATIONS = {"system_prompts": (60, 90, 120, 150), "turns_min": 3, "turns_max": 6, "question_median": 12,
                      "output_median": 16, "output_max": 48, "think_mean": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--conversation", action="store_true", help="the conversation check (three servers)")
    parser.add_argument("--sessions-per-second", type=float, default=1.0, help="with --conversation")
    args = parser.parse_args()
    if args.conversation:
        conversation_check(args.strategies.split(","), args.seed, args.duration, args.sessions_per_second)
        return

    # The tiny model's byte-level vocabulary makes each prompt character a token (the load generator
    # sends 4 characters per prompt token): cap prompts so prompt + output fit a 2,048-token slot.
    shape = {"prompt_median": 40, "prompt_max": 200, "output_median": 120, "output_max": 1000}
    config = TraceConfig(seed=args.seed, duration=args.duration, **shape)
    rate = args.load * 2 * TOKENS_PER_SECOND_PER_SERVER / mean_output_tokens(config)
    trace = make_trace(TraceConfig(seed=args.seed, duration=args.duration, rate=rate, **shape))
    print(f"real llama-servers (2 and 4 slots), {len(trace)} requests at {rate:.1f}/s ({args.load:.0%} load)")
    for strategy, url, meter in each_strategy({"small": 2, "large": 4}, args.strategies.split(","), "real-check-"):
        results = asyncio.run(replay(trace, url, seed=args.seed))
        ok = [r.ttft for r in results if r.status == 200 and r.ttft is not None]
        print(f"{strategy:16} ttft p50 {percentile(ok, 50):.3f}s  p99 {percentile(ok, 99):.3f}s  "
              f"non-2xx {sum(r.status != 200 for r in results)}  "
              f"llama.cpp deferred-request-seconds {meter.deferred_seconds:.1f}", flush=True)


def conversation_check(strategies: list[str], seed: int, duration: float, rate: float) -> None:
    conversations = make_conversations(ConversationConfig(seed=seed, duration=duration, session_rate=rate,
                                                          **REAL_CONVERSATIONS))
    first_turns = {conversation.first_id for conversation in conversations}
    turns = sum(len(conversation.turns) for conversation in conversations)
    print(f"real llama-servers (3 x 2 slots), {len(conversations)} conversations, {turns} turns, "
          f"{rate:g} sessions/s for {duration:g}s")
    servers = dict.fromkeys(("gpu1", "gpu2", "gpu3"), 2)
    for strategy, url, meter in each_strategy(servers, strategies, "real-conversations-"):
        results = asyncio.run(replay_conversations(conversations, url))
        follow_ups = [r for r in results if r.id not in first_turns and r.status == 200]
        hits = sum(_hit(r) for r in follow_ups)
        ttft = [r.ttft for r in follow_ups if r.ttft is not None]
        print(f"{strategy:26} follow-ups from cache {hits}/{len(follow_ups)} "
              f"({hits / max(1, len(follow_ups)):.0%})  follow-up ttft p50 {percentile(ttft, 50):.3f}s  "
              f"p99 {percentile(ttft, 99):.3f}s  non-2xx {sum(r.status != 200 for r in results)}  "
              f"sent {len(results)}/{turns}  llama.cpp deferred-request-seconds {meter.deferred_seconds:.1f}",
              flush=True)


def each_strategy(slots: dict[str, int], strategies: list[str],
                  prefix: str) -> Iterator[tuple[str, str, DeferralWatch]]:
    """Real llama-servers (the tiny model, one per name with its slots), then each strategy in front of them in
    turn: the strategy, its URL and its deferral meter, running while the caller's loop body does."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, contextlib.ExitStack() as running:
        workdir = Path(tmp)
        model = write_tiny_model(workdir / "tiny.gguf")
        servers = {name: LlamaServer(llama_server_binary(), model, workdir, slots=count, name=name, ctx_per_slot=2048)
                   for name, count in slots.items()}
        for server in servers.values():
            running.enter_context(server)
        addresses = {name: server.address for name, server in servers.items()}
        for strategy in strategies:
            with run_strategy(strategy, addresses, slots, workdir / strategy) as url, DeferralWatch(servers) as meter:
                yield strategy, url, meter


def _hit(result: Result) -> bool:
    """At least half the prompt from llama-server's cache: only the server that served the previous turn holds
    the history; every prompt shares a few template tokens, so "any cached token" would count every turn."""
    return (result.prompt_tokens is not None and result.cached_tokens is not None
            and result.cached_tokens >= result.prompt_tokens / 2)


if __name__ == "__main__":
    main()
