"""Backends that join and leave a running HAProxy with no reload: the spare-server pool, on real processes.

Real llama-servers, the real agent (``python -m agentcheck --fleet``, with ``balancer.stats_socket`` and
three spares) and HAProxy running ``paddler-gen haproxy``'s config. One server is in the fleet file;
two more register through the management API while streams run, one deregisters while it streams and
comes back through the fleet file and SIGHUP, then HAProxy is restarted with the same config and the
agent refills its spares. A second test reloads HAProxy in master-worker mode under load: a spare whose
server still runs the old worker's streams is refilled only once they end.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devstack.chaos import OK, Streams, stream_chat
from devstack.processes import LOOPBACK, LlamaServer, RegisterProcess, wait_until
from devstack.sampling import DeferralWatch
from devstack.stack import BalancerStack, generate_config

pytestmark = pytest.mark.real

TOKEN = "spare-test-operator-token"
INTERVAL = 0.5  # the agent's poll interval and HAProxy's agent-inter (200ms: polls time out on a loaded 2-core host)
SLOTS = 2
CLIENTS = 8  # more streams than the 6 slots of all three servers: the excess waits in HAProxy's queue
MAX_TOKENS = 300
LOAD_SECONDS = 120  # a bound on the load, whatever happens to the test


def spare_of(stack: BalancerStack, name: str) -> str | None:
    row = stack.agents().get(name)
    return row["spare_server"] if row else None


def backend_rows(stack: BalancerStack) -> dict[str, dict[str, str]]:
    return {row["svname"]: row for row in stack.haproxy.stats() if row["pxname"] == "llama"}


@pytest.fixture
def servers(make_llama: Callable[..., LlamaServer]) -> Iterator[dict[str, LlamaServer]]:
    started = {name: make_llama(name, slots=SLOTS, ctx_per_slot=1024).start() for name in ("base", "gpu-b", "gpu-c")}
    yield started  # type: ignore[misc]


def test_backends_join_and_leave_haproxy_through_spare_servers_without_a_reload(
        servers: dict[str, LlamaServer], haproxy_available: None, tmp_path: Path) -> None:
    stack = BalancerStack(tmp_path / "stack", {"base": servers["base"].address},
                          balancer={"spare_servers": 3, "max_buffered_requests": 100,
                                    "buffered_request_timeout": "60s"},
                          agent={"operator_token": TOKEN, "registration_timeout": "1h"},
                          interval=f"{int(INTERVAL * 1000)}ms")
    assert stack.config.count(" 0.0.0.0:0 disabled ") == 3
    watch = DeferralWatch(servers, interval=0.05)
    queued = {"before": 0, "after": 0}  # the most requests seen waiting in HAProxy before and after the joins
    phase = ["before"]

    first_request: dict[str, float] = {}  # server address → when HAProxy first showed a request sent to it

    def sample_haproxy() -> bool:
        try:
            rows = backend_rows(stack)
        except (OSError, IndexError):  # HAProxy is being restarted: no answer, or an empty one
            return False
        queued[phase[0]] = max(queued[phase[0]], int(rows["BACKEND"]["qcur"] or 0))
        for row in rows.values():
            if row["addr"] and int(row["stot"] or 0) > 0:
                first_request.setdefault(row["addr"], time.monotonic())
        return True

    watch.add("haproxy", sample_haproxy)
    deferred_at: list[float] = []  # when a deferral was first seen: which step of the test it belongs to

    def note_deferral() -> bool:
        if not deferred_at and max(watch.max_deferred.values()) > 0:
            deferred_at.append(time.monotonic())
        return True

    watch.add("deferral-time", note_deferral)
    with stack, watch:
        stack.wait_slots({"base": SLOTS})
        with Streams(stack.port, CLIENTS, MAX_TOKENS, max_seconds=LOAD_SECONDS) as streams:
            wait_until(lambda: queued["before"] > 0, timeout=20, what="requests waiting in HAProxy's queue")

            # Two servers register while streams run: each is on a spare and gets requests within 2 s.
            joined: dict[str, float] = {}
            for name in ("gpu-b", "gpu-c"):
                joined[name] = time.monotonic()
                assert stack.backends_api("PUT", name, TOKEN, {"address": servers[name].address}) == 201
            for name in ("gpu-b", "gpu-c"):
                spare = wait_until(lambda name=name: spare_of(stack, name), timeout=2, what=f"{name} on a spare")
                address = servers[name].address
                wait_until(lambda address=address: address in first_request, timeout=5, what=f"{name} getting requests")
                took = first_request[address] - joined[name]
                assert took < 2.0, f"{name} took {took:.2f}s to get requests"
                row = stack.server(spare)
                assert row["slim"] == str(SLOTS), row  # HAProxy's maxconn is the server's real slot count
                assert row["addr"] == servers[name].address
            # paddler.lua's /health counts the spares' slots: Lua's servers table lists them (it would not list
            # a server added at run time with `add server`).
            wait_until(lambda: stack.health().get("slots_idle", 0) + stack.health().get("slots_processing", 0)
                       == 3 * SLOTS, timeout=2, what="/health counting all three servers' slots")
            phase[0] = "after"
            # Eight streams on six slots: the excess waits in HAProxy's queue, not in a llama-server.
            wait_until(lambda: queued["after"] > 0 and all(len(streams.served_by(name)) >= 3 for name in servers),
                       timeout=30, what="every server streaming, with requests queued in HAProxy")

            # gpu-c leaves while it streams: its streams end 200, it gets nothing new, its spare empties.
            wait_until(lambda: servers["gpu-c"].busy_slots(), timeout=10, what="gpu-c streaming")
            leaving_spare = spare_of(stack, "gpu-c")
            assert leaving_spare is not None
            assert stack.backends_api("DELETE", "gpu-c", TOKEN) == 202
            left = time.monotonic()
            wait_until(lambda: stack.server(leaving_spare)["status"].startswith(("DRAIN", "MAINT")), timeout=2,
                       interval=0.01, what=f"{leaving_spare} draining")
            drained_total = int(stack.server(leaving_spare)["stot"])
            wait_until(lambda: "gpu-c" not in stack.agents(), timeout=30, what="gpu-c removed from the fleet")
            wait_until(lambda: stack.server(leaving_spare)["status"] == "MAINT"
                       and stack.server(leaving_spare)["addr"] == "0.0.0.0:0",
                       timeout=2, what=f"{leaving_spare} empty and in maintenance again")
            assert int(stack.server(leaving_spare)["stot"]) == drained_total  # nothing new once draining
            # Streams keep flowing over base and gpu-b for a moment after gpu-c is gone.
            settled = len(streams.outcomes)
            wait_until(lambda: len(streams.outcomes) >= settled + 6, timeout=30, what="more streams after the leave")

            # gpu-c comes back through the fleet file and SIGHUP: no server line of its own, so a spare again.
            fleet = {**stack.fleet, "backends": [*stack.fleet["backends"],
                                                 {"name": "gpu-c", "address": servers["gpu-c"].address}]}
            stack.fleet_path.write_text(yaml.safe_dump(fleet, sort_keys=False))
            assert stack.agent.proc is not None
            stack.agent.proc.send_signal(signal.SIGHUP)
            hup = time.monotonic()
            wait_until(lambda: spare_of(stack, "gpu-c"), timeout=5, what="gpu-c on a spare after SIGHUP")
            wait_until(lambda: any(o.server == "gpu-c" and o.started > hup for o in list(streams.outcomes))
                       or servers["gpu-c"].busy_slots(), timeout=5, what="gpu-c serving again after SIGHUP")
            assert stack.agents()["gpu-c"]["registered"] is False
        outcomes = list(streams.outcomes)
        assert outcomes and all(outcome.kind == OK for outcome in outcomes), \
            [(o.kind, o.status, o.detail) for o in outcomes if o.kind != OK][:5]
        # Sent after the leave and over before gpu-c came back (a request queued meanwhile may go to it then).
        assert [o for o in outcomes if o.server == "gpu-c" and o.started > left + INTERVAL and o.ended < hup] == []
        assert streams.served_by("gpu-c"), "gpu-c never served a stream before it left"
        assert min(watch.samples.values()) > 20, watch.samples  # every 50 ms
        steps = {"joined": min(joined.values()), "left": left, "back": hup}
        assert max(watch.max_deferred.values()) == 0, (  # nothing waited inside a llama-server
            watch.max_deferred, {step: round(deferred_at[0] - at, 2) for step, at in steps.items()})

        # HAProxy restarted with the same config: every spare disabled again; the agent refills them.
        spares = {name: spare_of(stack, name) for name in ("gpu-b", "gpu-c")}
        stack.haproxy.stop()
        stack.haproxy.start()
        restarted = time.monotonic()

        def refilled_with(name: str) -> bool:
            row = stack.server(str(spares[name]))
            return (row["addr"] == servers[name].address and row["slim"] == str(SLOTS)
                    and not row["status"].startswith("MAINT"))

        # The agent's part: address and maxconn set, out of maintenance; then HAProxy's next agent-check weighs it.
        wait_until(lambda: all(refilled_with(name) for name in spares), timeout=5, interval=0.02,
                   what=f"{spares} refilled after the restart")
        refilled = time.monotonic() - restarted
        wait_until(lambda: all(stack.haproxy.server_takes_requests("llama", str(spare)) for spare in spares.values()),
                   timeout=5, interval=0.02, what=f"{spares} weighted by the agent after the restart")
        weighted = time.monotonic() - restarted
        assert refilled < 2 * INTERVAL, f"refilled after {refilled:.2f}s"
        assert weighted < 4 * INTERVAL, f"weighted after {weighted:.2f}s"
        answers = [stream_chat(LOOPBACK, stack.port, 16, index, read_timeout=30.0) for index in range(6)]
        assert all(answer.kind == OK for answer in answers)


def test_a_reload_under_load_refills_a_busy_spare_only_once_the_old_workers_streams_end(
        make_llama: Callable[..., LlamaServer], haproxy_available: None, tmp_path: Path) -> None:
    """HAProxy in master-worker mode reloads (SIGUSR2, as ``systemctl reload``) while a registered server's
    slots are busy with the old worker's streams: the new worker's spare for it is empty, and the agent
    refills it only once those streams end, so no llama-server gets more requests than it has slots."""
    # Room for streams of several seconds, longer than a reload takes (about 2 s here).
    servers = {name: make_llama(name, slots=SLOTS, ctx_per_slot=4096).start() for name in ("base", "gpu-b")}
    stack = BalancerStack(tmp_path / "stack", {"base": servers["base"].address},
                          balancer={"spare_servers": 2, "max_buffered_requests": 100,
                                    "buffered_request_timeout": "60s"},
                          agent={"operator_token": TOKEN, "registration_timeout": "1h"},
                          interval=f"{int(INTERVAL * 1000)}ms", master_worker=True)
    with stack, DeferralWatch(servers, interval=0.05) as watch:
        stack.wait_slots({"base": SLOTS})
        assert stack.backends_api("PUT", "gpu-b", TOKEN, {"address": servers["gpu-b"].address}) == 201
        spare = wait_until(lambda: spare_of(stack, "gpu-b"), timeout=5, what="gpu-b on a spare")
        wait_until(lambda: stack.haproxy.server_takes_requests("llama", spare), timeout=5, what=f"{spare} weighted")
        with Streams(stack.port, CLIENTS, max_tokens=1200, max_seconds=LOAD_SECONDS) as streams:  # about 4 s each here
            # Reload just after gpu-b took a new stream, so one of its streams surely outlasts the reload.
            before = int(stack.server(spare)["stot"])
            wait_until(lambda: int(stack.server(spare)["stot"]) > before and stack.server(spare)["scur"] == str(SLOTS)
                       and int(backend_rows(stack)["BACKEND"]["qcur"] or 0) > 0,
                       timeout=30, interval=0.01, what="a new stream on gpu-b, its slots busy and requests queued")
            stack.haproxy.reload(generate_config("haproxy", stack.fleet_path))
            reloaded = time.monotonic()
            # The new worker's spare stays empty while gpu-b runs the old worker's streams, then is refilled.
            wait_until(lambda: stack.haproxy.server_takes_requests("llama", spare), timeout=60, interval=0.02,
                       what=f"{spare} refilled in the new worker")
            wait_until(lambda: any(o.server == "gpu-b" and o.started > reloaded for o in list(streams.outcomes)),
                       timeout=30, what="gpu-b serving the new worker's requests")
        log = stack.agent.log_path.read_text(errors="replace")
    outcomes = list(streams.outcomes)
    assert outcomes and all(outcome.kind == OK for outcome in outcomes), \
        [(o.kind, o.status, o.detail) for o in outcomes if o.kind != OK][:5]
    assert f"gpu-b: {spare} is refilled once the requests another HAProxy process runs there end" in log
    assert max(watch.max_deferred.values()) == 0, watch.max_deferred
    assert min(watch.samples.values()) > 20, watch.samples


def test_a_killed_agent_gets_its_registrations_back_within_two_heartbeats_and_traffic_never_stops(
        servers: dict[str, LlamaServer], haproxy_available: None, tmp_path: Path) -> None:
    heartbeat = 0.5
    stack = BalancerStack(tmp_path / "stack", {"base": servers["base"].address},
                          balancer={"spare_servers": 3, "max_buffered_requests": 100,
                                    "buffered_request_timeout": "60s"},
                          agent={"operator_token": TOKEN, "registration_timeout": "5s"},
                          interval=f"{int(INTERVAL * 1000)}ms")
    watch = DeferralWatch(servers, interval=0.05)
    watched: dict[str, str] = {}  # registered server → the spare carrying it, once known
    statuses: set[str] = set()  # what HAProxy showed for those spares from then on

    def sample_spares() -> bool:
        rows = backend_rows(stack)
        statuses.update(rows[spare]["status"].split()[0] for spare in watched.values())
        return True

    watch.add("spares", sample_spares)
    with stack, watch:
        stack.wait_slots({"base": SLOTS})
        registers = [RegisterProcess(tmp_path, stack.agent.management_url, name, servers[name].address, TOKEN,
                                     heartbeat=f"{int(heartbeat * 1000)}ms") for name in ("gpu-b", "gpu-c")]
        try:
            for process in registers:
                process.start(timeout=10)
            before = {name: wait_until(lambda name=name: spare_of(stack, name), timeout=5, what=f"{name} on a spare")
                      for name in ("gpu-b", "gpu-c")}
            # The agent names the spare before its fill commands (which pass through MAINT) reach HAProxy.
            for name, spare in before.items():
                wait_until(lambda spare=spare: stack.haproxy.server_takes_requests("llama", spare), timeout=5,
                           what=f"{name}'s spare filled")
            watched.update(before)
            with Streams(stack.port, CLIENTS, MAX_TOKENS, max_seconds=LOAD_SECONDS) as streams:
                wait_until(lambda: all(len(streams.served_by(name)) >= 2 for name in servers), timeout=30,
                           what="every server streaming")
                stack.agent.kill()
                served_while_away = len(streams.outcomes)
                wait_until(lambda: len(streams.outcomes) >= served_while_away + 4, timeout=30,
                           what="streams completing while the agent is away")
                stack.agent.start()
                back = time.monotonic()
                after = {name: wait_until(lambda name=name: spare_of(stack, name), timeout=2 * heartbeat + 2,
                                          what=f"{name} registered again") for name in ("gpu-b", "gpu-c")}
                registered_after = time.monotonic() - back
                for name in ("gpu-b", "gpu-c"):
                    wait_until(lambda name=name: stack.haproxy.server_takes_requests("llama", str(after[name])),
                               timeout=10, what=f"{name}'s spare weighted again")
                resumed = len(streams.outcomes)
                wait_until(lambda: len(streams.served_by("gpu-b")) + len(streams.served_by("gpu-c"))
                           >= sum(1 for o in list(streams.outcomes)[:resumed] if o.server in ("gpu-b", "gpu-c")) + 4,
                           timeout=30, what="the registered servers streaming again")
            # Before the registrations end: deregistering releases the spares (MAINT), as it should.
            seen_while_registered = set(statuses)
        finally:
            for process in registers:
                process.stop()
        print(f"registrations back {registered_after:.2f}s after the agent answered again; spares {before} -> {after}")
        assert after == before  # each took back the spare it had: its running streams stayed counted there
        # Never released meanwhile (DRAIN is weight 0: an unclaimed spare is answered 0%, so it takes nothing new).
        assert "MAINT" not in seen_while_registered, seen_while_registered
        assert registered_after <= 2 * heartbeat + INTERVAL
        outcomes = list(streams.outcomes)
        assert outcomes and all(outcome.kind == OK for outcome in outcomes), \
            [(o.kind, o.status, o.detail) for o in outcomes if o.kind != OK][:5]
        assert min(watch.samples.values()) > 20, watch.samples
        assert max(watch.max_deferred.values()) == 0, watch.max_deferred
