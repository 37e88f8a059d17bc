"""SIMULATOR (benchmarks only, not llama.cpp): the service model of a llama.cpp server, with its
prompt cache, and the ideal queue computed with it.

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
  lasts ``step_seconds(busy)`` plus, for each request joining at this step, its UNCACHED
  prompt tokens times ``prompt_ms_per_token``: prompt processing slows everyone's step.
  (llama.cpp splits a long prompt into ``n_batch`` chunks over several steps; the model
  charges it in one.)
- At the step's end every request in the batch emits one token. A request's first token
  is its time to first token; a request that has emitted ``output_tokens`` tokens finishes
  and frees its slot at that step's end.
- A cancelled request (client gone) frees its slot at once; a step already running keeps
  its computed duration.

Prompt cost, calibrated: prompt processing per token is ``PP_TG_RATIO`` (80) times cheaper than
one single-stream decode step, unless a server says otherwise. llama.cpp's own llama-bench
figures for a 7B model on one GPU: 4,494 t/s pp512 vs 54.7 t/s tg128 (ratio 82; F16, CUDA,
ggml-org/llama.cpp pull request 3776), and on an RTX 4090 18,155 t/s pp512 vs 236 t/s tg128
(ratio 77; qwen2 3B Q4_0, pull request 12183).

Prompt cache (llama-server's, ``PromptCache``): text is tokenized as one token per 4 bytes
(``tokens``), deterministic; a common prefix of ``n`` bytes is ``n // 4`` shared tokens.

- Each slot keeps its last prompt plus what it generated. A request that gets a slot reuses
  the longest common token prefix with it, at most ``prompt_tokens - 1`` (llama.cpp always
  evaluates the last prompt token again), and pays only the rest.
- Which idle slot: the one whose cached text shares the longest prefix with the request, if
  that is more than ``SLOT_PROMPT_SIMILARITY`` (llama-server's ``--slot-prompt-similarity``,
  0.1) of its prompt; else the least recently used one.
- Host memory (``--cache-ram``, 8192 MiB by default in the pinned build): a slot's text is
  saved there before another prompt overwrites it (unless it would keep all of it); a
  request whose prefix is longer in host memory than in its slot restores it from there
  (copy time not charged). The size limit is in tokens (``ServerSpec.cache_tokens``,
  default 65,536 = 8192 MiB / 128 KiB, the f16 KV of one token of an 8B Llama-3-class
  model); least recently used entries are evicted first; an entry that another one extends
  is replaced by it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

PP_TG_RATIO = 80.0  # prompt tokens processed per decode-step time (see the module docstring)
SLOT_PROMPT_SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default
CACHE_RAM_TOKENS = 65_536  # --cache-ram 8192 MiB / 128 KiB of f16 KV per token (8B, GQA)
BYTES_PER_TOKEN = 4
TOKEN = "tok "  # what the simulator generates, one token (4 bytes)


def tokens(text: str) -> int:
    """SIMULATOR tokenizer: one token per 4 bytes of (UTF-8) text, at least 1."""
    return max(1, len(text.encode()) // BYTES_PER_TOKEN)


def common_tokens(a: str, b: str) -> int:
    """Tokens two texts share at their start: whole 4-byte tokens of their common prefix."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # longest common prefix by bisection: slices compare in C
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return len(a[:low].encode()) // BYTES_PER_TOKEN


def chat_template(messages: list[tuple[str, str]]) -> str:
    """SIMULATOR chat template (ChatML, as Qwen's): the prompt text a chat's (role, content) list becomes."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages) + \
        "<|im_start|>assistant\n"


@dataclass(frozen=True)
class ServerSpec:
    """One llama.cpp server: its slots and its speed."""

    name: str
    slots: int
    token_ms: float  # one decode step with a single busy slot
    batch_slowdown: float = 0.1  # each extra busy slot makes the step this much longer (fraction)
    prompt_ms_per_token: float | None = None  # per uncached prompt token; None: token_ms / PP_TG_RATIO
    cache_tokens: int = CACHE_RAM_TOKENS  # host-memory prompt cache (--cache-ram), in tokens

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a server needs a name")
        if self.slots < 1:
            raise ValueError(f"{self.name}: slots must be >= 1")
        if not self.token_ms > 0:
            raise ValueError(f"{self.name}: token_ms must be > 0")
        if self.batch_slowdown < 0 or self.prompt_ms < 0 or self.cache_tokens < 0:
            raise ValueError(f"{self.name}: batch_slowdown, prompt_ms_per_token and cache_tokens must be >= 0")

    @property
    def prompt_ms(self) -> float:
        """Milliseconds per uncached prompt token."""
        return self.token_ms / PP_TG_RATIO if self.prompt_ms_per_token is None else self.prompt_ms_per_token

    def step_seconds(self, busy: int) -> float:
        """Duration of one decode step with ``busy`` requests in the batch (prompt cost apart)."""
        if busy < 1:
            raise ValueError("a step needs at least one busy slot")
        return self.token_ms / 1000 * (1 + self.batch_slowdown * (busy - 1))

    def prompt_seconds(self, prompt_tokens: float) -> float:
        """Processing ``prompt_tokens`` uncached prompt tokens."""
        return prompt_tokens * self.prompt_ms / 1000

    def tokens_per_second_full(self) -> float:
        """Decode throughput with every slot busy."""
        return self.slots / self.step_seconds(self.slots)


@dataclass(frozen=True)
class RequestSpec:
    id: int
    arrival: float  # seconds from the start of the run (a follow-up turn: see ``follows``)
    prompt_tokens: int
    output_tokens: int
    text: str = ""  # the prompt as the server reads it: what its cache compares ("": nothing to reuse)
    follows: int | None = None  # a conversation's previous turn: sent ``think`` seconds after that one ends
    think: float = 0.0

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
    cached_tokens: int = 0  # prompt tokens reused from the server's cache
    arrival: float = 0.0  # when it was sent (a follow-up turn's depends on when its previous turn ended)


class PromptCache:
    """llama-server's host-memory prompt cache (``--cache-ram``): whole texts, least recently used first out,
    at most ``limit`` tokens in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[str, int] = OrderedDict()  # text -> its tokens, oldest use first
        self.size = 0

    def __contains__(self, text: str) -> bool:
        return text in self._entries

    def best(self, text: str) -> tuple[int, str | None]:
        """The entry sharing the longest token prefix with ``text``: (tokens shared, entry)."""
        best, entry = 0, None
        for candidate in self._entries:
            shared = common_tokens(text, candidate)
            if shared > best:
                best, entry = shared, candidate
        return best, entry

    def touch(self, text: str) -> None:
        self._entries.move_to_end(text)

    def save(self, text: str) -> None:
        """Keep ``text`` (most recently used); entries it extends go; the oldest go while over the limit."""
        size = tokens(text)
        if not text or size > self.limit:
            return
        for entry in [e for e in self._entries if text.startswith(e)]:
            self.size -= self._entries.pop(entry)
        self._entries[text] = size
        self.size += size
        while self.size > self.limit:
            _, evicted = self._entries.popitem(last=False)
            self.size -= evicted


@dataclass
class _Slot:
    request: RequestSpec
    index: int  # which of the server's slots (each keeps its own cached text)
    cached: int = 0  # prompt tokens reused from the cache
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
        self._texts = [""] * spec.slots  # each slot's cache: its last prompt and what it generated
        self._used = [0] * spec.slots  # when each slot last took a request (a counter)
        self._uses = 0
        self.host = PromptCache(spec.cache_tokens)
        self.reused: dict[int, int] = {}  # request id -> prompt tokens it reused (set when it gets a slot)
        self.prompt_tokens_total = 0  # over every request that got a slot
        self.cached_tokens_total = 0

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
            self._seat(request_id, spec)
            return False
        self._deferred.append((request_id, spec))
        self.deferred_count += 1
        return True

    def cached_if_sent(self, spec: RequestSpec) -> int:
        """The prompt tokens ``spec`` would reuse here if it got a free slot now (there must be one)."""
        return self._plan(spec)[1]

    def cancel(self, request_id: int) -> bool:
        """Forget a request (client gone); its slot frees at once. False if unknown."""
        slot = self._slots.pop(request_id, None)
        if slot is not None and slot.in_batch:
            self._texts[slot.index] = slot.request.text + TOKEN * slot.emitted
        if slot is None:
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
                self._texts[slot.index] = slot.request.text
                prompt += self.spec.prompt_seconds(slot.request.prompt_tokens - slot.cached)
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
                self._texts[slot.index] = slot.request.text + TOKEN * slot.emitted
                del self._slots[request_id]
                self.completed += 1
        self.last_emitted = tuple(emitted)
        self._fill()
        return first, finished

    def _fill(self) -> None:
        """Free slots go to the oldest deferred requests."""
        while self._deferred and len(self._slots) < self.spec.slots:
            request_id, spec = self._deferred.popleft()
            self._seat(request_id, spec)

    def _plan(self, spec: RequestSpec) -> tuple[int, int, str | None]:
        """llama-server's choice for a request among the idle slots: (slot, prompt tokens reused, the host
        cache entry to restore first or None)."""
        taken = {slot.index for slot in self._slots.values()}
        idle = [index for index in range(self.spec.slots) if index not in taken]
        shared = {index: common_tokens(spec.text, self._texts[index]) if spec.text else 0 for index in idle}
        best = max(idle, key=lambda index: (shared[index], -index))
        if shared[best] <= SLOT_PROMPT_SIMILARITY * spec.prompt_tokens:
            best = min(idle, key=lambda index: (self._used[index], index))  # least recently used
        host, entry = self.host.best(spec.text) if spec.text else (0, None)
        reuse, restore = (host, entry) if host > shared[best] else (shared[best], None)
        return best, max(0, min(reuse, spec.prompt_tokens - 1)), restore

    def _seat(self, request_id: int, spec: RequestSpec) -> None:
        index, cached, restore = self._plan(spec)
        old = self._texts[index]
        if restore is not None:
            self.host.touch(restore)  # restored: the most recently used entry
        if old and common_tokens(spec.text, old) < tokens(old):
            self.host.save(old)  # the slot's cache is about to be overwritten: keep it in host memory
        self._uses += 1
        self._used[index] = self._uses
        self._slots[request_id] = _Slot(spec, index, cached)
        self.reused[request_id] = cached
        self.prompt_tokens_total += spec.prompt_tokens
        self.cached_tokens_total += cached


@dataclass
class _Tracking:
    server: str = ""
    first: float | None = None
    done: float | None = None
    arrival: float = 0.0
    cached: int = 0


@dataclass(frozen=True)
class Hold:
    """A placement's answer for a request that would rather wait a while for a server now full: it stays queued
    (requests behind it may go), asked again after ``seconds`` at the latest."""

    seconds: float


# Which server takes a queued request, given how long it has waited: its index in the name-sorted servers (one
# with a free slot), None if none has a slot for it (the whole queue waits), or Hold.
Placement = Callable[[list["ServerState"], RequestSpec, float], "int | Hold | None"]


def ideal(trace: list[RequestSpec], fleet: list[ServerSpec], placement: Placement | None = None) -> list[Outcome]:
    """The ideal queue: one perfect FIFO in front of the whole fleet, with exact instant knowledge.

    Discrete-event simulation in virtual time. In arrival order (ties by id), a request goes
    to a server with a free slot the moment one exists: the one where its first step would
    end soonest, knowing every server's prompt cache exactly (``step_seconds(busy + 1)`` plus
    its uncached prompt there), ties by more free slots, then name. So the ideal has perfect
    affinity while the server that holds a conversation's cache has a slot free, and trades
    it for speed when another server's step would still be faster; it never waits for a
    particular server. It is never sent to a full server, so it never defers. A follow-up
    turn (``follows``) arrives ``think`` seconds after its previous turn ended. Events at the
    same instant are taken together: steps end (slots free), arrivals join the queue, the
    queue is dispatched, then every server with work and no running step starts one.
    Outcomes come in ``trace`` order. ``placement`` replaces the choice of server (the queue stays
    perfect), to measure what another rule would cost (``bench.routing.placement``); a request it holds
    lets the ones behind it go first.
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
    followers: dict[int, RequestSpec] = {}
    for request in trace:
        if request.follows is not None:
            if request.follows not in tracking or request.follows in followers:
                raise ValueError(f"request {request.id} follows {request.follows}: unknown, or taken")
            followers[request.follows] = request

    place = placement or first_token_soonest
    servers = [ServerState(spec) for spec in sorted(fleet, key=lambda s: s.name)]
    arrivals = [(r.arrival, r.id, r) for r in trace if r.follows is None]
    heapq.heapify(arrivals)
    queue: deque[RequestSpec] = deque()
    step_ends: list[tuple[float, int]] = []  # (time, server index); one per running server
    recheck: list[float] = []  # when held requests are asked again (a heap; the soonest is all it needs)

    while arrivals or step_ends or recheck:
        now = min(arrivals[0][0] if arrivals else float("inf"), step_ends[0][0] if step_ends else float("inf"),
                  recheck[0] if recheck else float("inf"))
        while recheck and recheck[0] <= now:
            heapq.heappop(recheck)
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
                follower = followers.get(request_id)
                if follower is not None:
                    tracking[follower.id].arrival = now + follower.think
                    heapq.heappush(arrivals, (now + follower.think, follower.id, follower))
        while arrivals and arrivals[0][0] == now:
            queue.append(heapq.heappop(arrivals)[2])
        position = 0
        while position < len(queue) and any(state.free > 0 for state in servers):
            request = queue[position]
            best = place(servers, request, now - tracking[request.id].arrival)
            if best is None:
                break
            if isinstance(best, Hold):
                if not recheck or now + best.seconds < recheck[0]:  # each dispatch asks every held one again
                    heapq.heappush(recheck, now + best.seconds)
                position += 1
                continue
            del queue[position]
            servers[best].admit(request.id, request)
            tracking[request.id].server = servers[best].spec.name
            tracking[request.id].cached = servers[best].reused.pop(request.id)
            touched.add(best)
        for index in sorted(touched):
            if servers[index].needs_step:
                heapq.heappush(step_ends, (servers[index].start_step(now), index))

    outcomes = []
    for request in trace:
        t = tracking[request.id]
        assert t.first is not None and t.done is not None, "every request finishes once events run out"
        outcomes.append(Outcome(id=request.id, server=t.server, ttft=t.first - t.arrival, e2e=t.done - t.arrival,
                                deferred=False, cached_tokens=t.cached, arrival=t.arrival))
    return outcomes


def first_token_soonest(servers: list[ServerState], request: RequestSpec, _waited: float = 0.0) -> int | None:
    """The ideal's rule: the server where the first token would come soonest, counting its cached prefix."""
    best, best_key = None, None
    for index, state in enumerate(servers):  # sorted by name, so the first of equal keys wins on name
        if state.free <= 0:
            continue
        uncached = request.prompt_tokens - state.cached_if_sent(request)
        key = (state.spec.step_seconds(state.busy + 1) + state.spec.prompt_seconds(uncached), -state.free)
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best
