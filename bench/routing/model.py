"""The service model of a llama.cpp server, and the ideal queue computed with it.

Pure Python: no I/O, no asyncio, no clock of its own. ``ServerState`` is the one
implementation of the rules below; ``ideal()`` drives it in virtual time and the real-time
simulator (``bench.routing.simulator``) drives it with the event loop's clock, so the two
can only disagree by how late the event loop wakes up.

Service model (llama.cpp-like continuous batching), per server:

- A request sent to the server takes a free slot at once if one exists (``busy`` counts it
  from then on). Otherwise it waits in the server's internal FIFO ("deferred", like
  llama.cpp's ``requests_deferred``) and counts in ``deferred_count``; when a slot frees it
  goes to the oldest deferred request.
- The server runs steps back to back while any slot is taken; an idle server starts a step
  as soon as a request is admitted.
- At a step's start, every slotted request not yet in the batch joins it (FIFO); the step
  lasts ``step_seconds(busy)`` plus, for each request joining at this step,
  ``prompt_tokens * prompt_ms_per_token / 1000``: prompt processing slows everyone's step.
- At the step's end every request in the batch emits one token. A request's first token
  is its time to first token; a request that has emitted ``output_tokens`` tokens finishes
  and frees its slot at that step's end.
- A cancelled request (client gone) frees its slot at once; a step already running keeps
  its computed duration.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSpec:
    """One llama.cpp server: its slots and its speed."""

    name: str
    slots: int
    token_ms: float  # one decode step with a single busy slot
    batch_slowdown: float = 0.1  # each extra busy slot makes the step this much longer (fraction)
    prompt_ms_per_token: float = 0.05  # prompt processing, paid in the step a request joins

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a server needs a name")
        if self.slots < 1:
            raise ValueError(f"{self.name}: slots must be >= 1")
        if not self.token_ms > 0:
            raise ValueError(f"{self.name}: token_ms must be > 0")
        if self.batch_slowdown < 0 or self.prompt_ms_per_token < 0:
            raise ValueError(f"{self.name}: batch_slowdown and prompt_ms_per_token must be >= 0")

    def step_seconds(self, busy: int) -> float:
        """Duration of one decode step with ``busy`` requests in the batch (prompt cost apart)."""
        if busy < 1:
            raise ValueError("a step needs at least one busy slot")
        return self.token_ms / 1000 * (1 + self.batch_slowdown * (busy - 1))

    def prompt_seconds(self, prompt_tokens: int) -> float:
        return prompt_tokens * self.prompt_ms_per_token / 1000

    def tokens_per_second_full(self) -> float:
        """Decode throughput with every slot busy."""
        return self.slots / self.step_seconds(self.slots)


@dataclass(frozen=True)
class RequestSpec:
    id: int
    arrival: float  # seconds from the start of the run
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"request {self.id}: prompt_tokens must be >= 0")
        if self.output_tokens < 1:
            raise ValueError(f"request {self.id}: output_tokens must be >= 1")


@dataclass
class Outcome:
    id: int
    server: str
    ttft: float  # seconds from arrival to the first token
    e2e: float  # seconds from arrival to the last token
    deferred: bool  # waited inside the server for a slot


@dataclass
class _Slot:
    request: RequestSpec
    in_batch: bool = False
    emitted: int = 0


class ServerState:
    """One server under the service model; the caller owns the clock and calls, in order:
    ``admit`` whenever a request arrives, ``start_step`` when ``needs_step``, ``end_step``
    at the time ``start_step`` returned."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._slots: dict[int, _Slot] = {}  # insertion order is admission order
        self._deferred: deque[tuple[int, RequestSpec]] = deque()
        self._step_end: float | None = None
        self.deferred_count = 0  # requests that ever had to wait in the internal FIFO
        self.completed = 0
        self.last_emitted: tuple[int, ...] = ()  # ids that emitted a token at the last end_step

    @property
    def busy(self) -> int:
        """Slots taken (including requests that join the batch at the next step's start)."""
        return len(self._slots)

    @property
    def queued(self) -> int:
        """Requests waiting in the internal FIFO now (llama.cpp's requests_deferred)."""
        return len(self._deferred)

    @property
    def free(self) -> int:
        return self.spec.slots - len(self._slots)

    @property
    def running(self) -> bool:
        return self._step_end is not None

    @property
    def step_end(self) -> float | None:
        return self._step_end

    @property
    def needs_step(self) -> bool:
        return self._step_end is None and bool(self._slots)

    def admit(self, request_id: int, spec: RequestSpec) -> bool:
        """Hand a request to this server; True when it has to wait for a slot (deferred)."""
        if request_id in self._slots:
            raise ValueError(f"request {request_id} is already on {self.spec.name}")
        if self.free > 0 and not self._deferred:
            self._slots[request_id] = _Slot(spec)
            return False
        self._deferred.append((request_id, spec))
        self.deferred_count += 1
        return True

    def cancel(self, request_id: int) -> bool:
        """Forget a request (client gone); its slot frees at once. False if unknown."""
        if self._slots.pop(request_id, None) is None:
            before = len(self._deferred)
            self._deferred = deque(item for item in self._deferred if item[0] != request_id)
            if len(self._deferred) == before:
                return False
        self._fill()
        return True

    def start_step(self, now: float) -> float:
        """Start a step at ``now``: slotted requests join the batch; returns the step's end time."""
        if self._step_end is not None:
            raise RuntimeError(f"{self.spec.name}: a step is already running")
        self._fill()
        if not self._slots:
            raise RuntimeError(f"{self.spec.name}: idle, nothing to step")
        prompt = 0.0
        for slot in self._slots.values():
            if not slot.in_batch:
                slot.in_batch = True
                prompt += self.spec.prompt_seconds(slot.request.prompt_tokens)
        self._step_end = now + self.spec.step_seconds(len(self._slots)) + prompt
        return self._step_end

    def end_step(self, now: float) -> tuple[list[int], list[int]]:
        """End the running step at ``now``: every request in the batch emits one token.

        Returns (ids that emitted their first token, ids that finished and freed their slot);
        ``last_emitted`` holds every id that emitted a token."""
        if self._step_end is None:
            raise RuntimeError(f"{self.spec.name}: no step is running")
        if now < self._step_end - 1e-9:
            raise ValueError(f"{self.spec.name}: step ends at {self._step_end}, not {now}")
        self._step_end = None
        first, finished, emitted = [], [], []
        for request_id, slot in list(self._slots.items()):
            if not slot.in_batch:
                continue  # joined (or moved in from the FIFO) during the step: next step
            slot.emitted += 1
            emitted.append(request_id)
            if slot.emitted == 1:
                first.append(request_id)
            if slot.emitted >= slot.request.output_tokens:
                finished.append(request_id)
                del self._slots[request_id]
                self.completed += 1
        self.last_emitted = tuple(emitted)
        self._fill()
        return first, finished

    def _fill(self) -> None:
        """Free slots go to the oldest deferred requests."""
        while self._deferred and len(self._slots) < self.spec.slots:
            request_id, spec = self._deferred.popleft()
            self._slots[request_id] = _Slot(spec)


@dataclass
class _Tracking:
    server: str = ""
    first: float | None = None
    done: float | None = None
    arrival: float = 0.0


def ideal(trace: list[RequestSpec], fleet: list[ServerSpec]) -> list[Outcome]:
    """The ideal queue: one perfect FIFO in front of the whole fleet, with exact instant knowledge.

    Discrete-event simulation in virtual time. In arrival order (ties by id), a request goes
    to a server with a free slot the moment one exists: the one whose step would be fastest
    with it (lowest ``step_seconds(busy + 1)``), ties by more free slots, then name. It is
    never sent to a full server, so it never defers. Events at the same instant are taken
    together: steps end (slots free), arrivals join the queue, the queue is dispatched, then
    every server with work and no running step starts one. Outcomes come in ``trace`` order.
    """
    if not trace:
        return []
    if not fleet:
        raise ValueError("ideal() needs at least one server")
    names = [spec.name for spec in fleet]
    if len(set(names)) != len(names):
        raise ValueError("server names must be unique")
    tracking: dict[int, _Tracking] = {}
    for request in trace:
        if request.id in tracking:
            raise ValueError(f"request id {request.id} appears twice")
        tracking[request.id] = _Tracking(arrival=request.arrival)

    servers = [ServerState(spec) for spec in sorted(fleet, key=lambda s: s.name)]
    arrivals = sorted(trace, key=lambda r: (r.arrival, r.id))
    queue: deque[RequestSpec] = deque()
    step_ends: list[tuple[float, int]] = []  # (time, server index); one per running server
    next_arrival = 0

    while next_arrival < len(arrivals) or step_ends:
        now = min(arrivals[next_arrival].arrival if next_arrival < len(arrivals) else float("inf"),
                  step_ends[0][0] if step_ends else float("inf"))
        touched = set()  # servers that may need a step now: their step ended, or they got a request
        while step_ends and step_ends[0][0] == now:
            _, index = heapq.heappop(step_ends)
            touched.add(index)
            state = servers[index]
            first, finished = state.end_step(now)
            for request_id in first:
                tracking[request_id].first = now
            for request_id in finished:
                tracking[request_id].done = now
        while next_arrival < len(arrivals) and arrivals[next_arrival].arrival == now:
            queue.append(arrivals[next_arrival])
            next_arrival += 1
        while queue:
            best = _fastest_with_free_slot(servers)
            if best is None:
                break
            request = queue.popleft()
            servers[best].admit(request.id, request)
            tracking[request.id].server = servers[best].spec.name
            touched.add(best)
        for index in sorted(touched):
            if servers[index].needs_step:
                heapq.heappush(step_ends, (servers[index].start_step(now), index))

    outcomes = []
    for request in trace:
        t = tracking[request.id]
        assert t.first is not None and t.done is not None, "every request finishes once events run out"
        outcomes.append(Outcome(id=request.id, server=t.server, ttft=t.first - t.arrival,
                                e2e=t.done - t.arrival, deferred=False))
    return outcomes


def _fastest_with_free_slot(servers: list[ServerState]) -> int | None:
    best, best_key = None, None
    for index, state in enumerate(servers):  # sorted by name, so the first of equal keys wins on name
        if state.free <= 0:
            continue
        key = (state.spec.step_seconds(state.busy + 1), -state.free)
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best
