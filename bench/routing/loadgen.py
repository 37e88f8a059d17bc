"""Load for the routing benchmark, seeded; records time to first token, end-to-end time, status and the
prompt cache's reuse per request.

- Open loop (``make_trace``, ``replay``): Poisson or bursty on/off arrivals, long-tailed prompt and output
  lengths, streaming ``/completion``. Every prompt starts with its own 8 hexadecimal digits, so no two
  share a token: no prompt-cache reuse.
- Conversations (``make_conversations``, ``replay_conversations``): sessions start as a Poisson process;
  each picks one of a few shared system prompts (500-2,000 tokens) and runs several turns of streaming
  ``/v1/chat/completions``; each turn resends every message so far, the previous answers as received,
  plus a new question, after a think time that starts when the previous answer ended. The texts are real
  words, so a real llama-server's prompt cache sees what it would in production.

Both are pure data first (``RequestSpec``), so the same requests feed the ideal-queue simulation and
every strategy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.routing.model import TOKEN, RequestSpec, ServerSpec, chat_template, common_tokens, tokens
from bench.routing.simulator import SENT_HEADER


@dataclass(frozen=True)
class TraceConfig:
    seed: int = 42
    duration: float = 15.0
    rate: float = 10.0  # mean arrivals per second
    pattern: str = "poisson"  # or "bursty": on/off periods with the same mean rate
    prompt_median: int = 200
    prompt_max: int = 4000
    output_median: int = 60
    output_max: int = 600


def mean_output_tokens(config: TraceConfig) -> float:
    """Mean of the clipped log-normal used below, estimated once from a large seeded sample."""
    rng = random.Random(config.seed ^ 0x5EED)
    draws = [_output_tokens(rng, config) for _ in range(20_000)]
    return sum(draws) / len(draws)


def capacity_requests_per_second(fleet: list[ServerSpec], mean_output: float, mean_new_prompt: float) -> float:
    """What the fleet sustains with every slot busy: a request costs its output at full-batch speed plus its
    uncached prompt tokens at prompt speed; each server's requests per second, summed."""
    return sum(1 / (mean_output / spec.tokens_per_second_full() + spec.prompt_seconds(mean_new_prompt))
               for spec in fleet)


def mean_prompt_tokens(config: TraceConfig) -> float:
    rng = random.Random(config.seed ^ 0x9E3)
    draws = [_prompt_tokens(rng, config) for _ in range(20_000)]
    return sum(draws) / len(draws)


def _prompt_tokens(rng: random.Random, config: TraceConfig) -> int:
    return max(16, min(config.prompt_max, round(rng.lognormvariate(math.log(config.prompt_median), 0.8))))


def unique_prompt(seed: int, request_id: int, prompt_tokens: int) -> str:
    """``prompt_tokens`` tokens (4 bytes each) of text whose first token no other request shares."""
    head = hashlib.sha256(f"{seed}:{request_id}".encode()).hexdigest()[:8]
    return head + "x" * (4 * prompt_tokens - len(head))


def _output_tokens(rng: random.Random, config: TraceConfig) -> int:
    # Long tail: sigma 0.9 puts p99 near 8x the median, like chat traffic's few long answers.
    return max(4, min(config.output_max, round(rng.lognormvariate(math.log(config.output_median), 0.9))))


def make_trace(config: TraceConfig) -> list[RequestSpec]:
    rng = random.Random(config.seed)
    trace: list[RequestSpec] = []
    now = 0.0
    period = 2.0  # bursty: 2 s at twice the rate, 2 s silent
    while True:
        rate = config.rate
        if config.pattern == "bursty":
            rate = 2 * config.rate
            if int(now // period) % 2 == 1:
                now = (int(now // period) + 1) * period
        now += rng.expovariate(rate)
        if now >= config.duration:
            return trace
        prompt = _prompt_tokens(rng, config)
        trace.append(RequestSpec(len(trace), now, prompt, _output_tokens(rng, config),
                                 text=unique_prompt(config.seed, len(trace), prompt)))


@dataclass
class Result:
    id: int
    status: int
    ttft: float | None
    e2e: float
    bypass: bool
    error: str = ""
    sent: float = 0.0  # seconds from the replay's start
    prompt_tokens: int | None = None  # as the server reported them (a conversation's turns)
    cached_tokens: int | None = None


def _sent_now() -> dict[str, str]:
    """The header that tells the simulator when the request left (bench.routing.simulator.HandOffs)."""
    return {SENT_HEADER: f"{time.monotonic():.6f}"}


async def _one(session: aiohttp.ClientSession, url: str, request: RequestSpec, bypass: bool,
               timeout: float, sent: float) -> Result:
    body = {"prompt": request.text or "x" * (4 * request.prompt_tokens), "n_predict": request.output_tokens,
            "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/completion", json=body, headers=_sent_now(),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                await response.read()
                return Result(request.id, response.status, None, time.perf_counter() - started, bypass, sent=sent)
            async for line in response.content:
                if line.startswith(b"data: ") and ttft is None:
                    ttft = time.perf_counter() - started
            return Result(request.id, 200, ttft, time.perf_counter() - started, bypass, sent=sent)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Result(request.id, 0, ttft, time.perf_counter() - started, bypass, type(exc).__name__, sent=sent)


async def replay(trace: list[RequestSpec], balancer_url: str, bypass_url: str | None = None,
                 bypass_fraction: float = 0.0, seed: int = 0, timeout: float = 120.0) -> list[Result]:
    """Send each request at its arrival time (open loop: never waits for earlier answers).

    With ``bypass_url``, a seeded ``bypass_fraction`` of requests goes straight to that server,
    the way other tools in a real deployment skip the balancer.
    """
    rng = random.Random(seed)
    routes = [bypass_url is not None and rng.random() < bypass_fraction for _ in trace]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for request, bypass in zip(trace, routes, strict=False):
            delay = start + request.arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url = bypass_url if bypass and bypass_url else balancer_url
            tasks.append(asyncio.create_task(_one(session, url, request, bypass, timeout, loop.time() - start)))
        return list(await asyncio.gather(*tasks))


def trace_summary(trace: list[RequestSpec]) -> str:
    return json.dumps({"requests": len(trace), "prompt_tokens_mean": round(sum(r.prompt_tokens for r in trace) /
                                                                          max(1, len(trace))),
                       "output_tokens_mean": round(sum(r.output_tokens for r in trace) / max(1, len(trace)))})


# --- Conversations ------------------------------------------------------------------------------------------

_WORDS = ("the server keeps each slot busy while a request streams its answer back to the client and "
          "a balancer that knows which slots are free can send the next question where its prompt is "
          "already cached so the model skips most of the work of reading a long history again before it "
          "writes the first new word of the reply about routing queues latency tokens memory").split()


@dataclass(frozen=True)
class ConversationConfig:
    seed: int = 42
    duration: float = 60.0  # sessions start during this many seconds
    session_rate: float = 1.0  # mean session starts per second (Poisson)
    system_prompts: tuple[int, ...] = (500, 900, 1400, 2000)  # tokens; each session uses one
    turns_min: int = 2
    turns_max: int = 8
    question_median: int = 40  # tokens
    output_median: int = 60
    output_max: int = 600
    think_mean: float = 3.0  # seconds from an answer's end to the next question (exponential)


@dataclass(frozen=True)
class Turn:
    question: str
    output_tokens: int
    think: float  # seconds after the previous turn's answer ended (the first turn: 0)


@dataclass(frozen=True)
class Conversation:
    first_id: int  # its turns are requests first_id, first_id + 1, ...
    start: float
    system: str
    turns: tuple[Turn, ...]


def _text(rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens (4 bytes each) of seeded words."""
    words: list[str] = []
    length = 0
    while length < 4 * n_tokens:
        words.append(rng.choice(_WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)


def make_conversations(config: ConversationConfig) -> list[Conversation]:
    rng = random.Random(config.seed)
    systems = [f"You are assistant number {i}. " + _text(random.Random(config.seed * 1009 + i), n)
               for i, n in enumerate(config.system_prompts)]
    shape = TraceConfig(output_median=config.output_median, output_max=config.output_max)
    conversations: list[Conversation] = []
    now, next_id = 0.0, 0
    while True:
        now += rng.expovariate(config.session_rate)
        if now >= config.duration:
            return conversations
        turns = tuple(
            Turn(question=f"Question {index + 1}: " + _text(rng, max(4, round(rng.lognormvariate(
                     math.log(config.question_median), 0.7)))) + "?",
                 output_tokens=_output_tokens(rng, shape),
                 think=0.0 if index == 0 else rng.expovariate(1 / config.think_mean))
            for index in range(rng.randint(config.turns_min, config.turns_max)))
        conversations.append(Conversation(next_id, now, rng.choice(systems), turns))
        next_id += len(turns)


def conversation_trace(conversations: list[Conversation]) -> list[RequestSpec]:
    """The turns as requests, each answered the way the SIMULATOR answers (``TOKEN`` per output token): the
    prompt texts a simulated server sees, for the ideal queue. A follow-up follows its previous turn."""
    trace: list[RequestSpec] = []
    for conversation in conversations:
        messages = [("system", conversation.system)]
        for index, turn in enumerate(conversation.turns):
            messages.append(("user", turn.question))
            text = chat_template(messages)
            request_id = conversation.first_id + index
            trace.append(RequestSpec(request_id, conversation.start, tokens(text), turn.output_tokens, text=text,
                                     follows=request_id - 1 if index else None, think=turn.think))
            messages.append(("assistant", TOKEN * turn.output_tokens))
    return trace


def new_prompt_tokens(trace: list[RequestSpec]) -> list[int]:
    """Per request, the prompt tokens a perfect cache would still process: those past what the previous turn
    left in its slot (prompt and answer), or past the system prompt on a first turn."""
    by_id = {request.id: request for request in trace}
    new = []
    for request in trace:
        if request.follows is None:
            system_end = request.text.index("<|im_end|>")
            known = request.text[:system_end]
        else:
            previous = by_id[request.follows]
            known = previous.text + TOKEN * previous.output_tokens
        new.append(request.prompt_tokens - common_tokens(request.text, known))
    return new


async def _chat(session: aiohttp.ClientSession, url: str, request_id: int, messages: list[dict[str, str]],
                max_tokens: int, timeout: float, sent: float, headers: dict[str, str]) -> tuple[Result, str]:
    """One streamed chat turn: its Result and the answer's text."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    ttft: float | None = None
    answer: list[str] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers={**headers, **_sent_now()},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                await response.read()
                return Result(request_id, response.status, None, time.perf_counter() - started, False,
                              sent=sent), ""
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk: dict[str, Any] = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        answer.append(content)
                        if ttft is None:
                            ttft = time.perf_counter() - started
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Result(request_id, 0, ttft, time.perf_counter() - started, False, type(exc).__name__, sent=sent), ""
    cached = timings.get("cache_n", (usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    prompt_tokens = usage.get("prompt_tokens")
    if prompt_tokens is None and "prompt_n" in timings:  # llama-server streams no usage unless asked
        prompt_tokens = timings["prompt_n"] + timings.get("cache_n", 0)
    return Result(request_id, 200, ttft, time.perf_counter() - started, False, sent=sent,
                  prompt_tokens=prompt_tokens, cached_tokens=cached), "".join(answer)


async def replay_conversations(conversations: list[Conversation], balancer_url: str,
                               timeout: float = 120.0, session_header: bool = False) -> list[Result]:
    """Each conversation starts at its time and sends its turns one after another, each ``think`` seconds after
    the previous answer ended, resending the answers as received. A turn that fails ends its conversation
    (its later turns are never sent). ``session_header``: each turn carries its conversation's id in
    X-Session-Id."""
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def converse(conversation: Conversation) -> None:
            await asyncio.sleep(max(0.0, start + conversation.start - loop.time()))
            messages = [{"role": "system", "content": conversation.system}]
            headers = {"X-Session-Id": f"session-{conversation.first_id}"} if session_header else {}
            for index, turn in enumerate(conversation.turns):
                await asyncio.sleep(turn.think)
                messages.append({"role": "user", "content": turn.question})
                result, answer = await _chat(session, balancer_url, conversation.first_id + index, messages,
                                             turn.output_tokens, timeout, loop.time() - start, headers)
                results.append(result)
                if result.status != 200:
                    return
                messages.append({"role": "assistant", "content": answer})

        await asyncio.gather(*(converse(conversation) for conversation in conversations))
    return sorted(results, key=lambda result: result.id)
