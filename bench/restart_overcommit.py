"""Reproduction (not in CI): does a llama-server restarted into a full HAProxy queue get more requests than slots?

A 1-slot and a 2-slot llama-server behind the generated HAProxy config and the real agent (500 ms), a
streaming load above the 3 slots so HAProxy's backend queue is never empty, and N rounds of: kill -9 the
2-slot server, restart it after a seeded pause, wait until HAProxy routes to it again, let it serve a
few seconds. ``llamacpp:requests_deferred`` is sampled every 50 ms per incarnation; a restart whose
incarnation ever shows a deferred request was over-committed. HAProxy's own "is UP" log lines show how
many queued requests it handed to the server as it came back (``requeued``) and what brought it up.
With Debian 12's HAProxy 2.6.12: 11 and 9 of 20 restarts over-committed (seeds 1 and 2), 2 requeued at
almost every UP (docs/haproxy.md, "Known HAProxy 2.6 over-commit after a restart").

    python -m bench.restart_overcommit --restarts 20 [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import threading
import time
from pathlib import Path

from devstack import chaos
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LOOPBACK, LlamaServer, wait_until
from devstack.stack import BalancerStack

SLOTS = {"one": 1, "two": 2}
TARGET = "two"
CONCURRENCY = 6  # twice the 3 slots: the queue stays non-empty
SERVE_AFTER_UP = 3.0  # seconds the restarted server works before the next kill
UP_LINE = re.compile(r"WARNING.*Server \S+/two is UP(.*?)\. \d+ active .*? (\d+) sessions requeued")


def run(restarts: int, seed: int, workdir: Path) -> None:
    binary, model = llama_server_binary(), write_tiny_model(workdir / "tiny.gguf")
    servers = {name: LlamaServer(binary, model, workdir, slots=slots, name=name) for name, slots in SLOTS.items()}
    rng = random.Random(seed)
    recovery: list[float] = []  # llama-server ready again → HAProxy routes to it
    try:
        for server in servers.values():
            server.start()
        stack = BalancerStack(workdir / "lb", {name: server.address for name, server in servers.items()})
        with stack:
            stack.wait_slots(SLOTS)
            load = chaos.Load(LOOPBACK, stack.port, 10**6, CONCURRENCY, deadline=restarts * 10.0,
                              max_tokens=lambda index: 32 + (index * 37) % 193)
            with chaos.IncarnationDeferrals({TARGET: servers[TARGET]}) as deferrals:
                loader = threading.Thread(target=load.run, daemon=True)
                loader.start()
                for _ in range(restarts):
                    servers[TARGET].kill()
                    wait_until(lambda: not stack.is_up(TARGET), timeout=5, interval=0.01, what="DOWN")
                    time.sleep(rng.uniform(0.2, 1.5))  # the pause of the chaos schedule, not a synchronization
                    servers[TARGET].start()
                    ready = time.monotonic()
                    wait_until(lambda: stack.is_up(TARGET), timeout=10, interval=0.01, what="UP")
                    recovery.append(time.monotonic() - ready)
                    time.sleep(SERVE_AFTER_UP)  # let it serve under the queue
                load.deadline = 0.0  # no new requests
                loader.join(timeout=60)
            ups = UP_LINE.findall(stack.haproxy.log_path.read_text(errors="replace"))
    finally:
        for server in servers.values():
            server.stop()
    over = {pid: value for (name, pid), value in deferrals.max_deferred.items() if value > 0}
    print(f"restarts: {restarts}, over-committed incarnations: {len(over)} {sorted(over.values())}")
    print(f"requests: {dict(load.counts())}")
    print(f"ready → routed (s): max {max(recovery):.2f}, mean {sum(recovery) / len(recovery):.2f}")
    print(f"HAProxy UP lines: {len(ups)}; requeued at UP: {[int(n) for _, n in ups]}")
    print(f"UP reasons: {sorted({reason.split(', check duration')[0] for reason, _ in ups})}")
    print(f"UP reasons with requeued > 0: {[reason.split(', check duration')[0] for reason, n in ups if n != '0']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="paddler-restart-") as workdir:
        run(args.restarts, args.seed, Path(workdir))


if __name__ == "__main__":
    main()
