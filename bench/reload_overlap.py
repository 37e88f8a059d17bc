"""Reproduction (not in CI): does a llama-server get more requests than slots while an old and a new
HAProxy worker overlap during a reload?

Two real llama-servers (2 and 3 slots) behind the real agent and the config ``paddler-gen haproxy``
renders, run by HAProxy in master-worker mode as systemd runs it. A streaming load keeps every slot
busy and requests waiting in the queue; N times the fleet file changes (``buffered_request_timeout``
grows by a second), ``paddler-gen`` renders it again and the master gets SIGUSR2, the signal
``systemctl reload haproxy`` sends. ``llamacpp:requests_deferred`` is sampled every 50 ms per server:
any value above 0 means a llama-server held more requests than slots and queued one itself.

Each reload waits until every slot is busy and requests wait in the current worker. Then
``--spacing old-gone`` waits for the old worker to exit (one overlap at a time); ``--spacing N``
waits only N seconds, so a reload can come while the previous overlap lasts (up to 3 workers seen).
HAProxy's log lines about the hand-over, DOWN servers and 503s are printed with the numbers.

    python -m bench.reload_overlap [--reloads 5] [--spacing old-gone|2.0] [--max-tokens 600]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import yaml

from devstack import chaos
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LOOPBACK, HAProxy, LlamaServer, wait_until
from devstack.sampling import BackgroundSampler, DeferralWatch
from devstack.stack import BalancerStack, generate_config
from generator.haproxy import BACKEND_NAME

SLOTS = {"a": 2, "b": 3}
CONCURRENCY = 8  # 5 slots busy and 3 requests waiting in HAProxy's queue


def queue_is_full(stack: BalancerStack) -> bool:
    """Every slot busy (HAProxy's own count) and requests waiting: the state a reload must not break."""
    rows = {row["svname"]: row for row in stack.haproxy.stats() if row["pxname"] == BACKEND_NAME}
    busy = all(rows[name]["scur"] == str(slots) for name, slots in SLOTS.items())
    return busy and int(rows["BACKEND"]["qcur"]) > 0


class TimedDeferrals(DeferralWatch):
    """DeferralWatch that also keeps when each deferral was seen, to match it with reloads and log lines."""

    def __init__(self, servers: dict[str, LlamaServer]) -> None:
        super().__init__(servers, interval=0.05)
        self.nonzero: list[tuple[str, str, float]] = []  # (wall clock, server, new highest value)

    def _sample(self, name: str) -> bool:
        before = self.max_deferred[name]
        taken = super()._sample(name)
        if taken and self.max_deferred[name] > before:
            self.nonzero.append((time.strftime("%H:%M:%S"), name, self.max_deferred[name]))
        return taken


class WorkerSessions(BackgroundSampler):
    """Every worker's own count of requests on each server (``@!<pid> show stat`` on the master CLI),
    summed: what HAProxy as a whole has sent to a llama-server, against its slots."""

    def __init__(self, haproxy: HAProxy, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.haproxy = haproxy
        self.max_total = dict.fromkeys(SLOTS, 0)
        self.max_workers = 0
        self.add("workers", self._sample)

    def _sample(self) -> bool:
        try:
            workers = self.haproxy.workers()
            pids = [pid for pid in (workers.current, *workers.old) if pid is not None]
            totals = dict.fromkeys(SLOTS, 0)
            for pid in pids:
                for line in self.haproxy.master_command(f"@!{pid} show stat").splitlines():
                    fields = line.split(",")
                    if len(fields) > 4 and fields[0] == BACKEND_NAME and fields[1] in totals:
                        totals[fields[1]] += int(fields[4] or 0)  # scur
        except (OSError, ValueError):
            return False
        self.max_workers = max(self.max_workers, len(pids))
        for name, total in totals.items():
            self.max_total[name] = max(self.max_total[name], total)
        return True


def change_fleet(stack: BalancerStack, step: int) -> str:
    """The fleet file as an operator edits it, rendered again by paddler-gen."""
    balancer = cast(dict[str, Any], stack.fleet["balancer"])
    balancer["buffered_request_timeout"] = f"{30 + step}s"
    stack.fleet_path.write_text(yaml.safe_dump(stack.fleet, sort_keys=False))
    return generate_config("haproxy", stack.fleet_path)


def run(reloads: int, spacing: str, max_tokens: int, workdir: Path) -> dict[str, object]:
    binary, model = llama_server_binary(), write_tiny_model(workdir / "tiny.gguf")
    servers = {name: LlamaServer(binary, model, workdir, slots=slots, name=name) for name, slots in SLOTS.items()}
    overlaps: list[float] = []  # reload → its old worker gone
    try:
        for server in servers.values():
            server.start()
        stack = BalancerStack(workdir / "lb", {name: server.address for name, server in servers.items()},
                              balancer={"buffered_request_timeout": "30s"}, master_worker=True)
        with stack:
            stack.wait_slots(SLOTS)
            load = chaos.Load(LOOPBACK, stack.port, 10**6, CONCURRENCY, deadline=reloads * 30.0,
                              max_tokens=lambda index: max_tokens // 2 + (index * 37) % max_tokens,
                              read_timeout=60.0)
            with TimedDeferrals(servers) as watch, WorkerSessions(stack.haproxy) as sessions:
                loader = threading.Thread(target=load.run, daemon=True)
                loader.start()
                started = time.monotonic()
                for step in range(1, reloads + 1):
                    wait_until(lambda: queue_is_full(stack), timeout=30, what="every slot busy and a queue")
                    workers = stack.haproxy.reload(change_fleet(stack, step))
                    reloaded = time.monotonic()
                    if spacing == "old-gone":
                        wait_until(lambda: not stack.haproxy.workers().old, timeout=120, what="old workers gone")
                        overlaps.append(time.monotonic() - reloaded)
                    else:
                        time.sleep(float(spacing))  # the schedule of the reloads, not a synchronization
                    print(f"{time.strftime('%H:%M:%S')} reload {step}: worker {workers.current}, old {workers.old}",
                          flush=True)
                load.deadline = 0.0  # no new requests; the running ones finish
                loader.join(timeout=120)
                wait_until(lambda: not stack.haproxy.workers().old, timeout=120, what="old workers gone")
                elapsed = time.monotonic() - started
            log = stack.haproxy.log_path.read_text(errors="replace").splitlines()
    finally:
        for server in servers.values():
            server.stop()
    return {
        "reloads": reloads,
        "spacing": spacing,
        "seconds": round(elapsed, 1),
        "statuses": dict(sorted(load.counts().items())),
        "max_deferred": watch.max_deferred,
        "deferred_seconds": round(watch.deferred_seconds, 2),
        "deferrals_seen": watch.nonzero,
        "samples": dict(watch.samples),
        "haproxy_sessions_max": sessions.max_total,
        "workers_max": sessions.max_workers,
        "overlap_seconds": [round(seconds, 1) for seconds in overlaps],
        "haproxy_log_problems": [line for line in log if " 503 " in line or "is DOWN" in line or "ALERT" in line],
        "handover_log": [line for line in log if "paddler handover" in line],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--spacing", default="old-gone", help="old-gone, or seconds between reloads")
    parser.add_argument("--max-tokens", type=int, default=600, help="streams ask for max/2 to 3*max/2 tokens")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="paddler-reload-") as workdir:
        result = run(args.reloads, args.spacing, args.max_tokens, Path(workdir))
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
