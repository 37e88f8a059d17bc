"""LlamaCppClient against real local HTTP servers: /props is optional and never decides a verdict.

The client runs under a ``Monitor`` bounded as the agent bounds it (poll timeout 0.8 times the
interval), so a /props that held the poll up would show as ``unreachable``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from agentcheck.llamacpp import LlamaCppClient
from agentcheck.model import FleetModel
from agentcheck.monitor import Monitor
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from fleet import Address, Backend

INTERVAL = 0.5
POLL_TIMEOUT = 0.4  # 0.8 * INTERVAL, as the agent sets it
ONE_BUSY_OF_TWO = [{"id": 0, "n_ctx": 4096, "is_processing": True}, {"id": 1, "n_ctx": 4096, "is_processing": False}]
READY_ONE_BUSY = BackendStatus(State.READY, slots_total=2, slots_processing=1, slot_source=SlotSource.SLOTS)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serve(routes: dict[str, Handler]) -> AsyncIterator[tuple[Backend, list[str]]]:
    """An aiohttp server on a free loopback port; yields the backend and the paths requested (with queries)."""
    paths: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        paths.append(request.path_qs)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Backend("gpu1", Address("127.0.0.1", runner.addresses[0][1])), paths
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def llama_client(timeout: float = POLL_TIMEOUT, props_refresh_polls: int | None = None
                       ) -> AsyncIterator[LlamaCppClient]:
    client = LlamaCppClient(timeout=timeout)
    if props_refresh_polls is not None:
        client.PROPS_REFRESH_POLLS = props_refresh_polls
    try:
        yield client
    finally:
        await client.close()


async def polls_on_schedule(client: LlamaCppClient, backend: Backend, count: int) -> list[BackendStatus]:
    """``count`` polls, one per interval, each bounded by the poll timeout as the agent's Monitor does."""
    monitor = Monitor(FleetModel([backend]), lambda b: client.poll(b, None), INTERVAL, POLL_TIMEOUT)
    loop = asyncio.get_running_loop()
    statuses = []
    next_at = loop.time()
    for _ in range(count):
        await asyncio.sleep(max(0.0, next_at - loop.time()))  # the polling schedule, not a synchronisation
        statuses.append(await monitor.poll_once(backend))
        next_at += INTERVAL
    return statuses


async def slots_one_busy(_: web.Request) -> web.Response:
    return web.json_response(ONE_BUSY_OF_TWO)


async def props_hanging(_: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def props_in_0_9_seconds(_: web.Request) -> web.Response:
    await asyncio.sleep(0.9)
    return web.json_response({"total_slots": 2, "model_alias": "slow", "is_sleeping": True})


async def props_500(_: web.Request) -> web.Response:
    return web.json_response({"error": {"code": 500, "message": "boom"}}, status=500)


async def props_html(_: web.Request) -> web.Response:
    return web.Response(text="<html><body><h1>It works!</h1></body></html>", content_type="text/html")


@pytest.mark.parametrize("props", [props_hanging, props_in_0_9_seconds, props_500, props_html],
                         ids=["hangs", "answers-in-0.9s", "http-500", "html"])
async def test_a_faulty_props_never_changes_the_verdict_slots_gives(props: Handler) -> None:
    """A refresh is due on every poll here, so every poll meets the faulty /props."""
    async with serve({"/slots": slots_one_busy, "/props": props}) as (backend, paths), \
            llama_client(props_refresh_polls=1) as client:
        statuses = await polls_on_schedule(client, backend, 3)

    assert statuses == [READY_ONE_BUSY] * 3
    assert "/props" in paths
    assert "/health" not in paths


async def test_props_that_answers_after_the_poll_moved_on_is_used_by_the_next_poll() -> None:
    first_poll_done = asyncio.Event()

    async def props_after_the_first_poll(_: web.Request) -> web.Response:
        await first_poll_done.wait()  # past the 0.2 s a poll waits, within the refresh's own 0.4 s bound
        return web.json_response({"total_slots": 2, "model_alias": "tiny", "is_sleeping": True})

    async with serve({"/slots": slots_one_busy, "/props": props_after_the_first_poll}) as (backend, paths), \
            llama_client() as client:
        first = (await polls_on_schedule(client, backend, 1))[0]
        first_poll_done.set()
        second = (await polls_on_schedule(client, backend, 1))[0]

    assert first == READY_ONE_BUSY
    assert second == BackendStatus(State.READY, slots_total=2, slots_processing=1, slot_source=SlotSource.SLOTS,
                                   model="tiny", sleeping=True)
    # One /props for both polls; on a starved host a refresh past its bound may be asked again.
    assert paths[:2] == ["/slots", "/props"] and paths.count("/slots") == 2


async def test_a_healthy_server_gets_props_and_models_on_the_first_poll_then_one_request_per_poll() -> None:
    async def props(_: web.Request) -> web.Response:
        return web.json_response({"total_slots": 2, "model_alias": "tiny"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async with serve({"/slots": slots_one_busy, "/props": props, "/v1/models": models}) as (backend, paths), \
            llama_client() as client:
        statuses = [await client.poll(backend, None) for _ in range(5)]

    assert {status.model for status in statuses} == {"tiny"}
    assert {status.models for status in statuses} == {(ModelStatus("tiny", ModelLoad.LOADED, 2, 1),)}
    assert paths == ["/slots", "/props", "/v1/models", "/metrics", "/slots", "/slots", "/slots", "/slots"]


async def test_the_last_usable_props_is_kept_when_a_refresh_fails() -> None:
    answers = iter([web.json_response({"model_alias": "tiny"}), web.Response(status=500, text="boom"),
                    web.Response(text="<html>maintenance</html>", content_type="text/html")])

    async def props(_: web.Request) -> web.Response:
        return next(answers)

    async with serve({"/slots": slots_one_busy, "/props": props}) as (backend, paths), \
            llama_client(props_refresh_polls=1) as client:
        models = [(await client.poll(backend, None)).model for _ in range(3)]

    assert models == ["tiny", "tiny", "tiny"]
    assert paths.count("/props") == 3


async def test_props_is_refreshed_when_the_server_is_ready_again() -> None:
    """It may have come back with another model: the refresh does not wait for the 30th poll."""
    loading = True

    async def loading_or(data: object) -> web.Response:
        if loading:
            return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)
        return web.json_response(data)

    async def slots(_: web.Request) -> web.Response:
        return await loading_or(ONE_BUSY_OF_TWO)

    async def props(_: web.Request) -> web.Response:
        return await loading_or({"model_alias": "new"})

    async with serve({"/slots": slots, "/props": props, "/health": slots}) as (backend, paths), \
            llama_client() as client:
        first = await client.poll(backend, None)
        loading = False
        then = [await client.poll(backend, None) for _ in range(3)]

    assert first == BackendStatus.down(State.LOADING, "")
    assert then == [BackendStatus(State.READY, slots_total=2, slots_processing=1, slot_source=SlotSource.SLOTS,
                                  model="new")] * 3
    assert paths == ["/slots", "/props", "/v1/models", "/metrics", "/health", "/slots", "/props", "/v1/models",
                     "/metrics", "/slots", "/slots"]


async def test_slot_count_from_props_on_the_first_poll_when_slots_and_metrics_are_disabled() -> None:
    async def disabled(_: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 501, "message": "not supported"}}, status=501)

    async def props(_: web.Request) -> web.Response:
        return web.json_response({"total_slots": 3})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    routes = {"/slots": disabled, "/metrics": disabled, "/props": props, "/health": health}
    async with serve(routes) as (backend, _), llama_client() as client:
        status = await client.poll(backend, None)

    assert status == BackendStatus(State.READY, slots_total=3, slot_source=SlotSource.CONFIGURED)


async def test_close_cancels_a_props_refresh_under_way() -> None:
    asked = asyncio.Event()
    dropped = asyncio.Event()

    async def props(_: web.Request) -> web.Response:
        asked.set()
        try:
            await asyncio.sleep(3600)
        finally:
            dropped.set()  # aiohttp cancels the handler when the client drops the connection
        raise AssertionError("unreachable")

    # A 10 s timeout: only close() can end the refresh within this test's bounds.
    client = LlamaCppClient(timeout=10.0)
    async with serve({"/slots": slots_one_busy, "/props": props}) as (backend, _):
        poll = asyncio.create_task(client.poll(backend, None))
        async with asyncio.timeout(5):
            await asked.wait()
            poll.cancel()  # as the Monitor does at its bound; the refresh goes on without the poll
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            refreshes = [task for task in asyncio.all_tasks() if task.get_name() == "props-gpu1"]
            assert [task.done() for task in refreshes] == [False]
            await client.close()
            assert [task.cancelled() for task in refreshes] == [True]
            await dropped.wait()


# --- a llama.cpp router (--models-dir): /models every poll, /slots?model= of the loaded models only -----------


def router_models(**loads: str) -> dict[str, object]:
    return {"object": "list", "data": [{"id": name, "object": "model", "status": {"value": value, "args": []}}
                                       for name, value in loads.items()]}


async def router_slots_400(_: web.Request) -> web.Response:
    return web.json_response({"error": {"code": 400, "message": "model name is missing from the request",
                                        "type": "invalid_request_error"}}, status=400)


def router(models: dict[str, object], per_model: dict[str, Handler]) -> dict[str, Handler]:
    """Routes of a fake router: /slots wants ?model=, and asking for a model's slots is served by its handler
    (a test fails if the agent asks for a model it should not: the handler is missing)."""
    async def slots(request: web.Request) -> web.StreamResponse:
        name = request.query.get("model")
        if name is None:
            return await router_slots_400(request)
        return await per_model[name](request)

    async def listing(_: web.Request) -> web.Response:
        return web.json_response(models)

    return {"/slots": slots, "/models": listing}


async def test_a_router_is_found_by_its_slots_answer_then_polled_by_models_and_its_loaded_models_slots() -> None:
    models = router_models(alpha="loaded", beta="unloaded", gamma="loading", **{"org/delta": "loaded"})
    routes = router(models, {"alpha": slots_one_busy, "org/delta": slots_one_busy})
    async with serve(routes) as (backend, paths), llama_client() as client:
        first = await client.poll(backend, None)
        second = await client.poll(backend, None)

    expected = BackendStatus(State.READY, slots_total=4, slots_processing=2, slot_source=SlotSource.SLOTS,
                             router=True, models=(ModelStatus("alpha", ModelLoad.LOADED, 2, 1),
                                                  ModelStatus("beta", ModelLoad.UNLOADED),
                                                  ModelStatus("gamma", ModelLoad.LOADING),
                                                  ModelStatus("org/delta", ModelLoad.LOADED, 2, 1)))
    assert first == second == expected
    per_poll = {"/models", "/slots?model=alpha", "/slots?model=org%2Fdelta"}
    assert paths[0] == "/slots" and set(paths[1:4]) == per_poll and set(paths[4:]) == per_poll
    assert len(paths) == 7  # beta (unloaded) and gamma (loading) are never asked: that would load them


async def test_a_router_is_found_by_its_props_when_its_slots_answer_differs() -> None:
    async def props(_: web.Request) -> web.Response:
        return web.json_response({"role": "router", "max_instances": 4, "model_alias": "llama-server"})

    async def not_found(_: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 404, "message": "File Not Found"}}, status=404)

    routes = router(router_models(alpha="unloaded"), {}) | {"/slots": not_found, "/props": props}
    async with serve(routes) as (backend, paths), llama_client() as client:
        status = await client.poll(backend, None)

    assert status == BackendStatus(State.READY, slot_source=SlotSource.SLOTS, router=True,
                                   models=(ModelStatus("alpha", ModelLoad.UNLOADED),))
    assert paths[-1] == "/models" and "/health" not in paths


async def test_a_hanging_model_costs_its_own_slots_only_within_the_poll_bound() -> None:
    async def hangs(_: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    routes = router(router_models(alpha="loaded", beta="loaded"), {"alpha": slots_one_busy, "beta": hangs})
    async with serve(routes) as (backend, _), llama_client() as client:
        statuses = await polls_on_schedule(client, backend, 2)

    for status in statuses:  # not late, not down: the Monitor's bound was never reached
        assert status.state is State.READY
        assert (status.slots_total, status.slots_processing) == (2, 1)
        assert status.models[1] == ModelStatus("beta", ModelLoad.LOADED)
        assert status.reason == "model 'beta': GET /slots: no answer in time"


async def test_a_router_poll_that_fails_starts_over_from_slots() -> None:
    answers = iter([web.json_response({"error": {"code": 500, "message": "boom"}}, status=500),
                    web.json_response(router_models(alpha="unloaded"))])

    async def models(_: web.Request) -> web.Response:
        return next(answers)

    routes = router({}, {}) | {"/models": models}
    async with serve(routes) as (backend, paths), llama_client() as client:
        failed = await client.poll(backend, None)
        again = await client.poll(backend, None)

    assert failed == BackendStatus.down(State.ERROR, "GET /models answered HTTP 500")
    assert again.state is State.READY and again.router
    assert paths == ["/slots", "/models", "/slots", "/models"]


async def test_the_time_per_token_comes_from_metrics_with_the_refresh() -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="llamacpp:tokens_predicted_total 400\nllamacpp:tokens_predicted_seconds_total 10\n")

    async with serve({"/slots": slots_one_busy, "/metrics": metrics}) as (backend, _), llama_client() as client:
        statuses = [await client.poll(backend, None) for _ in range(2)]

    assert [status.seconds_per_token for status in statuses] == [0.025, 0.025]
