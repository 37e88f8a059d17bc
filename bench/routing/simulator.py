"""SIMULATOR, not llama.cpp: llama.cpp-compatible HTTP servers whose timing follows
``bench.routing.model``, for the routing-quality benchmark.

One asyncio process serves every ``ServerSpec`` of a fleet on its own loopback port
(aiohttp). Each server is a ``ServerState`` from the model, the same code the ideal-queue
reference ``model.ideal()`` runs in virtual time, driven here in real time by one task per
server that sleeps until each step's end as the model computes it (``loop.time()``). No
model weights: every generated token is ``model.TOKEN`` (4 bytes). Every response carries
``server: llamacpp-simulator`` so nobody mistakes it for llama.cpp.

Prompts are text, so the model's prompt cache (per slot, and host memory like
``--cache-ram``) works on what clients really send: ``/completion``'s ``prompt`` as is, a
chat's messages through a ChatML template (``model.chat_template``), tokenized as one token
per 4 bytes (``model.tokens``), roughly what llama-server's tokenizer gives for English.

Endpoints (llama.cpp-shaped): ``GET /health``, ``/slots``, ``/props``, ``/metrics``;
``POST /completion`` (``prompt``, ``n_predict``, ``stream``), ``POST /v1/chat/completions``
(OpenAI-style, SSE ending with ``data: [DONE]``); plus ``GET /sim/stats`` for the benchmark
(per server: deferrals, completions, prompt tokens and the cached ones, /slots polls answered) and
``GET /sim/handoffs`` (how long the balancer held requests back while a slot was free: ``HandOffs``).
Answers report the cache like llama-server: ``timings.cache_n`` (reused), ``timings.prompt_n`` (processed),
``usage.prompt_tokens_details.cached_tokens``. A client that disconnects frees its slot.

    python -m bench.routing.simulator --fleet "a:2:20,b:4:25" --ports-file ports.json

Fleet items are ``name:slots:token_ms[:batch_slowdown[:prompt_ms_per_token]]`` (``--cache-tokens``:
every server's host cache, in tokens); the ports
file (``{"name": port}``) is written atomically once every server listens. SIGTERM or
SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import math
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bench.routing.model import CACHE_RAM_TOKENS, TOKEN, RequestSpec, ServerSpec, ServerState, chat_template, tokens

SERVER_HEADER = "llamacpp-simulator"
N_CTX = 4096
DEFAULT_N_PREDICT = 16  # llama.cpp's n_predict -1 means "until EOS"; the simulator has no EOS
# The client's send time (time.monotonic(): one clock for every process on the host), set by bench.routing.loadgen.
SENT_HEADER = "X-Bench-Sent"
# A request on its way longer than this counts as held by the balancer: one proxy hop here takes 1-4 ms.
HOLD_GRACE = 0.02

_ids = itertools.count()


@dataclass
class _Live:
    """A request in flight: token times arrive on ``events`` as (loop time, finished)."""

    request: RequestSpec
    arrived: float  # loop.time()
    deferred: bool
    events: asyncio.Queue[tuple[float, bool]] = field(default_factory=asyncio.Queue)
    first: float | None = None
    done: bool = False


def held_while_free(held: list[tuple[float, float]], free: list[tuple[float, str, int]],
                    slots: dict[str, int]) -> float:
    """Slot-seconds during which a request was held and a slot was free: the integral over time of the smaller of
    the two counts. ``held``: each request's (from, until); ``free``: (when, server, its free slots from then on);
    ``slots``: each server's free slots before its first change."""
    events = sorted([(start, 1, "", 0) for start, end in held if end > start]
                    + [(end, -1, "", 0) for start, end in held if end > start]
                    + [(when, 0, name, count) for when, name, count in free])
    current = dict(slots)
    holding = 0
    total = 0.0
    last = events[0][0] if events else 0.0
    for when, change, name, count in events:
        total += min(holding, sum(current.values())) * (when - last)
        last = when
        holding += change
        if not change:
            current[name] = count
    return total


class HandOffs:
    """How long the balancer kept requests from free slots, fleet-wide. A request that carries the client's send
    time (SENT_HEADER) is held from that time plus HOLD_GRACE until it arrives; each server's free slots are
    recorded as they change. A balancer that hands every slot over at once scores 0 (the ideal queue does)."""

    def __init__(self, slots: dict[str, int]) -> None:
        self._slots = slots
        self._held: list[tuple[float, float]] = []
        self._free: list[tuple[float, str, int]] = []
        self.requests = 0
        self.marked = 0

    def arrived(self, sent: float | None, now: float) -> None:
        self.requests += 1
        if sent is not None:
            self.marked += 1
            self._held.append((sent + HOLD_GRACE, now))

    def free_changed(self, name: str, free: int, now: float) -> None:
        self._free.append((now, name, free))

    def report(self) -> dict[str, Any]:
        """``held_while_free_s`` is None unless every request carried its send time (a peer may drop the header)."""
        complete = self.marked == self.requests
        return {"held_while_free_s": held_while_free(self._held, self._free, self._slots) if complete else None,
                "requests": self.requests, "requests_with_send_time": self.marked}


class SimServer:
    """One simulated llama.cpp server: a ``ServerState`` driven in real time."""

    def __init__(self, spec: ServerSpec, start: float, handoffs: HandOffs) -> None:
        self.spec = spec
        self.handoffs = handoffs
        self.state = ServerState(spec)
        self.start = start  # loop time of the run's start (arrivals are relative to it)
        self.live: dict[int, _Live] = {}
        self.tokens_predicted = 0
        self.tokens_predicted_seconds = 0.0  # each emitted token's step time, as llama.cpp sums generation time
        self.slots_polls = 0  # GET /slots answered: what a balancer's agent costs the server
        self._wake = asyncio.Event()

    def submit(self, prompt: str, n_predict: int, sent: float | None = None) -> _Live:
        now = asyncio.get_running_loop().time()
        request = RequestSpec(next(_ids), now - self.start, tokens(prompt), n_predict, text=prompt)
        deferred = self.state.admit(request.id, request)
        arrived = time.monotonic()
        self.handoffs.arrived(sent, arrived)
        self.handoffs.free_changed(self.spec.name, self.state.free, arrived)
        live = _Live(request, now, deferred)
        self.live[request.id] = live
        self._wake.set()
        return live

    def release(self, live: _Live) -> None:
        """The request's handler is done: if the request still holds a slot (client gone), free it."""
        self.live.pop(live.request.id, None)
        self.state.reused.pop(live.request.id, None)
        if not live.done:
            self.state.cancel(live.request.id)
            self.handoffs.free_changed(self.spec.name, self.state.free, time.monotonic())
            self._wake.set()

    async def run(self) -> None:
        """Steps back to back while a slot is taken, each ending at the model's end time.

        The next step starts at the previous one's computed end, not when the loop woke up,
        so late wake-ups do not accumulate."""
        loop = asyncio.get_running_loop()
        step_start: float | None = None
        while True:
            if not self.state.needs_step:
                step_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            began = loop.time() if step_start is None else step_start
            end = self.state.start_step(began)
            delay = end - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            _, finished = self.state.end_step(end)
            if finished:
                self.handoffs.free_changed(self.spec.name, self.state.free, time.monotonic())
            done = set(finished)
            for request_id in self.state.last_emitted:
                live = self.live.get(request_id)
                if live is None:
                    continue
                self.tokens_predicted += 1
                self.tokens_predicted_seconds += end - began
                if live.first is None:
                    live.first = end
                live.done = request_id in done
                live.events.put_nowait((end, live.done))
            step_start = end

    def slots(self) -> list[dict[str, Any]]:
        busy = self.state.busy
        return [{"id": i, "n_ctx": N_CTX, "is_processing": i < busy} for i in range(self.spec.slots)]

    def metrics(self) -> str:
        lines = []
        for name, kind, help_text, value in (
            ("llamacpp:requests_processing", "gauge", "Number of requests processing.", self.state.busy),
            ("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", self.state.queued),
            ("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.",
             self.tokens_predicted),
            ("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time.",
             self.tokens_predicted_seconds),
            ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.",
             self.state.prompt_tokens_total - self.state.cached_tokens_total),
            ("llamacpp_sim:requests_deferred_total", "counter", "SIMULATOR: requests that ever waited for a slot.",
             self.state.deferred_count),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    def stats(self) -> dict[str, int]:
        return {"deferred_total": self.state.deferred_count, "completed": self.state.completed,
                "busy": self.state.busy, "queued": self.state.queued,
                "prompt_tokens": self.state.prompt_tokens_total, "cached_tokens": self.state.cached_tokens_total,
                "slots_polls": self.slots_polls}

    def cached(self, live: _Live) -> int:
        """Prompt tokens the request reused from the cache (0 before it had a slot)."""
        return self.state.reused.get(live.request.id, 0)


def _timings(live: _Live, end: float, n: int, cached: int) -> dict[str, Any]:
    ttft = (live.first or end) - live.arrived
    return {
        "cache_n": cached,  # llama-server: prompt tokens reused from the cache ...
        "prompt_n": live.request.prompt_tokens - cached,  # ... and the ones it processed
        "predicted_n": n,
        "predicted_ms": (end - (live.first or end)) * 1000,
        "ttft_ms": ttft * 1000,  # simulator: arrival to first token, model time
        "e2e_ms": (end - live.arrived) * 1000,
        "deferred": live.deferred,
    }


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "body is not JSON"}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body is not a JSON object"}),
                                 content_type="application/json")
    return body


def _sent(request: web.Request) -> float | None:
    try:
        sent = float(request.headers.get(SENT_HEADER, ""))
    except ValueError:
        return None
    return sent if math.isfinite(sent) else None


def _positive_int(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return default


def _content(message: Any) -> tuple[str, str]:
    """(role, text) of a chat message; content parts other than text are sent as JSON."""
    if not isinstance(message, dict):
        return "user", str(message)
    content = message.get("content", "")
    return str(message.get("role", "user")), content if isinstance(content, str) else json.dumps(content)


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


async def _stream(request: web.Request, live: _Live, token_event: Callable[[int], Any],
                  final_events: Callable[[float, int], list[Any]]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    n = 0
    while True:
        end, finished = await live.events.get()
        n += 1
        await response.write(_sse(token_event(n)))
        if finished:
            break
    for event in final_events(end, n):
        await response.write(_sse(event))
    await response.write_eof()
    return response


async def _wait_done(live: _Live) -> tuple[float, int]:
    n = 0
    while True:
        end, finished = await live.events.get()
        n += 1
        if finished:
            return end, n


def make_app(server: SimServer, fleet: dict[str, SimServer]) -> web.Application:
    model_path = f"/sim/{server.spec.name}.gguf"

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def slots(_: web.Request) -> web.Response:
        server.slots_polls += 1
        return web.json_response(server.slots())

    async def props(_: web.Request) -> web.Response:
        return web.json_response({"total_slots": server.spec.slots, "model_path": model_path, "is_sleeping": False,
                                  "simulator": True})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=server.metrics(), content_type="text/plain", charset="utf-8")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({name: sim.stats() for name, sim in fleet.items()})

    async def handoffs(_: web.Request) -> web.Response:
        return web.json_response(server.handoffs.report())

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        prompt = body.get("prompt", "")
        prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        live = server.submit(prompt, _positive_int(body.get("n_predict"), DEFAULT_N_PREDICT), _sent(request))
        try:
            if body.get("stream") is True:
                return await _stream(
                    request, live,
                    lambda n: {"content": TOKEN, "stop": False, "tokens_predicted": n},
                    lambda end, n: [{"content": "", "stop": True, "model": model_path, "tokens_predicted": n,
                                     "stop_type": "limit", "timings": _timings(live, end, n, server.cached(live))}])
            end, n = await _wait_done(live)
            return web.json_response({"content": TOKEN * n, "tokens_predicted": n, "model": model_path,
                                      "stop": True, "stop_type": "limit",
                                      "timings": _timings(live, end, n, server.cached(live))})
        finally:
            server.release(live)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise web.HTTPBadRequest(text=json.dumps({"error": "messages must be a list"}),
                                     content_type="application/json")
        max_tokens = _positive_int(body.get("max_tokens", body.get("max_completion_tokens")), DEFAULT_N_PREDICT)
        live = server.submit(chat_template([_content(m) for m in messages]), max_tokens, _sent(request))
        chat_id, created = f"chatcmpl-sim-{live.request.id}", int(time.time())
        base = {"id": chat_id, "created": created, "model": model_path}

        def usage(n: int) -> dict[str, Any]:
            return {"prompt_tokens": live.request.prompt_tokens, "completion_tokens": n,
                    "total_tokens": live.request.prompt_tokens + n,
                    "prompt_tokens_details": {"cached_tokens": server.cached(live)}}
        try:
            if body.get("stream") is True:
                def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                    return {**base, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                return await _stream(
                    request, live,
                    lambda n: chunk({"role": "assistant", "content": TOKEN} if n == 1 else {"content": TOKEN}, None),
                    lambda end, n: [{**chunk({}, "length"), "usage": usage(n),
                                     "timings": _timings(live, end, n, server.cached(live))}, b"[DONE]"])
            end, n = await _wait_done(live)
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": TOKEN * n},
                             "finish_reason": "length"}],
                "usage": usage(n), "timings": _timings(live, end, n, server.cached(live))})
        finally:
            server.release(live)

    async def label(_: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_HEADER

    app = web.Application()
    app.on_response_prepare.append(label)
    app.router.add_get("/health", health)
    app.router.add_get("/slots", slots)
    app.router.add_get("/props", props)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/sim/stats", stats)
    app.router.add_get("/sim/handoffs", handoffs)
    app.router.add_post("/completion", completion)
    app.router.add_post("/completions", completion)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/chat/completions", chat)
    return app


OnReady = Callable[[dict[str, int]], Awaitable[None] | None]


async def serve(fleet: list[ServerSpec], on_ready: OnReady) -> None:
    """Serve every server of ``fleet`` on its own free loopback port until cancelled.

    ``on_ready({name: port})`` (plain or async) is called once all of them listen."""
    names = [spec.name for spec in fleet]
    if not fleet or len(set(names)) != len(names):
        raise ValueError("the fleet needs at least one server and unique names")
    loop = asyncio.get_running_loop()
    start = loop.time()
    handoffs = HandOffs({spec.name: spec.slots for spec in fleet})
    sims = {spec.name: SimServer(spec, start, handoffs) for spec in fleet}
    runners: list[web.AppRunner] = []
    tasks = [asyncio.create_task(sim.run(), name=f"sim-{name}") for name, sim in sims.items()]
    try:
        ports = {}
        for name, sim in sims.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            # handler_cancellation: a client that disconnects cancels its handler, which frees the slot.
            runner = web.AppRunner(make_app(sim, sims), handler_cancellation=True, access_log=None,
                                   shutdown_timeout=0.5)
            await runner.setup()
            runners.append(runner)
            site = web.SockSite(runner, sock)
            await site.start()
            ports[name] = sock.getsockname()[1]
        ready = on_ready(ports)
        if inspect.isawaitable(ready):
            await ready
        await asyncio.gather(*tasks)  # the step loops never end: this waits for cancellation
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:
            await runner.cleanup()


def parse_fleet(text: str, cache_tokens: int = CACHE_RAM_TOKENS) -> list[ServerSpec]:
    """``"a:2:20,b:4:25:0.1"`` → ServerSpecs (name:slots:token_ms[:batch_slowdown[:prompt_ms_per_token]]), each
    with a host cache of ``cache_tokens``."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        if not 3 <= len(fields) <= 5:
            raise ValueError(f"{item!r}: expected name:slots:token_ms[:batch_slowdown[:prompt_ms_per_token]]")
        name, slots, token_ms, *rest = fields
        extra = dict(zip(("batch_slowdown", "prompt_ms_per_token"), map(float, rest), strict=False))
        specs.append(ServerSpec(name, int(slots), float(token_ms), cache_tokens=cache_tokens, **extra))
    if not specs:
        raise ValueError("empty fleet")
    return specs


def _write_ports(path: str, ports: dict[str, int]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(ports, handle)
    os.replace(tmp, path)


async def _main(fleet: list[ServerSpec], ports_file: str) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(serve(fleet, lambda ports: _write_ports(ports_file, ports)))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", required=True, help="name:slots:token_ms[:batch_slowdown[:prompt_ms_per_token]],...")
    parser.add_argument("--ports-file", required=True, help='written atomically as {"name": port} when ready')
    parser.add_argument("--cache-tokens", type=int, default=CACHE_RAM_TOKENS,
                        help=f"each server's host-memory prompt cache in tokens (default {CACHE_RAM_TOKENS})")
    args = parser.parse_args(argv)
    try:
        fleet = parse_fleet(args.fleet, args.cache_tokens)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_main(fleet, args.ports_file))


if __name__ == "__main__":
    main()
