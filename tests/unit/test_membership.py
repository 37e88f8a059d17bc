"""Membership without sockets: heartbeats on a hand-driven clock, leaving decided by polls, SIGHUP re-reads."""

from __future__ import annotations

import pytest

from agentcheck.membership import Membership, Refused
from agentcheck.model import FleetModel, Origin, PollWindow, Role
from agentcheck.status import BackendStatus, SlotSource, State
from fleet import Fleet, parse_fleet


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fleet(*names: str, standby: tuple[str, ...] = ()) -> Fleet:
    return parse_fleet({
        "backends": [{"name": name, "address": f"127.0.0.1:{9000 + i}"} for i, name in enumerate(names)],
        "standby": [{"name": name, "address": f"127.0.0.1:{9100 + i}"} for i, name in enumerate(standby)],
        "agent": {"registration_timeout": "10s"}})


def make(*names: str) -> tuple[FleetModel, Membership, Clock]:
    clock = Clock()
    initial = fleet(*names)
    model = FleetModel.from_fleet(initial)
    return model, Membership(model, initial, clock), clock


def poll(model: FleetModel, clock: Clock, name: str, processing: int) -> None:
    status = BackendStatus(State.READY, slots_total=2, slots_processing=processing, slot_source=SlotSource.SLOTS)
    model.record_poll(name, status, now=0.0, window=PollWindow(clock.now, clock.now + 0.01))
    clock.now += 0.1


def test_a_registration_without_heartbeat_leaves_after_its_timeout_and_a_heartbeat_keeps_it() -> None:
    model, membership, clock = make("gpu1")
    assert membership.register({"name": "gpu7", "address": "127.0.0.1:9007"}).created
    poll(model, clock, "gpu7", processing=1)
    clock.now += 9
    assert not membership.register({"name": "gpu7", "address": "127.0.0.1:9007"}).created
    clock.now += 9
    membership.sweep()
    assert not model["gpu7"].leaving and membership.expires_in("gpu7") == pytest.approx(1.0)

    clock.now += 1.0
    membership.sweep()
    assert model["gpu7"].leaving and not model["gpu7"].usable


def test_a_leaving_backend_is_removed_only_after_a_poll_begun_later_finds_nothing_running() -> None:
    model, membership, clock = make("gpu1")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007"})
    poll(model, clock, "gpu7", processing=2)
    membership.deregister("gpu7")

    membership.sweep()
    assert "gpu7" in model  # the last poll began before the leaving: it cannot vouch for anything
    poll(model, clock, "gpu7", processing=1)
    membership.sweep()
    assert "gpu7" in model  # a stream still runs there
    poll(model, clock, "gpu7", processing=0)
    membership.sweep()
    assert "gpu7" not in model


def test_a_leaving_backend_that_goes_down_is_removed_at_once() -> None:
    model, membership, clock = make("gpu1")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007"})
    poll(model, clock, "gpu7", processing=2)
    membership.deregister("gpu7")
    model.record_poll("gpu7", BackendStatus.down(State.UNREACHABLE, "connection refused"), now=0.0,
                      window=PollWindow(clock.now, clock.now))
    membership.sweep()
    assert "gpu7" not in model


def test_registering_again_while_leaving_keeps_the_backend() -> None:
    model, membership, clock = make("gpu1")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007"})
    poll(model, clock, "gpu7", processing=1)
    membership.deregister("gpu7")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007"})
    poll(model, clock, "gpu7", processing=0)
    membership.sweep()
    assert "gpu7" in model and model["gpu7"].usable


def test_a_name_registered_with_another_address_is_refused() -> None:
    _, membership, _ = make("gpu1")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007"})
    with pytest.raises(Refused) as refused:
        membership.register({"name": "gpu7", "address": "127.0.0.1:9008"})
    assert (refused.value.status, refused.value.reason) == (
        409, "'gpu7' is registered with 127.0.0.1:9007; deregister it first")


def test_a_reread_fleet_file_adds_new_backends_and_lets_missing_ones_leave() -> None:
    model, membership, _ = make("gpu1", "gpu2")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007"})

    warnings = membership.reload(fleet("gpu1", "gpu3", standby=("spare",)))

    assert warnings == []
    assert [(m.name, m.origin, m.role, m.leaving) for m in model] == [
        ("gpu1", Origin.FLEET_FILE, Role.PRIMARY, False),
        ("gpu2", Origin.FLEET_FILE, Role.PRIMARY, True),
        ("gpu7", Origin.REGISTERED, Role.PRIMARY, False),
        ("gpu3", Origin.FLEET_FILE, Role.PRIMARY, False),
        ("spare", Origin.FLEET_FILE, Role.STANDBY, False),
    ]
    membership.sweep()
    assert "gpu2" not in model  # never polled ready: nothing runs there


def test_a_reread_fleet_file_that_changes_a_backend_or_settings_only_warns() -> None:
    model, membership, _ = make("gpu1")
    changed = parse_fleet({"backends": [{"name": "gpu1", "address": "127.0.0.1:9500"}],
                           "agent": {"interval": "2s"}})
    warnings = membership.reload(changed)
    assert warnings == ["agent, balancer and statsd settings take effect at the next restart",
                        "'gpu1' changed (address, role or keys): remove it, reload, then add it back"]
    assert str(model["gpu1"].backend.address) == "127.0.0.1:9000"


def test_a_registration_may_declare_the_models_it_serves_and_bad_names_are_refused() -> None:
    model, membership, _ = make("gpu1")
    membership.register({"name": "gpu7", "address": "127.0.0.1:9007", "models": ["qwen3-8b", "alpha"]})
    assert model["gpu7"].backend.models == ("qwen3-8b", "alpha")
    with pytest.raises(Refused, match="models: 'a b' is not allowed as a model name"):
        membership.register({"name": "gpu8", "address": "127.0.0.1:9008", "models": ["a b"]})
    assert "gpu8" not in model
