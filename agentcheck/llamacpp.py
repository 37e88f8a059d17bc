"""Read a llama.cpp server's slot state: a pure interpreter of its answers, and a thin HTTP poller.

``interpret`` turns raw answers from ``/health``, ``/slots``, ``/props`` (and ``/metrics``
when ``/slots`` is disabled) into a ``BackendStatus``; it is where every quirk of the
llama.cpp versions in the wild is handled, and it is tested without sockets.
``LlamaCppClient`` only fetches those answers, with bounded size, over kept-alive connections.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from prometheus_client.parser import text_string_to_metric_families

from agentcheck.http_client import HttpClient, HttpError, Response
from agentcheck.status import BackendStatus, SlotSource, State
from fleet import Backend

MAX_BODY_BYTES = 4 * 1024 * 1024  # /slots of a big server is tens of KB; anything this size is broken
# More slots than any llama-server runs: a larger count is a broken answer (or fleet file), and
# passing it on would send HAProxy an absurd maxconn (or, past 4,300 digits, fail to format at all).
MAX_SLOTS = 1024
MAX_QUOTED_CHARS = 60  # of a backend's own words quoted in a reason


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, whatever its status."""

    status: int
    body: bytes


@dataclass(frozen=True)
class Failure:
    """No usable HTTP answer: connect failure, timeout, connection cut, oversized body."""

    reason: str


Outcome = Reply | Failure


def interpret(
    health: Outcome | None,
    slots: Outcome,
    props: Outcome | None = None,
    metrics: Outcome | None = None,
    configured_slots: int | None = None,
) -> BackendStatus:
    """Decide a backend's state from its endpoints' answers (see docs/agent.md for the table).

    ``health`` is None when it was not fetched: a 200 from ``/slots`` already proves the
    server is up and loaded (llama-server answers 503 everywhere while loading).
    """
    if health is None:
        health = Reply(200, b"{}")
    if isinstance(health, Failure):
        return BackendStatus.down(State.UNREACHABLE, health.reason)
    if health.status in (401, 403):
        return BackendStatus.down(State.UNAUTHORIZED, f"GET /health answered HTTP {health.status}")
    if health.status == 503:
        downstream = _json(health.body)
        if isinstance(downstream, dict) and isinstance(downstream.get("status"), str):
            # A downstream balancer (tree cascade) saying it has nothing usable, not a model loading.
            return BackendStatus.down(State.ERROR, f"downstream balancer reports {_clip(downstream['status'])!r}")
        return BackendStatus.down(State.LOADING, "")
    if health.status != 200:
        return BackendStatus.down(State.ERROR, f"GET /health answered HTTP {health.status}")
    health_body = _json(health.body)
    if not isinstance(health_body, dict):
        return BackendStatus.down(State.ERROR, "GET /health: body is not a JSON object")

    model, total_from_props, sleeping = _props(props)

    if isinstance(slots, Failure):
        return BackendStatus.down(State.UNREACHABLE, f"GET /slots: {slots.reason}")
    if slots.status == 200:
        counted = _count_slots(_json(slots.body))
        if isinstance(counted, str):
            return BackendStatus.down(State.ERROR, f"GET /slots: {counted}")
        total, processing, tasks = counted
        return replace(_ready(configured_slots or total, processing, SlotSource.SLOTS, model, sleeping),
                       slot_tasks=tasks)

    legacy = _legacy_health(health_body)
    if legacy is not None:
        idle, processing = legacy
        return _ready(configured_slots or idle + processing, processing, SlotSource.LEGACY_HEALTH, model, sleeping)

    if slots.status in (401, 403):
        return BackendStatus.down(State.UNAUTHORIZED, f"GET /slots answered HTTP {slots.status}")
    if slots.status not in (404, 501):
        return BackendStatus.down(State.ERROR, f"GET /slots answered HTTP {slots.status}")

    # /slots is disabled (--no-slots): fall back to /metrics, then to what is configured.
    known_total = configured_slots or total_from_props
    if known_total is None:
        return BackendStatus.down(
            State.ERROR, "/slots is disabled and the slot count is unknown: set slots in the fleet file"
        )
    if isinstance(metrics, Reply) and metrics.status == 200:
        busy = _requests_processing(metrics.body)
        if isinstance(busy, str):
            return BackendStatus.down(State.ERROR, f"GET /metrics: {busy}")
        return _ready(known_total, busy, SlotSource.METRICS, model, sleeping)
    return _ready(known_total, 0, SlotSource.CONFIGURED, model, sleeping)


def _ready(total: int, processing: int, source: SlotSource, model: str | None, sleeping: bool) -> BackendStatus:
    if total < 1:
        return BackendStatus.down(State.ERROR, "server reports no slots")
    if total > MAX_SLOTS:
        count = str(total) if total <= 10**6 else "over 1000000"
        return BackendStatus.down(State.ERROR, f"{count} slots: at most {MAX_SLOTS} are supported")
    return BackendStatus(
        state=State.READY,
        slots_total=total,
        slots_processing=min(processing, total),  # /metrics may count more requests than slots
        slot_source=source,
        model=model,
        sleeping=sleeping,
    )


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly nested JSON
        return _INVALID


_INVALID = object()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def _count_slots(data: Any) -> tuple[int, int, tuple[int | None, ...]] | str:
    """(total, processing, each slot's last task id) from /slots, or a description of what is wrong with it."""
    if data is _INVALID:
        return "body is not valid JSON"
    if not isinstance(data, list):
        return "expected a JSON list of slots"
    if not data:
        return "server lists no slots"
    processing = 0
    tasks: list[int | None] = []
    for index, slot in enumerate(data):
        if not isinstance(slot, dict):
            return f"slot {index} is not a JSON object"
        task = slot.get("id_task")
        tasks.append(task if _is_count(task) else None)
        busy = slot.get("is_processing")
        if busy is None and isinstance(slot.get("state"), int) and not isinstance(slot.get("state"), bool):
            busy = slot["state"] != 0  # builds before 2024 reported state 0 (idle) / 1 (processing)
        if not isinstance(busy, bool):
            return f"slot {index} has no boolean is_processing"
        processing += busy
    return len(data), processing, tuple(tasks)


def _legacy_health(body: dict[str, Any]) -> tuple[int, int] | None:
    """Old llama.cpp (before Aug 2024) and Paddler-style balancers put slot counts in /health."""
    idle, processing = body.get("slots_idle"), body.get("slots_processing")
    if _is_count(idle) and _is_count(processing):
        return idle, processing
    return None


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _props(props: Outcome | None) -> tuple[str | None, int | None, bool]:
    """(model, total_slots, is_sleeping) from /props; all optional, older builds lack some."""
    if not isinstance(props, Reply) or props.status != 200:
        return None, None, False
    data = _json(props.body)
    if not isinstance(data, dict):
        return None, None, False
    model = data.get("model_alias") or data.get("model_path")
    total = data.get("total_slots")
    return (
        model if isinstance(model, str) else None,
        total if _is_count(total) and total > 0 else None,
        data.get("is_sleeping") is True,
    )


def _requests_processing(body: bytes) -> int | str:
    try:
        families = list(text_string_to_metric_families(body.decode("utf-8")))
    except Exception:  # the parser raises assorted types on garbage; all mean the same here
        return "not Prometheus text"
    for family in families:
        for sample in family.samples:
            if sample.name == "llamacpp:requests_processing":
                if not math.isfinite(sample.value):
                    return f"llamacpp:requests_processing is {sample.value}"
                return max(0, int(sample.value))
    return "no llamacpp:requests_processing metric"


class LlamaCppClient:
    """Fetches a backend's endpoints; never raises for anything the backend does.

    A healthy server costs one request per poll: ``/slots``, on a kept-alive connection
    (``agentcheck.http_client``). ``/health`` and ``/metrics`` are only asked when ``/slots``
    answers but not with a usable list, to say why. A backend that cannot even be connected
    to costs one connection attempt per poll.

    ``/props`` (model, slot count, sleeping) is optional information that rarely changes: it is
    refreshed in a task of its own, bounded by the same timeout, with the first poll, every
    ``PROPS_REFRESH_POLLS`` polls, and after a poll that did not find the server ready (it may
    come back with another model). A poll waits for a refresh only until half its timeout has
    passed, then goes on with the last usable answer, so a slow, hanging or broken ``/props``
    can never change the verdict ``/slots`` gives.

    ``close()`` cancels the refreshes under way and closes the polling connections.
    """

    PROPS_REFRESH_POLLS = 30

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._http = HttpClient(timeout=timeout, max_body=MAX_BODY_BYTES)
        self._props: dict[str, _Props] = {}

    async def close(self) -> None:
        refreshes = [props.refresh for props in self._props.values() if props.refresh is not None]
        for refresh in refreshes:
            refresh.cancel()
        await asyncio.gather(*refreshes, return_exceptions=True)
        await self._http.close()

    async def poll(self, backend: Backend, api_key: str | None) -> BackendStatus:
        loop = asyncio.get_running_loop()
        # The Monitor bounds the whole poll by this same timeout: /props may use at most half of it.
        props_deadline = loop.time() + self._timeout / 2
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        props = self._props.setdefault(backend.name, _Props(polls=self.PROPS_REFRESH_POLLS))
        answer = await self._get(backend, "/slots", headers)
        if isinstance(answer, HttpError) and answer.connect:  # nothing listening: /health would fail alike
            props.polls = self.PROPS_REFRESH_POLLS
            failure = Failure(answer.reason)
            return interpret(failure, failure, None, None, backend.slots)
        slots = _outcome(answer)
        self._refresh_props(backend, headers, props)
        if props.refresh is not None:
            await asyncio.wait({props.refresh}, timeout=max(0.0, props_deadline - loop.time()))
        if isinstance(slots, Reply) and slots.status == 200:
            status = interpret(None, slots, props.answer, None, backend.slots)
            if status.state is State.READY:
                return status
        health = _outcome(await self._get(backend, "/health", headers))
        metrics = None
        if isinstance(slots, Reply) and slots.status in (404, 501):
            metrics = _outcome(await self._get(backend, "/metrics", headers))
        status = interpret(health, slots, props.answer, metrics, backend.slots)
        if status.state is not State.READY:
            props.polls = self.PROPS_REFRESH_POLLS
        return status

    def _refresh_props(self, backend: Backend, headers: dict[str, str], props: _Props) -> None:
        """Start a /props refresh when one is due and none is under way; count the poll."""
        if props.refresh is None and props.polls >= self.PROPS_REFRESH_POLLS:
            props.polls = 0
            props.refresh = asyncio.create_task(self._get(backend, "/props", headers), name=f"props-{backend.name}")
            props.refresh.add_done_callback(props.store)
        props.polls += 1

    async def _get(self, backend: Backend, path: str, headers: dict[str, str]) -> Reply | HttpError:
        answer = await self._http.get(backend.address.host, backend.address.port, path, headers)
        if isinstance(answer, Response):
            return Reply(answer.status, answer.body)
        return answer


@dataclass
class _Props:
    """One backend's last usable /props answer, and the refresh under way if any."""

    polls: int  # since the last refresh started
    answer: Reply | None = None
    refresh: asyncio.Task[Reply | HttpError] | None = None

    def store(self, refresh: asyncio.Task[Reply | HttpError]) -> None:
        """Keep a 200 JSON object; anything else leaves the previous answer in place."""
        self.refresh = None
        if refresh.cancelled():
            return
        answer = refresh.result()
        if isinstance(answer, Reply) and answer.status == 200 and isinstance(_json(answer.body), dict):
            self.answer = answer


def _outcome(answer: Reply | HttpError) -> Outcome:
    return Failure(answer.reason) if isinstance(answer, HttpError) else answer
