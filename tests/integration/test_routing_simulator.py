"""The routing benchmark's llama.cpp SIMULATOR, in-process on loopback, through a real HTTP client.

Checks it speaks llama.cpp's API well enough for the real agent (``interpret``), that its
slots, deferral and streaming behave like the service model says, and that its wall-clock
timing matches the service model's figures for one request, worked out by hand, and that its
prompt cache answers like llama-server's (``timings.cache_n``, ``cached_tokens``, ``/sim/stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentcheck.llamacpp import Reply, interpret
from agentcheck.status import SlotSource, State
from bench.routing.model import TOKEN, ServerSpec, chat_template, common_tokens, tokens
from bench.routing.simulator import HOLD_GRACE, SENT_HEADER, parse_fleet, serve

ROOT = Path(__file__).resolve().parents[2]
FLEET = [ServerSpec("a", slots=2, token_ms=20), ServerSpec("b", slots=4, token_ms=25)]


@dataclass
class Sim:
    ports: dict[str, int]
    session: aiohttp.ClientSession

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    async def get(self, name: str, path: str) -> Reply:
        async with self.session.get(self.url(name, path)) as response:
            assert response.headers["Server"] == "llamacpp-simulator"
            return Reply(response.status, await response.read())

    async def json(self, name: str, path: str) -> Any:
        reply = await self.get(name, path)
        assert reply.status == 200
        return json.loads(reply.body)

    async def metrics(self, name: str) -> dict[str, float]:
        reply = await self.get(name, "/metrics")
        return {sample.name: sample.value
                for family in text_string_to_metric_families(reply.body.decode())
                for sample in family.samples}

    async def agent_view(self, name: str, with_slots: bool = True):
        health, props, metrics = (await self.get(name, "/health"), await self.get(name, "/props"),
                                  await self.get(name, "/metrics"))
        slots = await self.get(name, "/slots") if with_slots else Reply(501, b'{"error":"slots disabled"}')
        return interpret(health, slots, props, metrics)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    ready: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(FLEET, ready.set_result))
    await asyncio.wait({task, ready}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert ready.done(), "the simulator did not start"
    async with aiohttp.ClientSession() as session:
        yield Sim(ready.result(), session)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, Any]]:
    """(perf_counter at arrival, decoded data) per SSE event."""
    async for line in response.content:
        line = line.strip()
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            yield time.perf_counter(), payload.decode() if payload == b"[DONE]" else json.loads(payload)


_prompts = itertools.count()


def fresh_prompt(prompt_tokens: int) -> str:
    """``prompt_tokens`` tokens of text no other prompt of this run starts like: nothing to reuse."""
    head = f"{next(_prompts):04d}"
    return head + "p" * (4 * prompt_tokens - len(head))


async def stream_completion(sim: Sim, name: str, n_predict: int, prompt_tokens: int = 40) -> list[tuple[float, Any]]:
    body = {"prompt": fresh_prompt(prompt_tokens), "n_predict": n_predict, "stream": True}
    async with sim.session.post(sim.url(name, "/completion"), json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [event async for event in sse_events(response)]


async def until(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.005)
    return False


async def test_the_real_agent_reads_the_simulator_as_a_ready_llamacpp_server(sim: Sim) -> None:
    for name, slots in (("a", 2), ("b", 4)):
        status = await sim.agent_view(name)
        assert status.state is State.READY, status.reason
        assert (status.slots_total, status.slots_processing, status.slot_source) == (slots, 0, SlotSource.SLOTS)
        assert status.model == f"/sim/{name}.gguf" and not status.sleeping
        # /slots disabled: the agent falls back to /props + /metrics, which the simulator also serves right.
        fallback = await sim.agent_view(name, with_slots=False)
        assert (fallback.state, fallback.slots_total, fallback.slot_source) == (State.READY, slots,
                                                                               SlotSource.METRICS)
    assert await sim.json("a", "/health") == {"status": "ok"}
    assert await sim.json("a", "/slots") == [{"id": 0, "n_ctx": 4096, "is_processing": False},
                                             {"id": 1, "n_ctx": 4096, "is_processing": False}]
    polls = {name: server["slots_polls"] for name, server in (await sim.json("a", "/sim/stats")).items()}
    assert polls == {"a": 2, "b": 1}  # one agent view with /slots each, and a's GET above
    assert (await sim.get("a", "/no-such-endpoint")).status == 404  # labelled too (checked in get)


async def test_slots_show_processing_while_a_stream_runs(sim: Sim) -> None:
    body = {"prompt": "hi", "n_predict": 10, "stream": True}
    async with sim.session.post(sim.url("a", "/completion"), json=body) as response:
        events = sse_events(response)
        await anext(events)  # first token: the request holds a slot
        assert [slot["is_processing"] for slot in await sim.json("a", "/slots")] == [True, False]
        status = await sim.agent_view("a")
        assert (status.state, status.slots_processing) == (State.READY, 1)
        rest = [event async for event in events]
    assert rest[-1][1]["stop"] is True
    assert [slot["is_processing"] for slot in await sim.json("a", "/slots")] == [False, False]


async def test_three_requests_on_two_slots_defer_one(sim: Sim) -> None:
    runs = [asyncio.create_task(stream_completion(sim, "a", n_predict=12)) for _ in range(3)]

    async def one_deferred() -> bool:
        metrics = await sim.metrics("a")
        return metrics["llamacpp:requests_deferred"] == 1 and metrics["llamacpp:requests_processing"] == 2

    assert await until(one_deferred), "/metrics never showed 2 processing + 1 deferred"
    status = await sim.agent_view("a", with_slots=False)  # the agent's /metrics path sees the same
    assert (status.state, status.slots_processing) == (State.READY, 2)
    results = await asyncio.gather(*runs)

    finals = [events[-1][1] for events in results]
    assert sorted(final["timings"]["deferred"] for final in finals) == [False, False, True]
    waited = next(final for final in finals if final["timings"]["deferred"])
    served = [final for final in finals if not final["timings"]["deferred"]]
    # The deferred one got its slot only when one of the first two finished.
    assert waited["timings"]["ttft_ms"] > min(final["timings"]["e2e_ms"] for final in served)
    stats = await sim.json("a", "/sim/stats")
    assert stats["a"] == {"deferred_total": 1, "completed": 3, "busy": 0, "queued": 0, "prompt_tokens": 120,
                          "cached_tokens": 0, "slots_polls": 0}
    assert stats["b"] == {"deferred_total": 0, "completed": 0, "busy": 0, "queued": 0, "prompt_tokens": 0,
                          "cached_tokens": 0, "slots_polls": 0}
    metrics = await sim.metrics("a")
    assert metrics["llamacpp_sim:requests_deferred_total"] == 1 and metrics["llamacpp:requests_deferred"] == 0


async def test_handoffs_count_the_time_a_request_was_held_while_slots_were_free(sim: Sim) -> None:
    """A request that left its client half a second before it reached an idle fleet was held that long (less the
    grace for a proxy hop); one that carries no send time makes the measure unknown rather than wrong."""
    sent = time.monotonic() - 0.5
    body = {"prompt": fresh_prompt(10), "n_predict": 2}
    async with sim.session.post(sim.url("a", "/completion"), json=body,
                                headers={SENT_HEADER: f"{sent:.6f}"}) as response:
        assert response.status == 200
        await response.read()
    arrived_by = time.monotonic()
    report = await sim.json("b", "/sim/handoffs")
    assert report["requests"] == report["requests_with_send_time"] == 1
    assert 0.5 - HOLD_GRACE <= report["held_while_free_s"] <= arrived_by - sent - HOLD_GRACE
    async with sim.session.post(sim.url("b", "/completion"), json=body) as response:
        assert response.status == 200
        await response.read()
    report = await sim.json("a", "/sim/handoffs")
    assert (report["requests"], report["requests_with_send_time"], report["held_while_free_s"]) == (2, 1, None)


async def test_a_stream_carries_exactly_n_predict_token_events(sim: Sim) -> None:
    events = [data for _, data in await stream_completion(sim, "b", n_predict=7)]
    assert events[:-1] == [{"content": TOKEN, "stop": False, "tokens_predicted": i} for i in range(1, 8)]
    assert events[-1]["stop"] is True and events[-1]["content"] == "" and events[-1]["tokens_predicted"] == 7

    async with sim.session.post(sim.url("b", "/completion"), json={"prompt": "hi", "n_predict": 3}) as response:
        answer = await response.json()
    assert (answer["content"], answer["tokens_predicted"], answer["model"]) == (TOKEN * 3, 3, "/sim/b.gguf")
    assert set(answer["timings"]) >= {"prompt_n", "cache_n", "predicted_n", "predicted_ms"}


async def test_chat_completions_stream_openai_chunks_ending_with_done(sim: Sim) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    async with sim.session.post(sim.url("b", "/v1/chat/completions"), json=body) as response:
        assert response.headers["Server"] == "llamacpp-simulator"
        events = [data async for _, data in sse_events(response)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == TOKEN * 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    async with sim.session.post(sim.url("b", "/v1/chat/completions"),
                                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}) as response:
        answer = await response.json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": TOKEN * 2}


async def test_a_client_disconnect_frees_its_slot(sim: Sim) -> None:
    async def idle() -> bool:
        return not any(slot["is_processing"] for slot in await sim.json("a", "/slots"))

    response = await sim.session.post(sim.url("a", "/completion"),
                                      json={"prompt": "hi", "n_predict": 1000, "stream": True})
    await anext(sse_events(response))
    assert not await idle()
    response.close()  # drops the connection mid-stream
    assert await until(idle)

    with pytest.raises(TimeoutError):  # a non-streamed request abandoned by its client
        async with asyncio.timeout(0.1):
            await sim.session.post(sim.url("a", "/completion"), json={"prompt": "hi", "n_predict": 1000})
    assert await until(idle)
    stats = await sim.json("a", "/sim/stats")
    assert stats["a"]["completed"] == 0 and stats["a"]["busy"] == 0


async def test_wall_clock_timing_matches_the_ideal_queue_prediction(sim: Sim) -> None:
    # b: 4 slots, 25 ms a token alone, prompt 25 / 80 = 0.3125 ms a token. Alone on it, 400 fresh prompt
    # tokens and 8 predicted: the first token after 25 + 400 * 0.3125 = 150 ms, the last 7 steps of 25 ms later.
    prompt_tokens, n_predict = 400, 8
    predicted_ttft, predicted_e2e = 0.150, 0.325
    await sim.get("b", "/health")  # the connection is open: we time the request, not the TCP handshake
    ratios = []
    for _ in range(3):
        started = time.perf_counter()
        events = await stream_completion(sim, "b", n_predict=n_predict, prompt_tokens=prompt_tokens)
        ttft, e2e = events[0][0] - started, events[-1][0] - started
        ratios.append((ttft / predicted_ttft, e2e / predicted_e2e))
        assert ttft == pytest.approx(predicted_ttft, rel=0.3), (ttft, predicted_ttft)
        assert e2e == pytest.approx(predicted_e2e, rel=0.3), (e2e, predicted_e2e)
    print(f"\npredicted ttft {predicted_ttft * 1000:.1f} ms e2e {predicted_e2e * 1000:.1f} ms; "
          "measured/predicted (ttft, e2e): " + ", ".join(f"({t:.3f}, {e:.3f})" for t, e in ratios))


async def chat_turn(sim: Sim, name: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"messages": messages, "max_tokens": max_tokens}
    async with sim.session.post(sim.url(name, "/v1/chat/completions"), json=body) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
    return answer


async def test_a_second_turn_reuses_the_first_on_its_server_and_not_elsewhere(sim: Sim) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    messages = [system, {"role": "user", "content": "What is a slot?"}]
    first = await chat_turn(sim, "b", messages, max_tokens=6)
    prompt = chat_template([(m["role"], m["content"]) for m in messages])
    assert first["usage"]["prompt_tokens"] == tokens(prompt)
    assert first["timings"]["cache_n"] == first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["timings"]["prompt_n"] == tokens(prompt)

    messages += [first["choices"][0]["message"], {"role": "user", "content": "And a queue?"}]
    follow_up = chat_template([(m["role"], m["content"]) for m in messages])
    again = await chat_turn(sim, "b", messages, max_tokens=3)
    reused = common_tokens(follow_up, prompt + TOKEN * 6)  # the first prompt and its answer, up to where they part
    assert again["timings"]["cache_n"] == again["usage"]["prompt_tokens_details"]["cached_tokens"] == reused
    assert again["timings"]["prompt_n"] == tokens(follow_up) - reused and reused > tokens(prompt)

    elsewhere = await chat_turn(sim, "a", messages, max_tokens=3)  # the same follow-up on a server without it
    assert elsewhere["timings"]["cache_n"] == 0

    stats = await sim.json("a", "/sim/stats")
    assert (stats["b"]["prompt_tokens"], stats["b"]["cached_tokens"]) == (tokens(prompt) + tokens(follow_up), reused)
    assert (stats["a"]["prompt_tokens"], stats["a"]["cached_tokens"]) == (tokens(follow_up), 0)
    metrics = await sim.metrics("b")
    assert metrics["llamacpp:prompt_tokens_total"] == tokens(prompt) + tokens(follow_up) - reused


def test_parse_fleet() -> None:
    assert parse_fleet("a:2:20, b:4:25:0.2,c:1:5:0:0.1") == [
        ServerSpec("a", 2, 20.0), ServerSpec("b", 4, 25.0, batch_slowdown=0.2),
        ServerSpec("c", 1, 5.0, batch_slowdown=0.0, prompt_ms_per_token=0.1)]
    assert parse_fleet("a:2:20", cache_tokens=100) == [ServerSpec("a", 2, 20.0, cache_tokens=100)]
    for bad in ("", "a:2", "a:0:20", "a:x:20", "a:1:2:3:4:5"):
        with pytest.raises(ValueError):
            parse_fleet(bad)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_writes_ports_and_stops_cleanly_on_signal(tmp_path: Path, signum: int) -> None:
    ports_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.routing.simulator", "--fleet", "a:2:20,b:4:25", "--ports-file", str(ports_file)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not ports_file.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        ports = json.loads(ports_file.read_text())
        assert sorted(ports) == ["a", "b"]
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['b']}/props", timeout=5) as response:
            assert response.headers["Server"] == "llamacpp-simulator"
            assert json.loads(response.read())["total_slots"] == 4
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
