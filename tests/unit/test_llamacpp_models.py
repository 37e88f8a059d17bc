"""Which models a llama.cpp server serves, without sockets: ``model_list`` (``/v1/models``, a router's
``/models``), ``interpret_router`` (a router's ``/models`` and each loaded model's ``/slots?model=``), and the
models ``interpret`` puts on a plain server's status. Bodies are the pinned llama-server's (build b1-0c1e570)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcheck.llamacpp import (
    MAX_MODELS,
    MAX_REASON_CHARS,
    MAX_SLOTS,
    Failure,
    Reply,
    interpret,
    interpret_router,
    is_router_answer,
    model_list,
    props_say_router,
    seconds_per_token,
)
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State


def ok(data: Any) -> Reply:
    return Reply(200, json.dumps(data).encode())


def slots(*busy: bool) -> Reply:
    return ok([{"id": index, "n_ctx": 2048, "is_processing": flag} for index, flag in enumerate(busy)])


def router_model(name: str, value: str) -> dict[str, Any]:
    """One entry of a router's /models, as the pinned build writes it."""
    return {"id": name, "aliases": [], "tags": [], "object": "model", "owned_by": "llamacpp",
            "status": {"value": value, "args": ["llama-server", "--port", "0", "--alias", name, "--parallel", "2"]},
            "source": "models_dir", "can_remove": False}


def router_models(*models: tuple[str, str]) -> Reply:
    return ok({"data": [router_model(name, value) for name, value in models], "object": "list"})


PLAIN_MODELS = {"models": [{"name": "alpha", "model": "alpha"}], "object": "list",
                "data": [{"id": "alpha", "aliases": ["alpha"], "object": "model", "owned_by": "llamacpp"}]}
ROUTER_SLOTS_400 = Reply(400, b'{"error":{"code":400,"message":"model name is missing from the request",'
                              b'"type":"invalid_request_error"}}')


# --- model_list --------------------------------------------------------------------------------------------


def test_a_plain_servers_models_are_loaded() -> None:
    assert model_list(PLAIN_MODELS) == (("alpha", ModelLoad.LOADED),)


def test_a_routers_models_carry_their_load_state() -> None:
    body = json.loads(router_models(("alpha", "loaded"), ("beta", "loading"), ("gamma", "unloaded")).body)

    assert model_list(body) == (("alpha", ModelLoad.LOADED), ("beta", ModelLoad.LOADING),
                                ("gamma", ModelLoad.UNLOADED))


def test_a_load_state_this_agent_does_not_know_counts_as_unloaded() -> None:
    assert model_list({"data": [{"id": "alpha", "status": {"value": "sleeping"}}]}) == (("alpha", ModelLoad.UNLOADED),)


def test_a_plain_servers_default_id_is_its_model_path() -> None:
    assert model_list({"data": [{"id": "/models/tiny.gguf"}]}) == (("/models/tiny.gguf", ModelLoad.LOADED),)


@pytest.mark.parametrize(("data", "problem"), [
    pytest.param([], "expected a JSON object with a data list", id="a-list"),
    pytest.param({"data": {"id": "alpha"}}, "expected a JSON object with a data list", id="data-not-a-list"),
    pytest.param({"data": ["alpha"]}, "model 0 has no id of 1-256 printable characters", id="entry-not-an-object"),
    pytest.param({"data": [{"id": ""}]}, "model 0 has no id of 1-256 printable characters", id="empty-id"),
    pytest.param({"data": [{"id": 7}]}, "model 0 has no id of 1-256 printable characters", id="numeric-id"),
    pytest.param({"data": [{"id": "a"}, {"id": "x" * 257}]}, "model 1 has no id of 1-256 printable characters",
                 id="id-too-long"),
    pytest.param({"data": [{"id": "a\nb"}]}, "model 0 has no id of 1-256 printable characters", id="line-break"),
    pytest.param({"data": [{"id": "a"}, {"id": "a"}]}, "lists model 'a' twice", id="duplicate"),
    pytest.param({"data": [{"id": "a", "status": "loaded"}]}, "model 'a' has no status value", id="status-string"),
    pytest.param({"data": [{"id": "a", "status": {"value": 1}}]}, "model 'a' has no status value",
                 id="status-value-number"),
])
def test_a_broken_model_list_says_what_is_wrong(data: Any, problem: str) -> None:
    assert model_list(data) == problem


def test_more_models_than_supported_is_a_broken_list() -> None:
    data = {"data": [{"id": f"m{index}"} for index in range(MAX_MODELS + 1)]}

    assert model_list(data) == f"lists {MAX_MODELS + 1} models: at most {MAX_MODELS} are supported"
    assert len(model_list({"data": data["data"][:MAX_MODELS]})) == MAX_MODELS


# --- a plain server's status lists its models ----------------------------------------------------------------


def test_a_ready_plain_server_lists_each_model_with_all_its_slots() -> None:
    status = interpret(None, slots(True, False, False), model_names=("alpha",))

    assert status.models == (ModelStatus("alpha", ModelLoad.LOADED, slots_total=3, slots_processing=1),)
    assert status.router is False


def test_a_plain_server_that_is_not_ready_lists_no_models() -> None:
    assert interpret(Reply(503, b"{}"), Reply(503, b"{}"), model_names=("alpha",)).models == ()


# --- recognising a router -------------------------------------------------------------------------------------


def test_a_routers_slots_answer_is_recognised() -> None:
    assert is_router_answer(ROUTER_SLOTS_400)
    assert not is_router_answer(Reply(400, b'{"error":{"code":400,"message":"bad request"}}'))
    assert not is_router_answer(Reply(400, b"model name is missing from the request"))
    assert not is_router_answer(Failure("connection failed"))


def test_a_routers_props_are_recognised() -> None:
    assert props_say_router(ok({"role": "router", "max_instances": 4, "model_alias": "llama-server"}))
    assert not props_say_router(ok({"total_slots": 2, "model_alias": "alpha"}))
    assert not props_say_router(Reply(500, b'{"role":"router"}'))
    assert not props_say_router(None)


# --- interpret_router ------------------------------------------------------------------------------------------


def test_a_router_sums_the_slots_of_its_loaded_models_and_lists_every_model() -> None:
    models = router_models(("alpha", "loaded"), ("beta", "loading"), ("gamma", "unloaded"), ("delta", "loaded"))

    status = interpret_router(models, {"alpha": slots(True, False), "delta": slots(True, True, False, False)})

    assert status == BackendStatus(
        State.READY, slots_total=6, slots_processing=3, slot_source=SlotSource.SLOTS, router=True,
        models=(ModelStatus("alpha", ModelLoad.LOADED, 2, 1), ModelStatus("beta", ModelLoad.LOADING),
                ModelStatus("gamma", ModelLoad.UNLOADED), ModelStatus("delta", ModelLoad.LOADED, 4, 2)))


def test_a_router_with_no_model_loaded_is_ready_with_no_slots() -> None:
    """Alive, and a request naming a model loads it: not down (what the reply says is agentcheck.policy's)."""
    status = interpret_router(router_models(("alpha", "unloaded"), ("beta", "loading")), {})

    assert status.state is State.READY and status.router
    assert (status.slots_total, status.slots_processing, status.reason) == (0, 0, "")
    assert [model.load for model in status.models] == [ModelLoad.UNLOADED, ModelLoad.LOADING]


@pytest.mark.parametrize(("answer", "problem"), [
    pytest.param(None, "GET /slots: no answer in time", id="not-answered-in-time"),
    pytest.param(Failure("no answer within 0.4s"), "GET /slots: no answer within 0.4s", id="failure"),
    pytest.param(Reply(500, b"{}"), "GET /slots answered HTTP 500", id="http-500"),
    pytest.param(ok([]), "GET /slots: server lists no slots", id="no-slots"),
])
def test_a_loaded_model_whose_slots_fail_counts_no_slots_and_the_reason_names_it(answer: Reply | None,
                                                                                 problem: str) -> None:
    answers = {"alpha": slots(True, False)} | ({"beta": answer} if answer is not None else {})

    status = interpret_router(router_models(("alpha", "loaded"), ("beta", "loaded")), answers)

    assert status.state is State.READY
    assert (status.slots_total, status.slots_processing) == (2, 1)
    assert status.models[1] == ModelStatus("beta", ModelLoad.LOADED)
    assert status.reason == f"model 'beta': {problem}"


def test_the_reason_of_many_failing_models_is_bounded() -> None:
    names = [f"model-{index:03}" for index in range(60)]

    status = interpret_router(router_models(*((name, "loaded") for name in names)), {})

    assert status.state is State.READY
    assert len(status.reason) == MAX_REASON_CHARS + 3 and status.reason.endswith("...")


@pytest.mark.parametrize(("models", "expected"), [
    pytest.param(Failure("connection failed (Connection refused)"),
                 BackendStatus.down(State.UNREACHABLE, "GET /models: connection failed (Connection refused)"),
                 id="unreachable"),
    pytest.param(Reply(401, b"{}"), BackendStatus.down(State.UNAUTHORIZED, "GET /models answered HTTP 401"),
                 id="unauthorized"),
    pytest.param(Reply(503, b'{"error":{"code":503,"message":"Loading model"}}'), BackendStatus.down(State.LOADING, ""),
                 id="loading"),
    pytest.param(Reply(500, b"{}"), BackendStatus.down(State.ERROR, "GET /models answered HTTP 500"), id="http-500"),
    pytest.param(Reply(200, b"<html>"), BackendStatus.down(State.ERROR, "GET /models: body is not valid JSON"),
                 id="not-json"),
    pytest.param(ok(PLAIN_MODELS),
                 BackendStatus.down(State.ERROR, "GET /models: model 'alpha' has no status: not a llama.cpp router"),
                 id="a-plain-server-now"),
])
def test_a_router_that_does_not_answer_models_usably_is_down(models: Reply | Failure,
                                                             expected: BackendStatus) -> None:
    assert interpret_router(models, {}) == expected


def test_more_slots_than_supported_over_the_loaded_models_is_an_error() -> None:
    big = ok([{"id": index, "is_processing": False} for index in range(MAX_SLOTS)])

    status = interpret_router(router_models(("alpha", "loaded"), ("beta", "loaded")), {"alpha": big, "beta": big})

    assert status == BackendStatus.down(State.ERROR, f"{2 * MAX_SLOTS} slots over its loaded models: at most "
                                                     f"{MAX_SLOTS} are supported")


loads = st.sampled_from(["loaded", "loading", "unloaded", "failed", ""])
entries = st.lists(st.fixed_dictionaries({"id": st.text(min_size=0, max_size=5) | st.integers(),
                                          "status": st.none() | st.fixed_dictionaries({"value": loads})}),
                   max_size=6)
slot_bodies = st.one_of(st.binary(max_size=30).map(lambda body: Reply(200, body)),
                        st.lists(st.booleans(), max_size=4).map(lambda busy: slots(*busy)),
                        st.builds(Failure, st.text(max_size=10)))


@settings(database=None, derandomize=True, max_examples=500)
@given(models=entries, answers=st.dictionaries(st.text(max_size=5), slot_bodies, max_size=6))
def test_interpret_router_never_raises_and_a_ready_router_adds_up(models: list[Any], answers: Any) -> None:
    status = interpret_router(ok({"data": models}), answers)

    assert isinstance(status, BackendStatus)
    if status.state is State.READY:
        assert status.router and status.slot_source is SlotSource.SLOTS
        assert status.slots_total == sum(model.slots_total for model in status.models) <= MAX_SLOTS
        assert 0 <= status.slots_processing <= status.slots_total
        assert all(model.slots_total == 0 for model in status.models if model.load is not ModelLoad.LOADED)
        assert len(status.reason) <= MAX_REASON_CHARS + 3
    else:
        assert status.slots_total == 0 and status.models == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("llamacpp:tokens_predicted_total 400\nllamacpp:tokens_predicted_seconds_total 10\n", 0.025),
    ("llamacpp:tokens_predicted_total 63\nllamacpp:tokens_predicted_seconds_total 1\n", None),  # too few tokens
    ("llamacpp:tokens_predicted_total 400\n", None),
    ("llamacpp:tokens_predicted_total 400\nllamacpp:tokens_predicted_seconds_total 0\n", None),
    ("llamacpp:tokens_predicted_total NaN\nllamacpp:tokens_predicted_seconds_total 3\n", None),
    ("not prometheus {{{", None),
])
def test_time_per_token_from_metrics(text: str, expected: float | None) -> None:
    assert seconds_per_token(text.encode()) == expected
