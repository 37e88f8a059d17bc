"""Per-model pools: which slots of a backend serve a model, and the agent-check line each pool's server gets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agentcheck.model import FleetModel, PollWindow
from agentcheck.model_routing import model_share, model_view, served_models
from agentcheck.policy import WeightFormula
from agentcheck.protocol import Request
from agentcheck.replies import AgentCheckReplies
from agentcheck.status import BackendStatus, ModelLoad, ModelStatus, SlotSource, State
from fleet import Address, Backend

PLAIN = Backend("gpu1", Address("127.0.0.1", 8081))
ROUTER = Backend("big1", Address("127.0.0.1", 8082))
WINDOW = PollWindow(10.0, 10.2)


def plain(total: int, processing: int = 0, model: str = "alpha") -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS,
                         models=(ModelStatus(model, ModelLoad.LOADED, total, processing),))


def router(*models: ModelStatus) -> BackendStatus:
    loaded = [model for model in models if model.load is ModelLoad.LOADED]
    return BackendStatus(State.READY, slots_total=sum(model.slots_total for model in loaded),
                         slots_processing=sum(model.slots_processing for model in loaded),
                         slot_source=SlotSource.SLOTS, models=models, router=True)


def test_a_plain_server_serves_its_discovered_model_with_all_its_slots() -> None:
    status = plain(4, 1)
    assert served_models(PLAIN, status) == ("alpha",)
    assert model_share(PLAIN, status, "alpha") == ModelStatus("alpha", ModelLoad.LOADED, 4, 1)
    assert model_share(PLAIN, status, "beta") is None


def test_declared_models_override_discovery() -> None:
    declared = replace(PLAIN, models=("qwen3-8b",))
    assert served_models(declared, plain(2)) == ("qwen3-8b",)
    assert model_share(declared, plain(2), "alpha") is None
    assert model_share(declared, plain(2), "qwen3-8b") == ModelStatus("qwen3-8b", ModelLoad.LOADED, 2, 0)


@pytest.mark.parametrize(("slots", "processing", "shares"), [
    (5, 0, [(2, 0), (2, 0), (1, 0)]),
    (4, 3, [(2, 2), (1, 1), (1, 1)]),
    (2, 0, [(1, 0), (1, 0), (0, 0)]),
])
def test_aliases_of_one_plain_server_split_its_slots_and_never_exceed_them(
        slots: int, processing: int, shares: list[tuple[int, int]]) -> None:
    backend = replace(PLAIN, models=("a", "b", "c"))
    found = [model_share(backend, plain(slots, processing), name) for name in ("a", "b", "c")]
    assert [(share.slots_total, share.slots_processing) for share in found if share] == shares
    assert sum(total for total, _ in shares) == slots


def test_a_router_serves_each_model_with_its_own_slots_and_unloaded_ones_with_none() -> None:
    status = router(ModelStatus("alpha", ModelLoad.LOADED, 2, 1), ModelStatus("beta", ModelLoad.UNLOADED))
    assert served_models(ROUTER, status) == ("alpha", "beta")
    assert model_share(ROUTER, status, "alpha") == ModelStatus("alpha", ModelLoad.LOADED, 2, 1)
    assert model_share(ROUTER, status, "beta") == ModelStatus("beta", ModelLoad.UNLOADED)
    assert model_share(ROUTER, status, "gamma") is None
    view = model_view(status, ModelStatus("alpha", ModelLoad.LOADED, 2, 1))
    assert (view.slots_total, view.slots_processing, view.model) == (2, 1, "alpha")


def wired(*backends: Backend, window: float = 0.0) -> tuple[FleetModel, AgentCheckReplies, list[float]]:
    clock = [100.0]
    fleet = FleetModel(backends)
    replies = AgentCheckReplies(fleet, WeightFormula.IDLE, return_window=window, clock=lambda: clock[0])
    fleet.subscribe(replies.on_member_change)
    return fleet, replies, clock


def ask(name: str, model: str) -> Request:
    return Request(name=name, model=model)


def test_each_pool_of_a_plain_server_gets_its_own_line() -> None:
    fleet, replies, _ = wired(PLAIN)
    fleet.record_poll("gpu1", plain(4, 1), now=1.0, window=WINDOW)
    assert replies.answer(ask("gpu1", "alpha")) == "up ready 75% maxconn:4 #idle=3 processing=1 via slots\n"
    assert replies.answer(ask("gpu1", "beta")) == "up drain #does not serve beta\n"
    assert replies.answer(Request(name="gpu1")) == "up ready 75% maxconn:4 #idle=3 processing=1 via slots\n"
    assert replies.served == {"ready": 2, "drain": 1}


def test_a_router_pool_line_follows_its_model_from_cold_to_loaded() -> None:
    fleet, replies, _ = wired(ROUTER)
    fleet.record_poll("big1", router(ModelStatus("alpha", ModelLoad.LOADED, 2, 2),
                                     ModelStatus("beta", ModelLoad.UNLOADED)), now=1.0, window=WINDOW)
    assert replies.answer(ask("big1", "alpha")) == "up ready 1% maxconn:2 #idle=0 processing=2 via slots\n"
    assert replies.answer(ask("big1", "beta")) == "up ready 1% maxconn:1 #beta unloaded: a request loads it\n"
    fleet.record_poll("big1", router(ModelStatus("alpha", ModelLoad.LOADED, 2, 0),
                                     ModelStatus("beta", ModelLoad.LOADING)), now=2.0, window=WINDOW)
    assert replies.answer(ask("big1", "beta")) == "up ready 1% maxconn:1 #beta loading: a request loads it\n"
    fleet.record_poll("big1", router(ModelStatus("alpha", ModelLoad.LOADED, 2, 0),
                                     ModelStatus("beta", ModelLoad.LOADED, 2, 1)), now=3.0, window=WINDOW)
    assert replies.answer(ask("big1", "beta")) == "up ready 50% maxconn:2 #idle=1 processing=1 via slots\n"


def test_a_drained_router_keeps_a_cold_model_at_one_request_and_drained() -> None:
    fleet, replies, _ = wired(ROUTER)
    fleet.record_poll("big1", router(ModelStatus("beta", ModelLoad.UNLOADED)), now=1.0, window=WINDOW)
    fleet.set_drained("big1", True)
    assert replies.answer(ask("big1", "beta")) == "up drain maxconn:1 #drained by operator, beta unloaded\n"


def test_a_down_server_is_down_in_every_pool_and_each_pool_comes_back_at_0_percent() -> None:
    fleet, replies, clock = wired(PLAIN, window=2.0)
    fleet.record_poll("gpu1", BackendStatus.down(State.UNREACHABLE, "connection refused"), now=1.0, window=WINDOW)
    for model in ("alpha", "beta"):
        assert replies.answer(ask("gpu1", model)) == "down #unreachable: connection refused\n"
    fleet.record_poll("gpu1", plain(2), now=2.0, window=WINDOW)
    returning = "up ready 0% maxconn:2 #back from down, weight follows, idle=2 processing=0 via slots\n"
    assert replies.answer(ask("gpu1", "alpha")) == returning
    assert replies.answer(ask("gpu1", "beta")) == "up drain #does not serve beta\n"
    clock[0] = 102.0
    assert replies.answer(ask("gpu1", "alpha")) == "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"


def test_a_pool_line_for_a_name_outside_the_fleet_is_down_and_says_so() -> None:
    _, replies, _ = wired(PLAIN)
    assert replies.answer(ask("gpu9", "alpha")).startswith("down #paddler-agent: unknown backend 'gpu9'")
