"""A burst larger than slots plus buffer, through either proxy: exactly what the limits promise.

60 requests at once on 6 free slots (llama-servers with 1, 2 and 3 slots) with
``max_buffered_requests: 30``: 6 run, 30 wait, and exactly 24 are refused at once with 503
``buffer_full``. The requests are long (6,000 tokens), so none ends while the burst arrives and
the counts are exact; once they are observed the clients hang up, which cancels the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from devstack.processes import LlamaServer
from devstack.stack import BalancerStack

pytestmark = pytest.mark.real

SLOTS = {"one": 1, "two": 2, "three": 3}
BURST = 60
MAX_BUFFERED = 30
REFUSED = BURST - sum(SLOTS.values()) - MAX_BUFFERED  # 24


async def completion(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    body = {"prompt": "Tell me a story", "n_predict": 6000, "ignore_eos": True}
    async with session.post(f"{url}/completion", json=body) as response:
        return response.status, await response.read()


def state(stack: BalancerStack, servers: list[LlamaServer]) -> tuple[int | None, int]:
    """(requests waiting in the balancer, requests inside llama.cpp): the balancer's /health and llama.cpp's /slots."""
    return stack.health().get("requests_buffered"), sum(server.busy_slots() or 0 for server in servers)


@pytest.mark.parametrize("kind", ["haproxy", "envoy"])
async def test_a_burst_gets_exactly_slots_plus_buffer_and_the_rest_is_refused_at_once(
        make_llama: Callable[..., LlamaServer], tmp_path: Path, kind: str) -> None:
    servers = [make_llama(name, slots=slots, ctx_per_slot=8192).start() for name, slots in SLOTS.items()]
    with BalancerStack(tmp_path / "lb", {server.name: server.address for server in servers}, kind=kind,
                       balancer={"max_buffered_requests": MAX_BUFFERED, "buffered_request_timeout": "120s"}) as stack:
        stack.wait_slots(SLOTS)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = [asyncio.create_task(completion(session, stack.url)) for _ in range(BURST)]
            deadline = time.monotonic() + 60
            observed = await asyncio.to_thread(state, stack, servers)
            while observed != (MAX_BUFFERED, sum(SLOTS.values())) or sum(task.done() for task in tasks) < REFUSED:
                finished = sum(task.done() for task in tasks)
                assert time.monotonic() < deadline, f"(buffered, running) {observed}, {finished} answered"
                await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                observed = await asyncio.to_thread(state, stack, servers)
            done = [task.result() for task in tasks if task.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    assert len(done) == REFUSED
    assert {status for status, _ in done} == {503}
    assert all(b'"buffer_full"' in body for _, body in done), done[0]
