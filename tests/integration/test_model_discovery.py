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
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agentcheck.llamacpp import LlamaCppClient
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from devstack import browser
from devstack.processes import AgentProcess, LlamaRouter, LlamaServer, http_get, wait_until
from fleet import Address, Backend
from tests.integration import clients
from tests.integration.test_dashboard import Dashboard, require_chromium
from tests.integration.test_top import Terminal, row

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


# --- the real agent shows a router's models in its API, /health?model=, /metrics, top and the dashboard -----


def agents(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    status, body = http_get(agent.management_url + "/api/v1/agents")
    assert status == 200
    return {row["name"]: row for row in json.loads(body)["agents"]}


def models_of(agent: AgentProcess, name: str) -> dict[str, tuple[str | None, int, int, bool, bool]]:
    """A backend's models as /api/v1/agents lists them: name → (load, idle, total, declared, discovered)."""
    return {model["name"]: (model["load"], model["slots_idle"], model["slots_total"], model["declared"],
                            model["discovered"]) for model in agents(agent)[name]["models"]}


def model_health(agent: AgentProcess, model: str) -> tuple[int, Any]:
    status, body = http_get(f"{agent.management_url}/health?model={model}")
    return status, json.loads(body)


def metric(agent: AgentProcess, name: str, **labels: str) -> float | None:
    _, body = http_get(agent.management_url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_the_agent_shows_a_routers_models_and_a_cold_load_everywhere(
        make_router: Callable[..., LlamaRouter], make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    require_chromium()  # before starting anything: a test failure, not a fixture error
    router = make_router(slots=2).start()
    plain = make_llama("plain", slots=2, alias="alpha").start()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"backends": [
        {"name": "router", "address": router.address},
        {"name": "plain", "address": plain.address, "models": ["alpha", "gamma"]}]}))
    terminal = Terminal(f"paddler-models-test-{os.getpid()}")
    with AgentProcess(tmp_path, ["--fleet", str(fleet), "--interval", "200ms"]) as agent:
        # 1. Both backends' models: the router's unloaded, the plain server's declared list against discovery.
        wait_until(lambda: models_of(agent, "router") == {"alpha": ("unloaded", 0, 0, False, True),
                                                          "beta": ("unloaded", 0, 0, False, True)}
                   and models_of(agent, "plain") == {"alpha": ("loaded", 2, 2, True, True),
                                                     "gamma": (None, 0, 0, True, False)},
                   WAIT, what="the router's models unloaded and the plain server's declared models")
        rows = agents(agent)
        assert (rows["router"]["router"], rows["router"]["state"], rows["router"]["slots_total"]) == (True, "ready", 0)
        assert (rows["plain"]["router"], rows["plain"]["models_declared"]) == (False, True)
        assert router.models() == {"alpha": "unloaded", "beta": "unloaded"}  # the agent's polls load nothing

        # 2. /health?model=: beta is served (a request loads it) with no idle slot yet; gamma by its share of
        #    the plain server's slots (two declared names split its 2); a model nothing serves is a 404.
        assert model_health(agent, "beta") == (200, {"status": "ok", "slots_idle": 0, "slots_processing": 0})
        assert model_health(agent, "gamma") == (200, {"status": "ok", "slots_idle": 1, "slots_processing": 0})
        status, body = model_health(agent, "nosuch")
        assert (status, body["error"]["type"], body["error"]["code"]) == (404, "model_not_found", 404)

        # 3. A request naming beta loads it: its child's 2 slots, one cold load counted, the load state gauge.
        assert complete(router.url, "beta", 2).status == 200
        wait_until(lambda: models_of(agent, "router")["beta"] == ("loaded", 2, 2, False, True), WAIT,
                   what="beta loaded with its 2 slots")
        assert model_health(agent, "beta") == (200, {"status": "ok", "slots_idle": 2, "slots_processing": 0})
        assert metric(agent, "paddler_model_cold_loads_total", backend="router", model="beta") == 1
        assert metric(agent, "paddler_model_cold_loads_total", backend="router", model="alpha") is None
        assert metric(agent, "paddler_model_load_state", backend="router", model="beta", state="loaded") == 1
        assert metric(agent, "paddler_model_slots_total", backend="router", model="beta") == 2
        assert agents(agent)["router"]["slots_total"] == 2

        # 4. paddler-agent top in a real terminal: the router's loaded count, and a line of models under each.
        try:
            terminal.start()
            terminal.type(f"{sys.executable} -m agentcheck top --agent {agent.management_url} --interval 200ms",
                          "Enter")
            lines = terminal.until(lambda lines: row(lines, "router")[6:9] == ["router,", "1/2", "loaded"],
                                   what="the router's row with one of two models loaded")
            below = {name: lines[index + 1] for index, line in enumerate(lines[:-1])
                     for name in ("router", "plain") if line.startswith(name + " ")}
            assert below == {"router": "  models: alpha unloaded, beta loaded 0/2 busy",
                             "plain": "  models: alpha loaded 0/2 busy, gamma declared, NOT DISCOVERED"}
            print("\n".join(lines))
        finally:
            terminal.kill()

        # 5. The dashboard in a real browser: a line per model with its state, the router marked as one.
        with browser.LivePage(agent.management_url + "/") as page:
            view = Dashboard(page).until(lambda v: len(v.rows) == 2 and v.names[1] == "plain", what="both rows")
            router_row, plain_row = (row["cells"] for row in view.rows)
            assert router_row["NAME"] == "routerROUTER"  # the badge, set apart by its margin only
            assert router_row["MODEL"] == "alpha UNLOADED beta LOADED 2/2 idle"
            assert plain_row["MODEL"] == "alpha LOADED 2/2 idle gamma NOT DISCOVERED"
