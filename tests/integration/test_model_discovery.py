"""Model discovery against the real llama-server: a plain server's ``/v1/models``, and a router
(``--models-dir``) polled by ``/models`` and each loaded model's ``/slots?model=``.

The router's ``beta`` has a ``--chat-template-file`` that is a named pipe (``--models-preset``): its child
llama-server stays in ``loading`` until the test writes a template into the pipe, so the loading state is
seen for as long as the test wants, not by luck of timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentcheck.llamacpp import LlamaCppClient
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from devstack.processes import LlamaRouter, LlamaServer, wait_until
from fleet import Address, Backend
from tests.integration import clients

pytestmark = pytest.mark.real

TIMEOUT = 0.8  # the agent's poll timeout at its default 1 s interval
WAIT = 30.0  # real seconds a cold load or a request may take on a busy machine
Poll = Callable[[], Awaitable[BackendStatus]]
TEMPLATE = "{% for message in messages %}{{ message.content }}{% endfor %}"


def backend(address: str) -> Backend:
    host, _, port = address.rpartition(":")
    return Backend("gpu1", Address(host, int(port)))


@contextlib.asynccontextmanager
async def polling(address: str) -> AsyncIterator[Poll]:
    client = LlamaCppClient(timeout=TIMEOUT)
    target = backend(address)
    try:
        yield lambda: client.poll(target, None)
    finally:
        await client.close()


async def poll_until(poll: Poll, seen: Callable[[BackendStatus], bool], what: str) -> BackendStatus:
    """Poll as the agent does (one poll at a time) until a status shows ``what``."""
    last = None
    async with asyncio.timeout(WAIT):
        while True:
            status = await poll()
            if seen(status):
                return status
            last = status
            await asyncio.sleep(0.1)  # the polling interval, not a synchronisation
    raise AssertionError(f"never saw {what}; last status {last}")


def load(status: BackendStatus) -> dict[str, ModelLoad]:
    return {model.name: model.load for model in status.models}


def complete(url: str, model: str, tokens: int) -> clients.Answer:
    return clients.request(f"{url}/v1/completions", {"model": model, "prompt": "Tell me a story",
                                                     "max_tokens": tokens, "ignore_eos": True}, timeout=WAIT * 2)


async def test_a_plain_server_serves_the_model_its_v1_models_names_with_all_its_slots(
        make_llama: Callable[..., LlamaServer]) -> None:
    server = make_llama("gpu1", slots=2, alias="alpha").start()

    async with polling(server.address) as poll:
        status = await poll()

    assert status == BackendStatus(State.READY, slots_total=2, slot_source=SlotSource.SLOTS, model="alpha",
                                   models=(ModelStatus("alpha", ModelLoad.LOADED, 2, 0),))


async def test_a_router_shows_each_model_unloaded_then_loading_then_loaded_with_its_own_slots(
        make_router: Callable[..., LlamaRouter], tmp_path: Path) -> None:
    pipe = tmp_path / "beta-template.fifo"
    os.mkfifo(pipe)
    preset = tmp_path / "preset.ini"
    preset.write_text(f"[beta]\nchat-template-file = {pipe}\n")
    router = make_router(slots=2, ctx_per_slot=4096, extra_args=["--models-preset", str(preset)]).start()

    with ThreadPoolExecutor(2) as pool:
        async with polling(router.address) as poll:
            # 1. Nothing loaded: ready (a request loads a model), no slots, and polling loads nothing.
            for _ in range(3):
                status = await poll()
                assert status == BackendStatus(State.READY, slot_source=SlotSource.SLOTS, router=True,
                                               models=(ModelStatus("alpha", ModelLoad.UNLOADED),
                                                       ModelStatus("beta", ModelLoad.UNLOADED)))
            assert router.models() == {"alpha": "unloaded", "beta": "unloaded"}

            # 2. A request naming alpha loads it: its child's 2 slots are the router's.
            assert complete(router.url, "alpha", 2).status == 200
            status = await poll_until(poll, lambda s: load(s)["alpha"] is ModelLoad.LOADED, "alpha loaded")
            assert status.models[0] == ModelStatus("alpha", ModelLoad.LOADED, 2, 0)
            assert (status.slots_total, status.slots_processing) == (2, 0)

            # 3. A long completion on alpha: one of its slots busy, as its child's own /slots says.
            long = pool.submit(complete, router.url, "alpha", 3000)
            status = await poll_until(poll, lambda s: s.slots_processing == 1, "alpha's slot busy")
            assert status.models[0] == ModelStatus("alpha", ModelLoad.LOADED, 2, 1)
            assert router.busy_slots("alpha") == 1

            # 4. A request naming beta: loading (held by the pipe) while alpha is still polled as before.
            cold = pool.submit(complete, router.url, "beta", 2)
            status = await poll_until(poll, lambda s: load(s)["beta"] is ModelLoad.LOADING, "beta loading")
            assert status.models[1] == ModelStatus("beta", ModelLoad.LOADING)
            assert status.slots_total == 2 and status.reason == ""

            # 5. The template arrives: beta is loaded, the router has 4 slots, and the request is answered.
            write_template(pipe)
            status = await poll_until(poll, lambda s: load(s)["beta"] is ModelLoad.LOADED, "beta loaded")
            assert status.models[1] == ModelStatus("beta", ModelLoad.LOADED, 2, status.models[1].slots_processing)
            assert status.slots_total == 4
            assert cold.result(WAIT).status == 200
            assert long.result(WAIT).status == 200
            status = await poll_until(poll, lambda s: s.slots_processing == 0, "every slot idle again")
            assert status.models == (ModelStatus("alpha", ModelLoad.LOADED, 2, 0),
                                     ModelStatus("beta", ModelLoad.LOADED, 2, 0))


def write_template(pipe: Path) -> None:
    """Once beta's child has the pipe open for reading (it is loading), hand it a chat template."""
    def opened() -> int | None:
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no reader yet
                return None
            raise

    descriptor = wait_until(opened, WAIT, what="beta's child to open its chat template")
    try:
        os.write(descriptor, TEMPLATE.encode())
    finally:
        os.close(descriptor)
