"""The endpoint picker for balancers without agent-check (Envoy): slot-aware choice plus one fair queue.

Each request asks for a lease on one backend. The picker chooses the usable backend with
the most free slots, where "busy" is the last poll's count corrected for what the poll
cannot know yet:

    busy = polled processing
           + leases issued after that poll started (or just before: in transit) and still running
           - leases issued before that poll started and released after it finished

so two requests a millisecond apart never both get the last free slot, and a slot freed by a
finished request is reused at once instead of at the next poll. A lease issued just before a poll
may be in it or not. A poll that counts no more requests than the leases it could have seen shows no
load from outside the balancer: busy is then our own running leases, exact (what HAProxy's maxconn
counts), and the picker asks for no poll out of turn. One that counts more does show outside load;
then a lease issued just before it counts on top, and while requests wait, such a backend is polled
again once its leases have settled, rather than looking a slot fuller until its next turn; a request
that ends right after a poll that may have counted it has its backend polled at once. Busy is never
taken below the number of our own running leases, since llama.cpp lists a new request as processing
only once its main loop picks it up. When no slot is free (or no backend is usable at all: scale from
zero), requests wait in one FIFO across the whole fleet, bounded in length and time, with the same
outcomes as the HAProxy path.
The one exception to its order: with affinity_wait, a conversation's request whose backend is full
while another has a slot free is held for its own backend a bounded time, and those behind it go
first (docs/affinity.md).

Each lease also names alternates, where Envoy retries if the chosen backend refuses the
connection: others with a slot free that no other request in transit to the same backend was
offered, idle standby first (nothing is placed there while primaries serve), so a retry does
not land on a full server. A backend the filter saw refuse a connection is placed nothing until
a poll that started after the refusal: a killed server would otherwise look free (its requests
ended) until the next poll. Behind Envoy, a backend that joined gets requests once Envoy has applied the
endpoint list that names it (agentcheck.eds).

Model-aware routing (a request that names a model): the request goes only to a backend whose slots serve
that model (agentcheck.model_routing.model_share: a plain server's aliases split its slots), and its lease
counts against that share. Each model has its own FIFO with its own limits (Fleet.limits), so a burst on one
model never delays another. A model a llama.cpp router has not loaded gets one request at a time on each such
backend (the one that loads it), and only while no backend where it is loaded has a free slot. A request that
names no model (a one-model fleet) is placed as before, on the whole server's slots, in its own FIFO.
"""

from __future__ import annotations

import asyncio
import heapq
import re
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from agentcheck.model import FleetModel, Member, PollWindow, Role
from agentcheck.model_routing import model_share, served_models
from agentcheck.policy import speed_class
from agentcheck.status import ModelLoad, ModelStatus

# Prompt-cache affinity: conversation keys remembered per model, the most recent this many.
AFFINITY_ENTRIES = 65536
LEASE_MAX_AGE = 3600.0  # a lease never released (client gone mid-stream) stops counting after this
# A picked request needs a moment to reach llama.cpp's slot; a poll that started sooner than this
# after the lease may not show it yet, so the lease keeps counting until a later poll.
SETTLE_SECONDS = 0.1
# A lease id is a random token (16 bytes, URL-safe base64: 22 characters), not a counter: only the
# request it was given to can release it, so nobody can free a slot someone else holds.
LEASE_ID_BYTES = 16
LEASE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
MAX_ALTERNATES = 2  # the llama routes' num_retries: one alternate per retry
# When the picker opens (agent start), requests Envoy's fallback placed while the agent was away may still
# be on their way to a slot; llama.cpp lists one as processing once its task is picked up, a few hundred
# ms later on a busy host. Nothing is placed until every usable backend has had a poll that began this
# long after opening (or one poll interval more has passed): placing on each as its poll comes would
# send the first requests to whichever backend is polled first, not to the one with most room.
OPEN_SETTLE_SECONDS = 0.3
# Opening asks for a poll of every backend this much after OPEN_SETTLE_SECONDS, not at its turn up to an
# interval later: a timer may fire a moment early, and a poll that began before the settle's end counts for
# nothing.
OPEN_POLL_MARGIN = 0.01
# A conversation's backend can look full only because its last poll may have counted a request that has ended
# since (issued just before the poll: busy() cannot tell, and keeps counting it). Its next turn then waits this
# long at most for a poll asked for at once, instead of re-reading its whole history on another server: a
# /slots poll takes milliseconds, a re-prefill far longer (docs/affinity.md).
AFFINE_POLL_WAIT = 0.1
# A request held for its conversation's backend (affinity_wait) stops waiting for it this long before its
# buffered_request_timeout, time enough to take another backend's slot.
HOLD_MARGIN = 0.05


class PollSeen(NamedTuple):
    """When a backend's poll began, and how many requests it counted running."""

    started: float
    processing: int


class PickerError(Exception):
    """A request the picker will not place."""


class BufferFull(PickerError):
    """max_buffered_requests are already waiting."""


class BufferTimeout(PickerError):
    """No slot became free within buffered_request_timeout."""


@dataclass(frozen=True)
class Affinity:
    """What Envoy's filter says about a request's conversation (docs/affinity.md): the keys the backend that
    takes it is remembered under, and those to look up, best first."""

    remember: tuple[str, ...]
    lookups: tuple[str, ...]


@dataclass(frozen=True)
class Held:
    """No lease yet for a conversation whose backend is full while another has a slot free: it waits for its own
    backend (affinity_wait), and requests behind it may go first."""

    backend: str


@dataclass
class Lease:
    id: str
    backend: str
    address: str
    issued_at: float
    released_at: float | None = None
    alternates: tuple[str, ...] = ()  # addresses, in the order Envoy tries them after a refused connection
    model: str | None = None  # the model the request named: the lease counts against that model's slots

    @property
    def endpoints(self) -> str:
        """The x-paddler-endpoint value: override_host tries these in order, one per attempt."""
        return ",".join((self.address, *self.alternates))


class Picker:
    def __init__(self, model: FleetModel, max_buffered_requests: int, buffered_request_timeout: float,
                 clock: Callable[[], float] = time.monotonic,
                 in_balancer: Callable[[str], bool] = lambda name: True,
                 limits: Callable[[str], tuple[int, float]] | None = None,
                 poll_soon: Callable[[str, float], None] = lambda name, delay: None,
                 affinity_wait: float = 0.0) -> None:
        """``in_balancer(name)``: whether Envoy has this backend's endpoint yet (agentcheck.eds); override_host
        ignores an address its cluster does not have, so nothing is placed on a backend before that.
        ``limits(model)``: (max_buffered_requests, buffered_request_timeout) of that model's queue (Fleet.limits);
        without it every model's queue has the balancer's. ``poll_soon(name, delay)``: poll that backend after
        ``delay`` seconds (Monitor.poll_soon): at once when a request ends that its last poll may still count,
        and once recent leases have settled when requests wait (_poll_when_settled). ``affinity_wait``: how long a
        conversation's request waits for the backend that took its last turn while another has a slot free
        (balancer.affinity_wait; 0: it never does)."""
        self._model = model
        self._in_balancer = in_balancer
        self._max_buffered_requests = max_buffered_requests
        self._buffered_request_timeout = buffered_request_timeout
        self._model_limits = limits or (lambda name: (max_buffered_requests, buffered_request_timeout))
        self._poll_soon = poll_soon
        self._clock = clock
        # Leases by backend (each in issue order) and by id: polls touch one backend, releases one id.
        self._leases: dict[str, dict[str, Lease]] = {}
        self._by_id: dict[str, Lease] = {}
        # One FIFO per model named (None: requests that name none); a model's is dropped once empty.
        self._queues: dict[str | None, deque[asyncio.Future[Lease]]] = {}
        self._poll_history: dict[str, tuple[PollSeen, PollSeen | None]] = {}  # backend → (latest, previous) poll
        self._refused: dict[str, float] = {}  # backend → when the filter last saw it refuse a connection
        self._names = {str(member.backend.address): member.name for member in model}
        self._trusted_from = float("-inf")  # polls that began before this may miss running requests
        self._settled_by = float("-inf")  # after opening: place nothing before every backend's poll, or this
        # (issued_at, backend, alternates, model) of recent leases: what a retry from that backend may land on
        self._offered: deque[tuple[float, str, tuple[str, ...], str | None]] = deque()
        # (model, conversation key) → the backend that last took it, oldest first (bounded, most recent kept).
        self._affine: OrderedDict[tuple[str | None, str], str] = OrderedDict()
        self._affinity_of: dict[asyncio.Future[Lease], Affinity] = {}  # waiting requests' conversations
        self._affinity_wait = affinity_wait
        self._held_since: dict[asyncio.Future[Lease], float] = {}  # waiting for their own backend since
        self._give_up_at: dict[asyncio.Future[Lease], float] = {}  # conversations' buffered_request_timeout
        # backend → (since, future) of conversations waiting for a poll of their backend that began after ``since``
        self._awaiting_poll: dict[str, list[tuple[float, asyncio.Future[None]]]] = {}
        self._settle_poll_at: dict[str, float] = {}  # backend → when the poll _poll_when_settled asked for starts

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def waiting_for(self, model: str | None) -> int:
        return len(self._queues.get(model, ()))

    def busy(self, name: str, model: str | None = None) -> int:
        """Our own running leases (exact for what this balancer placed, like HAProxy's connection count) while
        the last poll shows no load from outside the balancer (_shows_outside_load). Else the larger of those
        and the poll corrected by leases since (which lags: llama.cpp lists a request as processing only once
        its task is picked up, a few hundred ms later on a busy host). Outside load that a poll's count hides
        behind our requests it missed shows at the next poll.

        With ``model``: the slots of this backend that serve it (model_share; 0 when it serves none), counting
        leases for that model and those that named none (which may run on any of the server's slots)."""
        view = self._view(name, model)
        if view is None:
            return 0
        total, polled, leases = view
        own = sum(1 for lease in leases if lease.released_at is None)
        poll = self._model[name].poll
        if not self._shows_outside_load(poll, polled, leases):
            return min(own, total)
        poll_started = poll.started if poll else float("-inf")
        for lease in leases:
            if lease.released_at is None:
                if self._in_transit(lease, poll_started):
                    polled += 1
            elif self._counted_then_ended(lease, poll):
                # One released *during* the poll may or may not be in the count: it keeps counting
                # (_maybe_counted); a slot idle until the next poll beats a slot given twice.
                polled -= 1
        return max(0, min(max(own, polled), total))

    def _view(self, name: str, model: str | None) -> tuple[int, int, list[Lease]] | None:
        """(slots, processing by the last poll, our leases counted against them) of this backend as ``model``'s
        requests see it; None when it does not serve ``model``."""
        member = self._model[name]
        total, polled = member.status.slots_total, member.status.slots_processing
        if model is not None:
            share = model_share(member.backend, member.status, model)
            if share is None:
                return None
            total, polled = share.slots_total, share.slots_processing
        leases = [lease for lease in self._leases.get(name, {}).values()
                  if model is None or lease.model in (model, None)]
        return total, polled, leases

    def _outside_load(self, name: str, model: str | None) -> bool:
        """The last poll of this backend (its share of ``model``) shows load from outside the balancer, or there
        has been no poll. Only then does busy() count anything but our own running leases, so only then can a
        poll asked for to settle its count (release, _poll_when_settled, _await_affine_poll) free a slot sooner."""
        view = self._view(name, model)
        return view is not None and self._shows_outside_load(self._model[name].poll, view[1], view[2])

    def _counted_on_top(self, lease: Lease) -> bool:
        """busy() counts this lease by the poll and its corrections, not as one of our own, in some view of its
        backend: one that counts the lease (the whole server, and its model's share or, for a lease that named
        no model, every share) shows outside load."""
        member = self._model[lease.backend]
        views = (lease.model,) if lease.model is not None else served_models(member.backend, member.status)
        return any(self._outside_load(lease.backend, view) for view in (None, *views))

    @classmethod
    def _shows_outside_load(cls, poll: PollWindow | None, polled: int, leases: list[Lease]) -> bool:
        """The poll counts more running requests than the leases of ours it could have seen (some are not ours),
        or there has been none: what it shows is not known."""
        return poll is None or polled > sum(1 for lease in leases if cls._may_be_in(lease, poll))

    def candidates(self, model: str | None = None) -> list[str]:
        """Backends that may get new requests: ready, not drained primaries; else such standby ones. With
        ``model``: only those that serve it."""
        usable = [member for member in self._model if self._placeable(member) and self._serves(member, model)]
        primaries = [member.name for member in usable if member.role is Role.PRIMARY]
        return primaries or [member.name for member in usable]

    @staticmethod
    def _share(member: Member, model: str) -> ModelStatus | None:
        return model_share(member.backend, member.status, model)

    @staticmethod
    def _serves(member: Member, model: str | None) -> bool:
        """Any backend serves a request that names no model."""
        return model is None or Picker._share(member, model) is not None

    def open(self, poll_interval: float) -> None:
        """The agent starts answering Envoy's filter: see OPEN_SETTLE_SECONDS. Every backend is polled as soon
        as its poll can end the settle."""
        self._trusted_from = self._clock() + OPEN_SETTLE_SECONDS
        self._settled_by = self._trusted_from + poll_interval
        for member in self._model:
            self._poll_soon(member.name, OPEN_SETTLE_SECONDS + OPEN_POLL_MARGIN)

    def free_slots(self, model: str | None = None) -> dict[str, int]:
        """Free slots (of ``model``'s shares) on each candidate; a model a router has not loaded has none."""
        candidates = self.candidates(model)
        if not self._settled(candidates):
            return {}
        return self._free(candidates, model)

    def _free(self, candidates: list[str], model: str | None = None) -> dict[str, int]:
        return {name: self._total(name, model) - self.busy(name, model) for name in candidates}

    def _total(self, name: str, model: str | None) -> int:
        member = self._model[name]
        if model is None:
            return member.status.slots_total
        share = self._share(member, model)
        return share.slots_total if share is not None else 0

    def _limits(self, model: str | None) -> tuple[int, float]:
        if model is None:
            return self._max_buffered_requests, self._buffered_request_timeout
        return self._model_limits(model)

    def _buffer_room(self, model: str | None, max_waiting: int) -> int:
        """How many may wait for ``model``. While the opening settles, requests that would have got a slot
        wait too, so the slots free by the polls so far are room on top of the buffer: a burst then is
        refused exactly as it would be a moment later."""
        if self._trusted_from == float("-inf"):  # settled: no need to list the candidates
            return max_waiting
        candidates = self.candidates(model)
        if self._settled(candidates):
            return max_waiting
        return max_waiting + sum(max(0, free) for free in self._free(candidates, model).values())

    def _settled(self, candidates: list[str]) -> bool:
        if self._trusted_from == float("-inf"):
            return True
        polls = [self._model[name].poll for name in candidates]
        if self._clock() < self._settled_by and not all(poll and poll.started >= self._trusted_from
                                                       for poll in polls):
            return False
        self._trusted_from = float("-inf")  # once settled, for good
        return True

    def _try_lease(self, model: str | None = None, affinity: Affinity | None = None,
                   hold: bool = False) -> Lease | Held | None:
        """A lease on the best backend with a slot free, None if there is none. With ``hold``, Held instead while
        the conversation's backend is full and another has a slot free."""
        candidates = self.candidates(model)
        if not self._settled(candidates):
            return None
        free = self._free(candidates, model)
        # The backend that took this conversation last, if it has a slot free now (else, with ``hold``, wait for
        # it); else, among backends with a slot free, the fastest (agentcheck.policy.speed_class), then the
        # most free slots, the larger server, the name, for a stable order.
        affine = self._affine_choice(free, model, affinity)
        if affine is None and hold and affinity is not None and any(slots > 0 for slots in free.values()):
            home = self._home(model, affinity, candidates)
            if home is not None:
                return Held(home)
        speeds = {n: self._model[n].status.seconds_per_token for n in free}
        fastest = min((speed for speed in speeds.values() if speed is not None), default=None)
        name = affine or max(
            free, key=lambda n: (free[n] > 0, -speed_class(speeds[n], fastest), free[n], self._total(n, model), n),
            default=None)
        if name is None or free[name] <= 0:
            if model is None:
                return None
            name = self._cold(candidates, model)
            if name is None:
                return None
        now = self._clock()
        alternates = self._alternates(name, now, model)
        lease = Lease(self._new_id(), name, str(self._model[name].backend.address), now,
                      alternates=tuple(str(self._model[other].backend.address) for other in alternates), model=model)
        self._offered.append((now, name, alternates, model))
        self._leases.setdefault(name, {})[lease.id] = lease
        self._by_id[lease.id] = lease
        if affinity is not None:
            self._remember(model, affinity, name)
        return lease

    def _affine_choice(self, free: dict[str, int], model: str | None, affinity: Affinity | None) -> str | None:
        for key in affinity.lookups if affinity is not None else ():
            name = self._affine.get((model, key))
            if name is not None and free.get(name, 0) > 0:
                return name
        return None

    async def _await_affine_poll(self, model: str | None, affinity: Affinity) -> None:
        """When the conversation's backend has no free slot only because its last poll may still count a request
        that has ended (``_maybe_counted``), wait for a poll that began after that request's release (asked for
        then), AFFINE_POLL_WAIT at most."""
        candidates = self.candidates(model)
        if not self._settled(candidates):
            return
        name = self._home(model, affinity, candidates)
        if (name is None or self._total(name, model) - self.busy(name, model) > 0
                or not self._outside_load(name, model)):
            return
        poll = self._model[name].poll
        ended = [lease.released_at for lease in self._leases.get(name, {}).values()
                 if lease.released_at is not None and self._maybe_counted(lease, poll)]
        if not ended:
            return
        since = max(ended)  # a poll that began after the last of those releases counts none of them
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._awaiting_poll.setdefault(name, [])
        waiting.append((since, done))
        self._poll_soon(name, 0.0)
        try:
            async with asyncio.timeout(AFFINE_POLL_WAIT):
                await done
        except TimeoutError:
            pass
        finally:
            waiting.remove((since, done))
            if not waiting:
                self._awaiting_poll.pop(name, None)

    def _home(self, model: str | None, affinity: Affinity, candidates: list[str]) -> str | None:
        """The backend remembered for the conversation's best key, among the candidates: where its cache is."""
        return next((name for key in affinity.lookups if (name := self._affine.get((model, key))) in candidates),
                    None)

    @staticmethod
    def _maybe_counted(lease: Lease, poll: PollWindow | None) -> bool:
        """A released lease that busy()'s margin still counts, where the poll shows outside load
        (_counted_on_top): the latest poll may have seen the request (_may_be_in), but busy() cannot tell
        (issued within SETTLE_SECONDS of its start, or released while it ran)."""
        return (poll is not None and lease.released_at is not None and Picker._may_be_in(lease, poll)
                and not Picker._counted_then_ended(lease, poll))

    @staticmethod
    def _may_be_in(lease: Lease, poll: PollWindow) -> bool:
        """The poll may have counted this lease's request: issued before it finished, not released before it
        began."""
        return lease.issued_at <= poll.finished and (lease.released_at is None or lease.released_at > poll.started)

    @staticmethod
    def _in_transit(lease: Lease, poll_started: float) -> bool:
        """Issued too recently before the poll (or after it) for the poll to be sure to show it: busy() counts
        it on top of the polled count while it runs."""
        return lease.issued_at + SETTLE_SECONDS > poll_started

    @staticmethod
    def _counted_then_ended(lease: Lease, poll: PollWindow | None) -> bool:
        """A released lease the latest poll surely counted (issued SETTLE_SECONDS before it began) and that
        ended after it finished: busy() takes it off the polled count."""
        return (poll is not None and lease.released_at is not None
                and not Picker._in_transit(lease, poll.started) and poll.finished < lease.released_at)

    def _remember(self, model: str | None, affinity: Affinity, name: str) -> None:
        for key in affinity.remember:
            self._affine[model, key] = name
            self._affine.move_to_end((model, key))
        while len(self._affine) > AFFINITY_ENTRIES:
            self._affine.popitem(last=False)

    def _cold(self, candidates: list[str], model: str) -> str | None:
        """A backend that serves ``model`` without having it loaded (a llama.cpp router) and runs no request for
        it: the request there loads it. One at a time on each, so the load is the only request placed on slots
        nobody has counted yet; one already loading first."""
        cold = []
        for name in candidates:
            share = self._share(self._model[name], model)
            if share is None or share.load is ModelLoad.LOADED:
                continue
            running = any(lease.released_at is None and lease.model == model
                          for lease in self._leases.get(name, {}).values())
            if not running:
                cold.append((share.load is not ModelLoad.LOADING, name))
        return min(cold)[1] if cold else None

    def _alternates(self, chosen: str, now: float, model: str | None = None) -> tuple[str, ...]:
        """Usable backends other than ``chosen`` (serving ``model``), those with a slot free first: free beyond
        those offered as alternates to other requests on ``chosen`` still in transit (issued within
        SETTLE_SECONDS: a refused connection is retried in that time; requests on other backends fail only if
        those die too), standby first, then most free. When fewer are free, the others fill the list in the
        same order: a retry that waits in a live server's queue beats one that Envoy's fallback sends back to
        the dead server (outlier ejection reaches the worker threads only a moment after the refusal)."""
        while self._offered and self._offered[0][0] + SETTLE_SECONDS < now:
            self._offered.popleft()
        offered = Counter(name for _, placed, names, offered_for in self._offered
                          if placed == chosen and offered_for == model for name in names)
        free = {member.name: self._total(member.name, model) - self.busy(member.name, model) - offered[member.name]
                for member in self._model if member.name != chosen and self._placeable(member)
                and self._serves(member, model)}
        return tuple(heapq.nlargest(MAX_ALTERNATES, free,
                                    key=lambda n: (free[n] > 0, self._model[n].role is Role.STANDBY, free[n], n)))

    def _new_id(self) -> str:
        while (lease_id := secrets.token_urlsafe(LEASE_ID_BYTES)) in self._by_id:  # 2**-128: never, in practice
            pass
        return lease_id

    async def acquire(self, model: str | None = None, affinity: Affinity | None = None) -> Lease:
        """A lease on the best backend (for ``model``: one that serves it; for a conversation: the one that took
        it last, when it has a slot free, or within affinity_wait) now, or after waiting in that model's FIFO."""
        if affinity is not None and not self._queues.get(model):
            await self._await_affine_poll(model, affinity)
        if not self._queues.get(model):
            got = self._try_lease(model, affinity, hold=affinity is not None and self._affinity_wait > 0)
            if isinstance(got, Lease):
                return got
        max_waiting, timeout = self._limits(model)
        if self.waiting_for(model) >= self._buffer_room(model, max_waiting):
            raise BufferFull()
        self._poll_when_settled(self.candidates(model))
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(model, deque())
        queue.append(waiter)
        if affinity is not None:
            self._affinity_of[waiter] = affinity
            self._give_up_at[waiter] = self._clock() + timeout
        self._serve(model, queue)  # past requests held for their own backend, this one may have a slot now
        lease = None
        try:
            async with asyncio.timeout(timeout):
                lease = await waiter
            return lease
        except TimeoutError:
            raise BufferTimeout() from None
        finally:
            self._affinity_of.pop(waiter, None)
            self._held_since.pop(waiter, None)
            self._give_up_at.pop(waiter, None)
            if waiter in queue:
                queue.remove(waiter)
            if not queue and self._queues.get(model) is queue:
                del self._queues[model]
            if lease is None and waiter.done() and not waiter.cancelled():
                self.release(waiter.result().id)  # granted just as the wait was abandoned: give it back

    def release(self, lease_id: str) -> bool:
        """The request on this lease finished: its slot is free now, not at the next poll. False (and
        nothing freed) for an id this picker did not hand out, or one already released."""
        lease = self._by_id.get(lease_id)
        if lease is None or lease.released_at is not None:
            return False
        lease.released_at = self._clock()
        if self._maybe_counted(lease, self._model[lease.backend].poll) and self._counted_on_top(lease):
            self._poll_soon(lease.backend, 0.0)
        self.wake()
        return True

    def failed(self, lease_id: str, served_by: str | None = None) -> bool:
        """The filter saw this lease's backend refuse the connection (or drop it before answering): place
        nothing there until a poll that starts after now. When Envoy's retry reached another backend
        (``served_by``, its address), the request runs there now, and its lease counts there. False for an
        id this picker did not hand out."""
        lease = self._by_id.get(lease_id)
        if lease is None:
            return False
        now = self._clock()
        self._refused[lease.backend] = now
        moved_to = self._names.get(served_by or "")
        if (lease.released_at is None and moved_to is not None and moved_to != lease.backend
                and self._serves(self._model[moved_to], lease.model)):
            del self._leases[lease.backend][lease.id]
            lease.backend, lease.address, lease.issued_at = moved_to, str(self._model[moved_to].backend.address), now
            self._leases.setdefault(moved_to, {})[lease.id] = lease
        return True

    def _placeable(self, member: Member) -> bool:
        return member.usable and self._in_balancer(member.name) and not self._refusing(member)

    def _refusing(self, member: Member) -> bool:
        refused_at = self._refused.get(member.name)
        if refused_at is None:
            return False
        if member.poll is not None and member.poll.started > refused_at:
            del self._refused[member.name]
            return False
        return True

    def on_member_change(self, previous: Member | None, current: Member | None) -> None:
        """The model's subscription: a poll result or an operator change may free slots; a backend
        that joins becomes a place to send to (after its first ready poll), one removed is forgotten."""
        if current is None:
            assert previous is not None
            self._forget(previous)
            self.wake()
            return
        if previous is None:
            self._names[str(current.backend.address)] = current.name
        self.wake(current)

    def _forget(self, member: Member) -> None:
        for lease_id in self._leases.pop(member.name, {}):
            del self._by_id[lease_id]
        self._poll_history.pop(member.name, None)
        self._refused.pop(member.name, None)
        self._settle_poll_at.pop(member.name, None)
        self._names.pop(str(member.backend.address), None)

    def wake(self, changed: Member | None = None) -> None:
        """Hand free slots to waiting requests, oldest first in each model's queue; prune leases the polls
        have absorbed.

        Called after every poll of every backend, so it touches only the backend that ``changed``
        (all backends with leases when None): at a thousand backends polled each second this is hot.
        """
        if changed is not None:
            self._record_poll(changed)
            if changed.poll is not None:
                for since, done in self._awaiting_poll.get(changed.name, ()):
                    if changed.poll.started >= since and not done.done():
                        done.set_result(None)
        if self._by_id:
            for name in [changed.name] if changed is not None else list(self._leases):
                self._prune(name)
        for model, queue in list(self._queues.items()):
            self._serve(model, queue)
        if changed is not None and any(self._queues.values()):
            self._poll_when_settled([changed.name])

    def _serve(self, model: str | None, queue: deque[asyncio.Future[Lease]]) -> None:
        """Hand free slots to ``model``'s waiting requests, oldest first; one held for its own backend
        (affinity_wait) lets those behind it go."""
        position = 0
        while position < len(queue):
            waiter = queue[position]
            if waiter.done():  # timed out or cancelled, about to be removed by its owner
                del queue[position]
                continue
            got = self._try_lease(model, self._affinity_of.get(waiter), hold=self._holding(waiter))
            if got is None:
                return
            if isinstance(got, Held):
                if waiter not in self._held_since:
                    now = self._held_since[waiter] = self._clock()
                    asyncio.get_running_loop().call_later(self._hold_end(waiter) - now, self.wake)
                position += 1
                continue
            del queue[position]
            waiter.set_result(got)

    def _holding(self, waiter: asyncio.Future[Lease]) -> bool:
        """A conversation's request may still wait for its own backend: affinity_wait has not run out since it
        was first held."""
        if not self._affinity_wait or waiter not in self._affinity_of:
            return False
        return self._clock() < self._hold_end(waiter)

    def _hold_end(self, waiter: asyncio.Future[Lease]) -> float:
        """affinity_wait after it was first held (from now if not yet), and HOLD_MARGIN before its
        buffered_request_timeout: a request that waited in the queue while every slot was busy still gets another
        backend's free slot rather than a 503."""
        since = self._held_since.get(waiter, self._clock())
        return min(since + self._affinity_wait, self._give_up_at[waiter] - HOLD_MARGIN)

    def _poll_when_settled(self, names: list[str]) -> None:
        """Requests wait: ask for a poll of each backend named once the leases that its last poll may not show
        have settled. busy() counts such a lease on top of the poll, so a backend polled just after one was issued
        looks a slot fuller than it is until its next poll; waiting requests should not wait an interval for
        that slot. One poll per backend, timed for its latest such lease."""
        now = self._clock()
        for name in names:
            poll = self._model[name].poll
            if poll is None:
                continue
            settled_at = max((lease.issued_at + SETTLE_SECONDS for lease in self._leases.get(name, {}).values()
                              if lease.released_at is None and self._in_transit(lease, poll.started)
                              and self._counted_on_top(lease)),
                             default=None)
            if settled_at is None or self._settle_poll_at.get(name, float("-inf")) >= settled_at:
                continue
            self._settle_poll_at[name] = settled_at
            self._poll_soon(name, max(0.0, settled_at - now))

    def _record_poll(self, member: Member) -> None:
        if member.poll is None:
            return
        latest = self._poll_history.get(member.name, (None, None))[0]
        if latest is None or member.poll.started != latest.started:
            self._poll_history[member.name] = (PollSeen(member.poll.started, member.status.slots_processing), latest)

    def _prune(self, name: str) -> None:
        leases = self._leases.get(name)
        if not leases:
            return
        now = self._clock()
        poll = self._model[name].poll
        poll_started = poll.started if poll else float("-inf")
        for lease_id, lease in list(leases.items()):
            absorbed = lease.released_at is not None and lease.released_at <= poll_started
            if absorbed or now - lease.issued_at > LEASE_MAX_AGE:
                del leases[lease_id]
                del self._by_id[lease_id]
        self._forget_lost_leases(name, leases)

    def _forget_lost_leases(self, name: str, leases: dict[str, Lease]) -> None:
        """Polled state supersedes leases whose release never came (the client went away mid-stream,
        so the filter never saw the end): when the last two polls both count fewer running requests
        than there are unreleased leases old enough for the earlier one to have seen them, the oldest
        of those leases are over. One poll is not enough: a request that ended just before it may have
        its release still on the way, and forgetting an older lease that still runs in its place would
        count that slot free once the release comes."""
        latest, previous = self._poll_history.get(name, (None, None))
        if latest is None or previous is None:
            return
        old = [lease for lease in leases.values()  # issue order
               if lease.released_at is None and not self._in_transit(lease, previous.started)]
        running = max(latest.processing, previous.processing)
        for lease in old[:max(0, len(old) - running)]:
            lease.released_at = self._clock()
