"""Reloading HAProxy under load loses nothing and overfills no llama-server (issue 12, item 3).

Real llama-servers (2 and 3 slots), the real agent, the config ``paddler-gen haproxy`` renders, and HAProxy
in master-worker mode as systemd runs it. Eight streaming chats keep every slot busy and three requests in
HAProxy's queue; five times the fleet file changes (``buffered_request_timeout``), paddler-gen renders it
again and the master gets SIGUSR2, what ``systemctl reload haproxy`` sends. Each reload happens with
streams running and requests queued in the worker it replaces. llama.cpp's ``requests_deferred`` is
sampled every 50 ms on both servers: before paddler.lua's handover, the new worker (counting from 0)
filled each server to its slots beside the old worker's streams, and it reached 2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import yaml

from devstack import chaos
from devstack.processes import LOOPBACK, LlamaServer, wait_until
from devstack.sampling import DeferralWatch
from devstack.stack import BalancerStack, generate_config
from generator.haproxy import BACKEND_NAME

SLOTS = {"a": 2, "b": 3}
CONCURRENCY = 8  # the 5 slots, and 3 requests waiting in HAProxy's queue
RELOADS = 5


def slots_full_and_queue(stack: BalancerStack) -> bool:
    """The current worker has every slot busy and requests waiting: the moment a reload must not disturb."""
    rows = {row["svname"]: row for row in stack.haproxy.stats() if row["pxname"] == BACKEND_NAME}
    return (all(rows[name]["scur"] == str(slots) for name, slots in SLOTS.items())
            and int(rows["BACKEND"]["qcur"]) > 0)


def changed_config(stack: BalancerStack, step: int) -> str:
    """An operator's edit of the fleet file, rendered again by paddler-gen."""
    balancer = cast(dict[str, Any], stack.fleet["balancer"])
    balancer["buffered_request_timeout"] = f"{30 + step}s"
    stack.fleet_path.write_text(yaml.safe_dump(stack.fleet, sort_keys=False))
    return generate_config("haproxy", stack.fleet_path)


def test_five_reloads_under_load_lose_no_request_and_overfill_no_server(
        make_llama: Callable[..., LlamaServer], haproxy_available: None, tmp_path: Path) -> None:
    servers = {name: make_llama(name, slots=slots) for name, slots in SLOTS.items()}
    for server in servers.values():
        server.start()
    with BalancerStack(tmp_path / "lb", {name: server.address for name, server in servers.items()},
                       balancer={"buffered_request_timeout": "30s"}, master_worker=True) as stack:
        stack.wait_slots(SLOTS)
        # Streams of 1-3 s on these cores, so each reload finds several running; bounded in count and time.
        load = chaos.Load(LOOPBACK, stack.port, requests=2000, concurrency=CONCURRENCY, deadline=50.0,
                          max_tokens=lambda index: 300 + (index * 37) % 600, read_timeout=60.0)
        reloaded_at: list[float] = []
        with DeferralWatch(servers, interval=0.05) as watch:
            loader = threading.Thread(target=load.run, daemon=True)
            loader.start()
            for step in range(1, RELOADS + 1):
                wait_until(lambda: slots_full_and_queue(stack), timeout=20, what="every slot busy and a queue")
                reloaded_at.append(time.monotonic())
                stack.haproxy.reload(changed_config(stack, step))
                # The old worker exits once its streams and its queue are done.
                wait_until(lambda: not stack.haproxy.workers().old, timeout=30, what="the old worker to finish")
            load.deadline = 0.0  # no new requests; those running finish
            loader.join(timeout=90)
        log = stack.haproxy.log_path.read_text(errors="replace")

    assert not loader.is_alive(), "a request hung"
    assert load.counts() == {"200": load.finished}, load.counts()
    for at in reloaded_at:
        assert any(outcome.started < at < outcome.ended for outcome in load.outcomes), "no stream spanned a reload"
    assert watch.max_deferred == {"a": 0.0, "b": 0.0}, watch.max_deferred
    assert min(watch.samples.values()) > 100, watch.samples
    # The mechanism under test ran: each new worker took the servers over and gave them back to the agent.
    handovers = [line for line in log.splitlines()
                 if line.startswith("paddler handover (pid") and line.endswith("done, the agent's checks are back")]
    assert len(handovers) == RELOADS, handovers
