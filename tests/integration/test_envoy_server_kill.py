"""Envoy when a llama-server dies under load: only the requests running on it may fail.

Real Envoy (one worker), real llama-servers with 1, 2 and 3 slots plus a 2-slot standby, agent
interval 500 ms. Steady streaming load, more streams than slots; the 3-slot server is killed with
SIGKILL (like an OOM kill) mid-load, at a moment it has a free slot while the others are busy when
one comes within a second (the picker favours the most free slots, so it fills that slot next),
then restarted; three rounds. Every request records which server answered it (the ``--alias``, in
each chunk's ``model`` field). The requests running on the killed server at the kill are counted
from Envoy's side: every upstream connection carries one request and nothing can connect to a
killed server, so they are the connections made to it less the answers it completed. Any failure
beyond those is a request lost to routing: at most one over the three kills (it was 1 to 4 per kill
before the picker learnt of refusals). After the restarts the server must be used again.
``llamacpp:requests_deferred`` is sampled on every server every 50 ms throughout; its test (must
stay 0) is an expected failure for now: a retried request can still land on a full server.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.chaos import Outcome, stream_chat
from devstack.processes import LOOPBACK, LlamaServer, wait_until
from devstack.sampling import DeferralWatch
from devstack.stack import BalancerStack

pytestmark = pytest.mark.real

REQUESTS = 80
CONCURRENCY = 8  # more than the primaries' 6 slots: every server stays busy, the picker queues the rest
MAX_TOKENS = 96
KILLED = "three"
KILL_AFTER = 15  # answers finished before the kill
AFTER_RESTART = 24
ROUNDS = 3
DEADLINE = 90.0  # seconds for any one load run
RETRY_STATS = ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_limit_exceeded",
               "upstream_cx_connect_fail", "upstream_rq_503", "health_check.failure")


class Load:
    """``count`` streaming chats through the balancer (``chaos.stream_chat``), ``CONCURRENCY`` at a time,
    every one recorded."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.outcomes: list[Outcome | None] = [None] * count
        self.finished = 0
        self.lock = threading.Lock()

    def one(self, index: int) -> None:
        self.outcomes[index] = stream_chat(LOOPBACK, self.port, MAX_TOKENS, index, read_timeout=30)
        with self.lock:
            self.finished += 1

    def statuses(self) -> Counter[str]:
        return Counter(o.label() for o in self.outcomes if o is not None)

    def served_by(self) -> Counter[str | None]:
        return Counter(o.server for o in self.outcomes if o is not None and not o.failed)


def llama_stats(stack: BalancerStack) -> dict[str, int]:
    stats = stack.envoy.stats()
    return {name: stats.get(f"cluster.llama.{name}", 0) for name in RETRY_STATS}


def endpoint_stats(stack: BalancerStack) -> dict[str, dict[str, int]]:
    stats = stack.envoy.endpoint_stats()
    assert stats, "Envoy's admin did not answer"
    return stats


def has_a_free_slot_and_others_busy(stack: BalancerStack, servers: dict[str, LlamaServer]) -> bool:
    stats = endpoint_stats(stack)
    active = {name: stats[server.address]["rq_active"] for name, server in servers.items()}
    return active[KILLED] < servers[KILLED].slots and all(active[name] > 0 for name in active if name != KILLED)


def kill_mid_load(stack: BalancerStack, servers: dict[str, LlamaServer]) -> dict[str, int | str]:
    """One round: streams through Envoy, the victim killed mid-load. How many requests failed, were lost
    (failed beyond those on the victim at the kill) and were refused by it afterwards, and what happened."""
    victim = servers[KILLED]
    before = endpoint_stats(stack)[victim.address]
    load = Load(stack.port, REQUESTS)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = pool.map(load.one, range(REQUESTS), timeout=DEADLINE)
        wait_until(lambda: load.finished >= KILL_AFTER, timeout=30, what=f"{KILL_AFTER} answers")
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: has_a_free_slot_and_others_busy(stack, servers), timeout=1, interval=0.01)
        victim.kill()
        list(results)
    after = endpoint_stats(stack)[victim.address]
    # One request per upstream connection, and nothing connects to a killed server: the requests on it at
    # the kill are those that connected to it and did not finish well.
    connected = (after["cx_total"] - after["cx_connect_fail"]) - (before["cx_total"] - before["cx_connect_fail"])
    on_it = connected - load.served_by()[KILLED]
    failures = REQUESTS - sum(load.served_by().values())
    refused = after["cx_connect_fail"] - before["cx_connect_fail"]
    errors = Counter(o.detail[:100] for o in load.outcomes if o is not None and o.failed)
    detail = (f"statuses {dict(load.statuses())}, served by {dict(load.served_by())}; on {KILLED} at the kill: "
              f"{on_it}; refused connections to it: {refused}; Envoy: {llama_stats(stack)}; errors: {dict(errors)}")
    return {"failed": failures, "lost": max(0, failures - on_it), "refused": refused,
            "victim_served": load.served_by()[KILLED], "detail": detail}


@dataclass
class Run:
    rounds: list[dict[str, int | str]]
    after_restart: Load
    deferred: dict[str, float]
    samples: dict[str, int]


def kill_and_restart(make_llama: Callable[..., LlamaServer], tmp_path: Path) -> Run:
    """ROUNDS kills mid-load, each followed by a restart, then one more load; deferrals watched throughout."""
    servers = {name: make_llama(name, slots=slots).start() for name, slots in (("one", 1), ("two", 2), ("three", 3))}
    standby = make_llama("spare", slots=2).start()
    watched = {**servers, "spare": standby}
    rounds: list[dict[str, int | str]] = []
    with BalancerStack(tmp_path / "lb", {name: server.address for name, server in servers.items()},
                       standby={"spare": standby.address}, kind="envoy") as stack:
        stack.wait_slots({"one": 1, "two": 2, "three": 3, "spare": 2})
        with DeferralWatch(watched, interval=0.05) as watch:
            for _ in range(ROUNDS):
                rounds.append(kill_mid_load(stack, servers))
                servers[KILLED].start()
                stack.wait_slots({KILLED: 3}, timeout=20)
            again = Load(stack.port, AFTER_RESTART)
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(again.one, range(AFTER_RESTART), timeout=DEADLINE))
    return Run(rounds, again, watch.max_deferred, watch.samples)


def test_a_killed_server_costs_only_the_requests_running_on_it(make_llama: Callable[..., LlamaServer],
                                                               tmp_path: Path) -> None:
    run = kill_and_restart(make_llama, tmp_path)
    # Before the fix each kill lost 1 to 4 requests (4 runs); after it 0 in 48 kills on a dev machine and
    # 1 in one CI run of three kills: at most one over the three rounds.
    rounds = "\n".join(map(str, run.rounds))  # a string: pytest shortens the repr of a list of dicts
    assert all(int(outcome["victim_served"]) > 0 for outcome in run.rounds), rounds
    assert sum(int(outcome["lost"]) for outcome in run.rounds) <= 1, rounds
    assert run.after_restart.statuses() == {"200": AFTER_RESTART}, f"after restarts: {run.after_restart.statuses()}"
    assert run.after_restart.served_by()[KILLED] > 0, f"{KILLED} not used after its restart"


@pytest.mark.xfail(reason="open: a request retried after a refused connection can still wait in llama.cpp on the "
                          "1-slot server (1 deferred in about half the runs on a loaded 2-core machine)", strict=False)
def test_no_request_waits_inside_llama_cpp_while_a_server_is_killed_and_restarted(
        make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    run = kill_and_restart(make_llama, tmp_path)
    assert all(count > 0 for count in run.samples.values()), f"no samples: {run.samples}"
    assert run.deferred == dict.fromkeys(run.deferred, 0.0), f"deferred: {run.deferred}; rounds: {run.rounds}"
