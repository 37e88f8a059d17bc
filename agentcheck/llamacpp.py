"""Read a llama.cpp server's slot state: a pure interpreter of its answers, and a thin HTTP poller.

``interpret`` turns raw answers from ``/health``, ``/slots``, ``/props`` (and ``/metrics``
when ``/slots`` is disabled) into a ``BackendStatus``; it is where every quirk of the
llama.cpp versions in the wild is handled, and it is tested without sockets. ``model_list``
reads ``/v1/models`` (and a router's ``/models``), ``interpret_router`` a llama.cpp router
(``--models-dir``): its ``/models`` and each loaded model's ``/slots?model=``.
``LlamaCppClient`` only fetches those answers, with bounded size, over kept-alive connections.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

from prometheus_client.parser import text_string_to_metric_families

from agentcheck.http_client import MAX_IDLE_PER_HOST, HttpClient, HttpError, Response
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from fleet import Backend

MAX_BODY_BYTES = 4 * 1024 * 1024  # /slots of a big server is tens of KB; anything this size is broken
# More slots than any llama-server runs: a larger count is a broken answer (or fleet file), and
# passing it on would send HAProxy an absurd maxconn (or, past 4,300 digits, fail to format at all).
MAX_SLOTS = 1024
MAX_QUOTED_CHARS = 60  # of a backend's own words quoted in a reason
# Models one backend may list: a router's --models-dir of more is a broken answer (or a mistake worth a
# reason), and every model costs a row in the API, series in /metrics and, when loaded, a request per poll.
MAX_MODELS = 256
MAX_MODEL_NAME_CHARS = 256  # a plain llama-server's default id is its model's path
MAX_REASON_CHARS = 240  # a router's reason names each loaded model whose /slots failed: bounded
# What a llama.cpp router (--models-dir) answers on /slots without ?model= (HTTP 400).
ROUTER_SLOTS_MESSAGE = "model name is missing from the request"


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
    model_names: tuple[str, ...] = (),
) -> BackendStatus:
    """Decide a backend's state from its endpoints' answers (see docs/agent.md for the table).

    ``health`` is None when it was not fetched: a 200 from ``/slots`` already proves the
    server is up and loaded (llama-server answers 503 everywhere while loading). ``model_names``:
    what its ``/v1/models`` lists (``model_list``); a ready status has each of them loaded, served by
    all of the server's slots.
    """
    status = _interpret(health, slots, props, metrics, configured_slots)
    if status.state is not State.READY or not model_names:
        return status
    return replace(status, models=tuple(ModelStatus(name, ModelLoad.LOADED, status.slots_total,
                                                    status.slots_processing) for name in model_names))


def _interpret(health: Outcome | None, slots: Outcome, props: Outcome | None, metrics: Outcome | None,
               configured_slots: int | None) -> BackendStatus:
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


def is_router_answer(slots: Outcome) -> bool:
    """``/slots`` answered as a llama.cpp router does: it serves several models and wants ``?model=``."""
    if not isinstance(slots, Reply) or slots.status != 400:
        return False
    data = _json(slots.body)
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("message") == ROUTER_SLOTS_MESSAGE


def props_say_router(props: Outcome | None) -> bool:
    """``/props`` of a llama.cpp router says ``"role": "router"``."""
    if not isinstance(props, Reply) or props.status != 200:
        return False
    data = _json(props.body)
    return isinstance(data, dict) and data.get("role") == "router"


def model_list(data: Any) -> tuple[tuple[str, ModelLoad], ...] | str:
    """The models of a ``/v1/models`` (or a router's ``/models``) body, decoded JSON: each ``data`` entry's
    ``id`` with its load state, or what is wrong with the answer. A plain llama-server gives no state: its
    model is loaded."""
    entries = _model_entries(data)
    if isinstance(entries, str):
        return entries
    return tuple((name, load or ModelLoad.LOADED) for name, load in entries)


def _model_entries(data: Any) -> tuple[tuple[str, ModelLoad | None], ...] | str:
    """Each ``data`` entry's ``id`` and ``status.value`` (None: the entry has no status). A load state this
    agent does not know counts as unloaded: a request naming the model would have to load it first."""
    if data is _INVALID:
        return "body is not valid JSON"
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return "expected a JSON object with a data list"
    if len(entries) > MAX_MODELS:
        return f"lists {len(entries)} models: at most {MAX_MODELS} are supported"
    models: dict[str, ModelLoad | None] = {}
    for index, entry in enumerate(entries):
        name = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MODEL_NAME_CHARS or not name.isprintable():
            return f"model {index} has no id of 1-{MAX_MODEL_NAME_CHARS} printable characters"
        if name in models:
            return f"lists model {_clip(name)!r} twice"
        status = entry.get("status")
        if status is None:
            models[name] = None
        elif isinstance(status, dict) and isinstance(status.get("value"), str):
            models[name] = _LOADS.get(status["value"], ModelLoad.UNLOADED)
        else:
            return f"model {_clip(name)!r} has no status value"
    return tuple(models.items())


_LOADS = {load.value: load for load in ModelLoad}


def interpret_router(models: Outcome, slots: Mapping[str, Outcome]) -> BackendStatus:
    """A llama.cpp router (``--models-dir``) from its ``/models`` and the ``/slots?model=`` of each loaded
    model (``slots``: by model name; a loaded model missing there was not answered in time).

    Ready whenever ``/models`` lists models, even if none is loaded: a request naming one loads it. Its
    slots are the sums over the loaded models' own slots (each runs as a child llama-server), and every
    model is listed with its load state and slots (0 until loaded). A loaded model whose ``/slots`` fails
    counts 0 slots for this poll, and the reason says so; it does not take the other models down.
    """
    down = _router_down(models)
    if down is not None:
        return down
    assert isinstance(models, Reply)
    listed = _model_entries(_json(models.body))
    if isinstance(listed, str):
        return BackendStatus.down(State.ERROR, f"GET /models: {listed}")
    statuses: list[ModelStatus] = []
    problems: list[str] = []
    for name, load in listed:
        if load is None:
            return BackendStatus.down(State.ERROR, f"GET /models: model {_clip(name)!r} has no status: not a "
                                                   "llama.cpp router")
        if load is not ModelLoad.LOADED:
            statuses.append(ModelStatus(name, load))
            continue
        counted = _model_slots(slots.get(name))
        if isinstance(counted, str):
            problems.append(f"model {_clip(name)!r}: {counted}")
            statuses.append(ModelStatus(name, load))
        else:
            statuses.append(ModelStatus(name, load, counted[0], counted[1]))
    total = sum(model.slots_total for model in statuses)
    if total > MAX_SLOTS:
        return BackendStatus.down(State.ERROR, f"{total} slots over its loaded models: at most {MAX_SLOTS} are "
                                               "supported")
    reason = "; ".join(problems)
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "..."
    return BackendStatus(state=State.READY, reason=reason, slots_total=total,
                         slots_processing=sum(model.slots_processing for model in statuses),
                         slot_source=SlotSource.SLOTS, models=tuple(statuses), router=True)


def _router_down(models: Outcome) -> BackendStatus | None:
    if isinstance(models, Failure):
        return BackendStatus.down(State.UNREACHABLE, f"GET /models: {models.reason}")
    if models.status in (401, 403):
        return BackendStatus.down(State.UNAUTHORIZED, f"GET /models answered HTTP {models.status}")
    if models.status == 503:
        return BackendStatus.down(State.LOADING, "")
    if models.status != 200:
        return BackendStatus.down(State.ERROR, f"GET /models answered HTTP {models.status}")
    return None


def _model_slots(answer: Outcome | None) -> tuple[int, int] | str:
    """(total, processing) of one loaded model's /slots?model=, or why it is not usable."""
    if answer is None:
        return "GET /slots: no answer in time"
    if isinstance(answer, Failure):
        return f"GET /slots: {answer.reason}"
    if answer.status != 200:
        return f"GET /slots answered HTTP {answer.status}"
    counted = _count_slots(_json(answer.body))
    if isinstance(counted, str):
        return f"GET /slots: {counted}"
    return counted[0], counted[1]


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


# Fewer generated tokens than this say little about a server's speed.
MIN_TOKENS_FOR_SPEED = 64


def seconds_per_token(body: bytes) -> float | None:
    """The time each generated token took, from /metrics' llamacpp:tokens_predicted_seconds_total over
    llamacpp:tokens_predicted_total (llama.cpp counts each request's generation time, so this is per request,
    at whatever batch sizes it ran); None without both, or before MIN_TOKENS_FOR_SPEED tokens."""
    try:
        families = list(text_string_to_metric_families(body.decode("utf-8")))
    except Exception:  # the parser raises assorted types on garbage; all mean the same here
        return None
    values = {sample.name: sample.value for family in families for sample in family.samples}
    tokens = values.get("llamacpp:tokens_predicted_total")
    seconds = values.get("llamacpp:tokens_predicted_seconds_total")
    if tokens is None or seconds is None or not (math.isfinite(tokens) and math.isfinite(seconds)):
        return None
    if tokens < MIN_TOKENS_FOR_SPEED or seconds <= 0:
        return None
    return seconds / tokens


class LlamaCppClient:
    """Fetches a backend's endpoints; never raises for anything the backend does.

    A healthy server costs one request per poll: ``/slots``, on a kept-alive connection
    (``agentcheck.http_client``). ``/health`` and ``/metrics`` are only asked when ``/slots``
    answers but not with a usable list, to say why. A backend that cannot even be connected
    to costs one connection attempt per poll.

    ``/props`` (model, slot count, sleeping) and ``/v1/models`` (the models served) are optional
    information that rarely changes: they are refreshed in a task of their own, bounded by the same
    timeout, with the first poll, every ``PROPS_REFRESH_POLLS`` polls, and after a poll that did not
    find the server ready (it may come back with another model). A poll waits for a refresh only
    until half its timeout has passed, then goes on with the last usable answers, so a slow, hanging
    or broken ``/props`` or ``/v1/models`` can never change the verdict ``/slots`` gives.

    A llama.cpp router (``--models-dir``: ``/slots`` answers 400 without ``?model=``, ``/props`` says
    ``"role": "router"``) is polled differently: ``/models`` every poll, then ``/slots?model=`` of each
    model ``/models`` shows loaded, at most ``MAX_IDLE_PER_HOST`` at a time (the connections the HTTP
    client keeps alive), all within ``MODEL_SLOTS_SHARE`` of the timeout. Never ``/slots?model=`` of a
    model that is not loaded: the router would load it. A router poll that does not find it ready
    starts over from ``/slots`` next time (it may have come back as a plain server).

    ``close()`` cancels the refreshes under way and closes the polling connections.
    """

    PROPS_REFRESH_POLLS = 30
    MODEL_SLOTS_SHARE = 0.75  # of the timeout, from the poll's start: room left for the Monitor's own bound

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._http = HttpClient(timeout=timeout, max_body=MAX_BODY_BYTES)
        self._known: dict[str, _Known] = {}

    async def close(self) -> None:
        refreshes = [known.refresh for known in self._known.values() if known.refresh is not None]
        for refresh in refreshes:
            refresh.cancel()
        await asyncio.gather(*refreshes, return_exceptions=True)
        await self._http.close()

    async def poll(self, backend: Backend, api_key: str | None) -> BackendStatus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        known = self._known.setdefault(backend.name, _Known(polls=self.PROPS_REFRESH_POLLS))
        if known.router:
            return await self._poll_router(backend, headers, known, started)
        answer = await self._get(backend, "/slots", headers)
        if isinstance(answer, HttpError) and answer.connect:  # nothing listening: /health would fail alike
            known.polls = self.PROPS_REFRESH_POLLS
            failure = Failure(answer.reason)
            return interpret(failure, failure, None, None, backend.slots)
        slots = _outcome(answer)
        if is_router_answer(slots):
            known.router = True
            return await self._poll_router(backend, headers, known, started)
        self._refresh(backend, headers, known)
        if known.refresh is not None:
            # The Monitor bounds the whole poll by this same timeout: the refresh may use at most half of it.
            await asyncio.wait({known.refresh}, timeout=max(0.0, started + self._timeout / 2 - loop.time()))
        if isinstance(slots, Reply) and slots.status == 200:
            status = interpret(None, slots, known.props, None, backend.slots, known.models)
            if status.state is State.READY:
                return replace(status, seconds_per_token=known.seconds_per_token)
        elif props_say_router(known.props):  # a router whose /slots says something else than this build's
            known.router = True
            return await self._poll_router(backend, headers, known, started)
        health = _outcome(await self._get(backend, "/health", headers))
        metrics = None
        if isinstance(slots, Reply) and slots.status in (404, 501):
            metrics = _outcome(await self._get(backend, "/metrics", headers))
        status = interpret(health, slots, known.props, metrics, backend.slots, known.models)
        if status.state is not State.READY:
            known.polls = self.PROPS_REFRESH_POLLS
        return status

    async def _poll_router(self, backend: Backend, headers: dict[str, str], known: _Known,
                           started: float) -> BackendStatus:
        """``/models``, then ``/slots?model=`` of each loaded model only (asking for another would load it)."""
        answer = await self._get(backend, "/models", headers)
        models = _outcome(answer)
        loaded: list[str] = []
        if isinstance(models, Reply) and models.status == 200:
            listed = model_list(_json(models.body))
            loaded = [name for name, load in listed if load is ModelLoad.LOADED] if not isinstance(listed, str) else []
        slots = await self._loaded_slots(backend, headers, loaded,
                                         started + self._timeout * self.MODEL_SLOTS_SHARE)
        status = interpret_router(models, slots)
        if status.state is not State.READY:
            known.router = False  # start over from /slots: it may be back as a plain llama-server
            known.polls = self.PROPS_REFRESH_POLLS
        return status

    async def _loaded_slots(self, backend: Backend, headers: dict[str, str], names: list[str],
                            deadline: float) -> dict[str, Outcome]:
        """Each named model's /slots, a few at a time; those not answered by ``deadline`` are left out."""
        if not names:
            return {}
        gate = asyncio.Semaphore(MAX_IDLE_PER_HOST)

        async def one(name: str) -> Outcome:
            async with gate:
                path = "/slots?model=" + urllib.parse.quote(name, safe="")
                return _outcome(await self._get(backend, path, headers))

        tasks = {name: asyncio.ensure_future(one(name)) for name in names}
        try:
            await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        finally:
            for task in tasks.values():
                task.cancel()  # no-op for those done; the others' connections are closed
        return {name: task.result() for name, task in tasks.items() if task.done() and not task.cancelled()}

    def _refresh(self, backend: Backend, headers: dict[str, str], known: _Known) -> None:
        """Start a /props, /v1/models and /metrics refresh when one is due and none is under way; count the
        poll."""
        if known.refresh is None and known.polls >= self.PROPS_REFRESH_POLLS:
            known.polls = 0
            known.refresh = asyncio.create_task(self._fetch_refresh(backend, headers), name=f"props-{backend.name}")
            known.refresh.add_done_callback(known.store)
        known.polls += 1

    async def _fetch_refresh(self, backend: Backend, headers: dict[str, str]) -> tuple[Reply | HttpError, ...]:
        """One after the other, on the connection the poll keeps alive."""
        return (await self._get(backend, "/props", headers), await self._get(backend, "/v1/models", headers),
                await self._get(backend, "/metrics", headers))

    async def _get(self, backend: Backend, path: str, headers: dict[str, str]) -> Reply | HttpError:
        answer = await self._http.get(backend.address.host, backend.address.port, path, headers)
        if isinstance(answer, Response):
            return Reply(answer.status, answer.body)
        return answer


@dataclass
class _Known:
    """What was learnt about one backend: its last usable /props answer, /v1/models list and time per token
    (/metrics), the refresh under way if any, and whether it is a llama.cpp router."""

    polls: int  # since the last refresh started
    props: Reply | None = None
    models: tuple[str, ...] = ()
    router: bool = False
    seconds_per_token: float | None = None
    refresh: asyncio.Task[tuple[Reply | HttpError, ...]] | None = field(default=None, repr=False)

    def store(self, refresh: asyncio.Task[tuple[Reply | HttpError, ...]]) -> None:
        """Keep a 200 JSON object from /props, a valid list from /v1/models and a time per token from /metrics;
        anything else leaves the previous answer in place."""
        self.refresh = None
        if refresh.cancelled():
            return
        props, models, metrics = refresh.result()
        if isinstance(props, Reply) and props.status == 200 and isinstance(_json(props.body), dict):
            self.props = props
        if isinstance(models, Reply) and models.status == 200:
            listed = model_list(_json(models.body))
            if not isinstance(listed, str):
                self.models = tuple(name for name, _ in listed)
        if isinstance(metrics, Reply) and metrics.status == 200:
            self.seconds_per_token = seconds_per_token(metrics.body) or self.seconds_per_token


def _outcome(answer: Reply | HttpError) -> Outcome:
    return Failure(answer.reason) if isinstance(answer, HttpError) else answer
