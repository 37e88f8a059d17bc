"""Chaos on real components: kill -9 and restart llama-servers, the agent and the standby under load.

Real llama-servers with 1, 2 and 3 slots plus a 2-slot standby, the real agent (500 ms interval) and
the generated HAProxy or Envoy config, as the issue's reporter ran them. A seeded schedule
(devstack/chaos.py) kills and restarts processes while streaming chats run; every outcome is
counted and ``llamacpp:requests_deferred`` is sampled on every server every 50 ms, per process
incarnation (a restarted server counts from 0 again).

For HAProxy also: alive but busy servers are never marked DOWN, even with both cores saturated by
busy loops, and a killed server is DOWN within a bound measured from the kill.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack import chaos
from devstack.processes import LOOPBACK, LlamaServer, wait_until
from devstack.stack import BalancerStack
from generator.haproxy import BACKEND_NAME

pytestmark = pytest.mark.real

PRIMARIES = {"one": 1, "two": 2, "three": 3}
STANDBY = {"spare": 2}
SLOTS = {**PRIMARIES, **STANDBY}
SEED = 6  # 8 events: 4 kills of primaries (each of the three), 2 of the agent, 2 of the standby
CHAOS_SECONDS = 45.0
CONCURRENCY = 9  # more than the primaries' 6 slots: requests wait in the balancer's queue
REQUESTS = 5000  # more than fit in the deadline on this host: the deadline ends the load
KILL_TO_DOWN_BOUND = 0.3  # seconds; checks 100 ms + 50 ms apart, the rest is a noisy host's margin


def mixed_tokens(index: int) -> int:
    """32 to 224 tokens: short and long streams overlap, so kills cut some mid-stream."""
    return 32 + (index * 37) % 193


@pytest.fixture
def fleet(make_llama: Callable[..., LlamaServer]) -> dict[str, LlamaServer]:
    return {name: make_llama(name, slots=slots).start() for name, slots in SLOTS.items()}


def make_stack(workdir: Path, servers: dict[str, LlamaServer], kind: str) -> BalancerStack:
    return BalancerStack(workdir, {name: servers[name].address for name in PRIMARIES},
                         standby={name: servers[name].address for name in STANDBY}, kind=kind)


class LlamaCppDeferred(AssertionError):
    """llama.cpp queued a request: the balancer gave a server more requests than it has slots."""


# Known and not fixed here; raises= keeps every other assertion strict. Not strict=True: they happen on some
# runs only, so a run without them would turn XPASS into a failure.
HAPROXY_FAST_RESTART = pytest.mark.xfail(raises=LlamaCppDeferred, strict=False, reason=(
    "HAProxy 2.6 (Debian 12's 2.6.12) hands a server that comes back UP with a weight queued requests it does not "
    "count (pendconn_grab_from_px; fixed upstream by 111ea83ed). The agent brings returning and restarted servers "
    "back at 0%, which avoids it unless HAProxy's check brings one UP before the agent's 0% reaches HAProxy "
    "(bench.restart_overcommit: 0 of 60 restarts; 1 of 60 before restarts were recognised by slot task ids)"))
ENVOY_AGENT_DEATH = pytest.mark.xfail(raises=LlamaCppDeferred, strict=False, reason=(
    "Envoy: while the agent is away, the fallback's per-host limit (priority DEFAULT) does not count requests the "
    "picker placed before (priority HIGH), so a 1-slot server still running one can get one more (docs/envoy.md; "
    "seen 50-120 ms after the agent's SIGKILL)"))


@pytest.mark.parametrize("kind", [pytest.param("haproxy", marks=HAPROXY_FAST_RESTART),
                                  pytest.param("envoy", marks=ENVOY_AGENT_DEATH)])
def test_under_seeded_kills_only_requests_on_a_killed_server_fail_and_llama_cpp_never_defers(
        fleet: dict[str, LlamaServer], tmp_path: Path, kind: str) -> None:
    """Every request that is not a complete 200 is excused by a kill (``chaos.unexcused_failures``: it
    overlapped the SIGKILL of llama-server S, from the signal until S was reaped, and its stream named
    S or nothing); the agent's kills excuse nothing, and nor does a server already dead. No request
    outlives the deadline, and ``requests_deferred`` stays 0 on every server in every incarnation."""
    events = chaos.schedule(SEED, CHAOS_SECONDS, list(PRIMARIES), list(STANDBY))
    with make_stack(tmp_path / "lb", fleet, kind) as stack:
        stack.wait_slots(SLOTS)
        runner = chaos.ChaosRunner(events, fleet, stack.agent)
        load = chaos.Load(LOOPBACK, stack.port, REQUESTS, CONCURRENCY, deadline=CHAOS_SECONDS + 5,
                          max_tokens=mixed_tokens)
        with chaos.IncarnationDeferrals(fleet, interval=0.05) as deferrals:
            runner.start()
            ended_in_time = load.run()
            runner.stop()
    unexcused = chaos.unexcused_failures(load.outcomes, runner.kills)
    print(f"{kind}: {chaos.summary(load, runner.kills, deferrals)}")
    print(f"{kind}: deferred samples above 0: {deferrals.nonzero[:20]}")
    for kill in runner.kills:
        print(f"{kind}: killed {kill.event.target} at {kill.killed_at:.3f}, reaped at {kill.dead_at:.3f}, "
              f"back at {kill.restarted_at}")
    for outcome in load.outcomes:
        if outcome.failed:
            print(f"{kind}: {outcome.label()} {outcome.server} {outcome.started:.3f}-{outcome.ended:.3f}")

    assert not runner.errors, runner.errors
    assert [kill.event for kill in runner.kills] == events, "the schedule did not finish within the load"
    assert {event.kind for event in events} == {chaos.SERVER, chaos.AGENT, chaos.STANDBY}
    assert ended_in_time, "a request hung past the deadline"
    assert load.finished + load.not_started == REQUESTS
    assert load.counts()["200"] > 20 * len(events), load.counts()
    assert not unexcused, [(o.label(), o.server, o.detail) for o in unexcused]
    assert all(deferrals.incarnations(name) >= 1 for name in SLOTS), deferrals.sample_counts
    if deferrals.worst() > 0:
        raise LlamaCppDeferred(f"deferred per (server, pid): {deferrals.max_deferred}; {deferrals.nonzero[:20]}")


@pytest.fixture
def saturated_cores() -> Iterator[None]:
    """Two busy loops, one per core of the CI machine, for the duration of the test."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def kill_to_down(stack: BalancerStack, server: LlamaServer) -> float:
    """Seconds from SIGKILL to HAProxy showing the server DOWN on its stats socket (polled every 10 ms)."""
    killed_at = time.monotonic()
    server.kill()
    wait_until(lambda: not stack.is_up(server.name), timeout=5, interval=0.01, what=f"{server.name} DOWN")
    return time.monotonic() - killed_at


def test_haproxy_keeps_busy_servers_up_on_saturated_cores_and_takes_a_killed_one_out_fast(
        fleet: dict[str, LlamaServer], tmp_path: Path, saturated_cores: None) -> None:
    with make_stack(tmp_path / "lb", fleet, "haproxy") as stack:
        stack.wait_slots(SLOTS)
        load = chaos.Load(LOOPBACK, stack.port, requests=400, concurrency=CONCURRENCY, deadline=25,
                          max_tokens=mixed_tokens)
        with chaos.StateWatch(stack.haproxy, BACKEND_NAME) as watch:
            ended_in_time = load.run()
        rows = {row["svname"]: row for row in stack.haproxy.stats() if row["pxname"] == BACKEND_NAME}
        went_down = {name: int(rows[name]["chkdown"]) for name in SLOTS}
        times = []
        for _ in range(3):
            times.append(kill_to_down(stack, fleet["two"]))
            fleet["two"].start()
            wait_until(lambda: stack.is_up("two"), timeout=10, what="two UP again")
    print(f"busy: {dict(load.counts())}, transitions {watch.transitions}; kill to DOWN: "
          + ", ".join(f"{seconds * 1000:.0f} ms" for seconds in times))

    assert ended_in_time
    # The watcher saw the load (it samples every 20 ms, far less often on saturated cores);
    # HAProxy's own chkdown counter below covers what falls between its samples.
    assert watch.samples["haproxy"] >= 10, watch.samples
    assert watch.downs() == [], watch.transitions
    assert went_down == dict.fromkeys(SLOTS, 0), went_down
    assert dict(load.counts()) == {"200": load.finished}, load.counts()
    assert max(times) <= KILL_TO_DOWN_BOUND, times
