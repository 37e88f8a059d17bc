"""Chaos on real components: a seeded schedule of kill -9 + restart, bounded streaming load, and watches.

Three pieces, shared by tests/integration/test_chaos.py and bench/soak.py:

* ``schedule`` turns ``random.Random(seed)`` into a fixed list of events (kill -9 a primary
  llama-server, the agent or the standby, restart it after a pause); ``ChaosRunner`` plays it
  and records every kill with the time it happened.
* ``Load`` sends a fixed number of streaming chat completions at a fixed concurrency before an
  overall deadline, and records for each one its outcome, which server streamed it (llama-server's
  alias, in every chunk) and when it started and ended, so that a failure can be matched to a kill.
* ``IncarnationDeferrals`` samples ``llamacpp:requests_deferred`` on every server every 50 ms, keyed
  by process id: a restarted llama-server counts from 0 again, so each incarnation has its own maximum.

``unexcused_failures`` is the rule the chaos test asserts; its docstring states it.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from devstack.processes import LOOPBACK, AgentProcess, HAProxy, LlamaServer
from devstack.sampling import BackgroundSampler

SERVER, AGENT, STANDBY = "server", "agent", "standby"
OK, CUT, REFUSED, ERROR, TIMEOUT = "ok", "cut", "status", "error", "timeout"


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the scenario starts
    kind: str  # SERVER, AGENT or STANDBY
    target: str  # the name of the process killed
    down_for: float  # seconds between the kill and the restart


def schedule(seed: int, duration: float, primaries: list[str], standby: list[str], gap: tuple[float, float] = (3, 6),
             down_for: tuple[float, float] = (0.2, 1.5)) -> list[Event]:
    """The same seed always gives the same events: kills of primaries (half of them), the agent and the standby.

    Events start ``gap`` seconds apart (uniform) and never overlap: each begins after the previous one's restart.
    """
    rng = random.Random(seed)
    kinds = [SERVER, SERVER, AGENT] + ([STANDBY] if standby else [])
    events: list[Event] = []
    at = rng.uniform(*gap)
    while at < duration:
        kind = rng.choice(kinds)
        target = "agent" if kind == AGENT else rng.choice(primaries if kind == SERVER else standby)
        event = Event(round(at, 3), kind, target, round(rng.uniform(*down_for), 3))
        events.append(event)
        at += event.down_for + rng.uniform(*gap)
    return events


@dataclass(frozen=True)
class Kill:
    """A kill as played, in time.monotonic() seconds: the process was dying from ``killed_at`` (just
    before the signal) to ``dead_at`` (reaped), and answered again at ``restarted_at`` (None: it did not)."""

    event: Event
    killed_at: float
    dead_at: float
    restarted_at: float | None


class ChaosRunner:
    """Plays ``events`` in a thread from ``start()``; ``kills`` lists what was done, when."""

    def __init__(self, events: list[Event], servers: Mapping[str, LlamaServer], agent: AgentProcess,
                 restart_timeout: float = 30.0) -> None:
        self.events = events
        self.servers = servers
        self.agent = agent
        self.restart_timeout = restart_timeout
        self.kills: list[Kill] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos")
        self.started_at = 0.0

    def start(self) -> ChaosRunner:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Play no further events; an event under way finishes (its process is restarted)."""
        self._stop.set()
        self._thread.join()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        for event in self.events:
            # Waiting for the schedule's clock, not for a condition: an Event wait, so stop() cuts it short.
            if self._stop.wait(max(0.0, self.started_at + event.at - time.monotonic())):
                return
            process = self.agent if event.kind == AGENT else self.servers[event.target]
            killed_at = time.monotonic()  # before the signal: a request cut by it ends after this
            process.kill()
            dead_at = time.monotonic()
            self._stop.wait(event.down_for)
            try:
                process.start(timeout=self.restart_timeout)
                restarted_at: float | None = time.monotonic()
            except Exception as exc:  # recorded and asserted on: the scenario goes on without this process
                self.errors.append(f"{event}: restart failed: {exc}")
                restarted_at = None
            self.kills.append(Kill(event, killed_at, dead_at, restarted_at))


@dataclass
class Outcome:
    """One request: what came back, from which server, and when (time.monotonic())."""

    index: int
    started: float
    ended: float = 0.0
    kind: str = ""  # OK, CUT (a 200 that stopped before [DONE]), REFUSED (a non-200), ERROR, TIMEOUT
    status: int = 0  # 0: no status line arrived
    server: str | None = None  # the alias in the stream's chunks; None when no chunk arrived
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind != OK

    def label(self) -> str:
        """The counting key: a status code, or how the request ended without one."""
        return {OK: "200", CUT: "200-cut-short", REFUSED: str(self.status)}.get(self.kind, self.kind)


def stream_chat(host: str, port: int, max_tokens: int, index: int, read_timeout: float) -> Outcome:
    """One streaming chat completion, read line by line; every way it can end becomes an Outcome."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True})
    outcome = Outcome(index, time.monotonic())
    conn = http.client.HTTPConnection(host, port, timeout=read_timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        outcome.status = response.status
        if response.status != 200:
            outcome.kind, outcome.detail = REFUSED, response.read()[:200].decode(errors="replace")
            return outcome
        done = False
        while line := response.readline():
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):].strip()
            if payload == b"[DONE]":
                done = True
            elif outcome.server is None:
                outcome.server = json.loads(payload).get("model")
        outcome.kind = OK if done else CUT
    except TimeoutError as exc:
        outcome.kind, outcome.detail = TIMEOUT, repr(exc)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        outcome.kind, outcome.detail = (CUT if outcome.status == 200 else ERROR), repr(exc)
    finally:
        outcome.ended = time.monotonic()
        conn.close()
    return outcome


class Streams:
    """``clients`` closed-loop streaming chats through a balancer while the ``with`` block runs, every one
    recorded; bounded by ``max_seconds`` and ``max_requests`` whatever happens to the caller."""

    def __init__(self, port: int, clients: int, max_tokens: int, max_seconds: float = 120.0,
                 max_requests: int = 3000, read_timeout: float = 30.0) -> None:
        self.port, self.max_tokens, self.read_timeout = port, max_tokens, read_timeout
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(index,), daemon=True) for index in range(clients)]

    def _client(self, index: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline and self.finished < self.max_requests:
            outcome = stream_chat(LOOPBACK, self.port, self.max_tokens, index, self.read_timeout)
            with self._lock:
                self.outcomes.append(outcome)

    @property
    def finished(self) -> int:
        return len(self.outcomes)

    def served_by(self, name: str) -> list[Outcome]:
        with self._lock:
            return [outcome for outcome in self.outcomes if outcome.server == name]

    def statuses(self) -> Counter[str]:
        with self._lock:
            return Counter(outcome.label() for outcome in self.outcomes)

    def __enter__(self) -> Streams:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


class Load:
    """``requests`` streaming chats, ``concurrency`` at a time, none started after ``deadline`` seconds.

    ``max_tokens`` is a number or a callable of the request index (mixed load).
    """

    def __init__(self, host: str, port: int, requests: int, concurrency: int, deadline: float,
                 max_tokens: int | Callable[[int], int] = 64, read_timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self.requests, self.concurrency, self.deadline = requests, concurrency, deadline
        self.max_tokens = max_tokens if callable(max_tokens) else (lambda _, n=max_tokens: n)
        self.read_timeout = read_timeout
        self.outcomes: list[Outcome] = []
        self.not_started = 0
        self.started_at = 0.0
        self._lock = threading.Lock()
        self._next = 0

    @property
    def finished(self) -> int:
        return len(self.outcomes)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(outcome.label() for outcome in self.outcomes)

    def _worker(self) -> None:
        while True:
            with self._lock:
                index, self._next = self._next, self._next + 1
            if index >= self.requests:
                return
            if time.monotonic() > self.started_at + self.deadline:
                with self._lock:
                    self.not_started += 1
                continue
            outcome = stream_chat(self.host, self.port, self.max_tokens(index), index, self.read_timeout)
            with self._lock:
                self.outcomes.append(outcome)

    def run(self) -> bool:
        """Run to the end; False if a worker was still busy ``read_timeout`` past the deadline (a hang)."""
        self.started_at = time.monotonic()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="load")
        futures = [pool.submit(self._worker) for _ in range(self.concurrency)]
        _, pending = wait(futures, timeout=self.deadline + self.read_timeout)
        pool.shutdown(wait=not pending)
        return not pending


class IncarnationDeferrals(BackgroundSampler):
    """``llamacpp:requests_deferred`` per server and process id; a sample is kept only if the pid was the
    same before and after it (a restart in between would mix two incarnations)."""

    def __init__(self, servers: Mapping[str, LlamaServer], interval: float = 0.05) -> None:
        super().__init__(interval)
        self.servers = dict(servers)
        self.max_deferred: dict[tuple[str, int], float] = {}
        self.sample_counts: Counter[tuple[str, int]] = Counter()
        self.nonzero: list[tuple[float, str, int, float]] = []  # (time, server, pid, value)
        for name in self.servers:
            self.add(name, lambda name=name: self._sample(name))  # type: ignore[misc]

    def _pid(self, name: str) -> int | None:
        proc = self.servers[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _sample(self, name: str) -> bool:
        pid = self._pid(name)
        value = self.servers[name].metric("llamacpp:requests_deferred") if pid is not None else None
        if pid is None or value is None or pid != self._pid(name):
            return False
        key = (name, pid)
        self.max_deferred[key] = max(self.max_deferred.get(key, 0.0), value)
        self.sample_counts[key] += 1
        if value:
            self.nonzero.append((time.monotonic(), name, pid, value))
        return True

    def incarnations(self, name: str) -> int:
        return sum(1 for server, _ in self.sample_counts if server == name)

    def worst(self) -> float:
        return max(self.max_deferred.values(), default=0.0)


class StateWatch(BackgroundSampler):
    """HAProxy's view of every server of ``backend``, polled on the stats socket: each change of status."""

    def __init__(self, haproxy: HAProxy, backend: str, interval: float = 0.02) -> None:
        super().__init__(interval)
        self.haproxy, self.backend = haproxy, backend
        self.transitions: list[tuple[float, str, str]] = []  # (time, server, status word: UP, DOWN, MAINT...)
        self._last: dict[str, str] = {}
        self.add("haproxy", self._poll)

    def _poll(self) -> bool:
        try:
            rows = self.haproxy.stats()
        except OSError:
            return False
        now = time.monotonic()
        for row in rows:
            if row["pxname"] != self.backend or row["svname"] in ("FRONTEND", "BACKEND"):
                continue
            status = row["status"].split(" ")[0]
            if self._last.get(row["svname"]) != status:
                self._last[row["svname"]] = status
                self.transitions.append((now, row["svname"], status))
        return True

    def downs(self, server: str | None = None) -> list[tuple[float, str]]:
        """Each time a server went from UP to anything else, with its time."""
        previous: dict[str, str] = {}
        found = []
        for at, name, status in self.transitions:
            if previous.get(name) == "UP" and status != "UP" and server in (None, name):
                found.append((at, name))
            previous[name] = status
        return found


def unexcused_failures(outcomes: list[Outcome], kills: list[Kill]) -> list[Outcome]:
    """The failed requests that no kill explains. The rule:

    A request that did not end as a complete 200 (a non-200, a 200 cut short, a connection error or a
    timeout) is excused only by a SIGKILL of a llama-server S (primary or standby) that it overlapped:
    it started before S was reaped and ended after the signal, and its stream named S, or named no
    server because no chunk arrived. A SIGKILLed process takes a moment to die, and a slot freed by a
    cut request can be handed to the next request in that moment: it was running on S when S died.
    Kills of the agent excuse nothing; nor does a dead server: a request sent after S was reaped must
    be served elsewhere.
    """
    server_kills = [kill for kill in kills if kill.event.kind != AGENT]
    return [outcome for outcome in outcomes if outcome.failed
            and not any(outcome.started < kill.dead_at and outcome.ended >= kill.killed_at
                        and outcome.server in (None, kill.event.target) for kill in server_kills)]


def summary(load: Load, kills: list[Kill], deferrals: IncarnationDeferrals) -> dict[str, Any]:
    """What a run did, in numbers that fit a report line."""
    return {
        "statuses": dict(sorted(load.counts().items())),
        "not_started": load.not_started,
        "kills": Counter(kill.event.kind for kill in kills),
        "deferred_max": deferrals.worst(),
        "deferral_samples": sum(deferrals.sample_counts.values()),
        "incarnations": {name: deferrals.incarnations(name) for name in deferrals.servers},
    }
