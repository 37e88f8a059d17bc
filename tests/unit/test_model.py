"""The fleet model (roles, status, drain, poll windows, one subscription) and the agent-check replies
built on it, without sockets."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from agentcheck.model import FleetModel, Member, Origin, PollWindow, Role
from agentcheck.policy import WeightFormula
from agentcheck.protocol import Request
from agentcheck.replies import AgentCheckReplies
from agentcheck.status import PENDING, BackendStatus, SlotSource, State
from fleet import Address, Backend

GPU1 = Backend("gpu1", Address("127.0.0.1", 8081))
GPU2 = Backend("gpu2", Address("127.0.0.1", 8082))
SPARE = Backend("spare", Address("127.0.0.1", 8083))
WINDOW = PollWindow(10.0, 10.2)


def ready(total: int, processing: int = 0) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=SlotSource.SLOTS)


def wired(*backends: Backend, standby: tuple[Backend, ...] = (),
          formula: WeightFormula = WeightFormula.IDLE) -> tuple[FleetModel, AgentCheckReplies]:
    model = FleetModel(backends, standby)
    replies = AgentCheckReplies(model, formula)
    model.subscribe(replies.on_member_change)
    return model, replies


# --- FleetModel -----------------------------------------------------------------------------


def test_members_start_pending_with_their_role() -> None:
    model = FleetModel([GPU1], [SPARE])

    assert [(m.name, m.role, m.status, m.drained, m.updated_at, m.poll) for m in model] == [
        ("gpu1", Role.PRIMARY, PENDING, False, None, None),
        ("spare", Role.STANDBY, PENDING, False, None, None),
    ]


def test_a_poll_result_replaces_the_member_and_old_views_stay_as_they_were() -> None:
    model = FleetModel([GPU1])
    before = model["gpu1"]

    model.record_poll("gpu1", ready(4, 1), now=123.0, window=WINDOW)

    assert before.status == PENDING  # views are immutable: a holder never sees it change under it
    after = model["gpu1"]
    assert (after.status, after.updated_at, after.poll) == (ready(4, 1), 123.0, WINDOW)
    assert after.poll is not None and after.poll.seconds == pytest.approx(0.2)
    assert after.usable


def test_every_change_reaches_each_subscriber_with_before_and_after() -> None:
    model = FleetModel([GPU1])
    seen: list[tuple[str, bool, bool]] = []

    def listener(previous: Member | None, current: Member | None) -> None:
        assert previous is not None and current is not None
        seen.append((current.name, previous.drained, current.drained))

    model.subscribe(listener)
    model.record_poll("gpu1", ready(2), now=1.0, window=WINDOW)
    model.set_drained("gpu1", True)

    assert seen == [("gpu1", False, False), ("gpu1", False, True)]
    assert not model["gpu1"].usable


def test_joining_leaving_and_removal_reach_subscribers_and_replies_follow() -> None:
    model, replies = wired(GPU1)
    seen: list[tuple[str | None, str | None]] = []
    model.subscribe(lambda previous, current: seen.append((previous and previous.name, current and current.name)))

    joined = model.add(GPU2, Origin.REGISTERED)
    assert (joined.origin, joined.status, joined.leaving) == (Origin.REGISTERED, PENDING, False)
    assert replies.reply_for("gpu2") == "down #awaiting first poll\n"
    model.record_poll("gpu2", ready(2), now=1.0, window=WINDOW)
    assert replies.reply_for("gpu2") == "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"

    model.set_leaving("gpu2", True, "deregistered")
    assert not model["gpu2"].usable
    assert replies.reply_for("gpu2") == "up drain maxconn:2 #leaving the fleet, idle=2 processing=0 via slots\n"

    model.remove("gpu2")
    assert replies.reply_for("gpu2") is None and "gpu2" not in model
    assert seen == [(None, "gpu2"), ("gpu2", "gpu2"), ("gpu2", "gpu2"), ("gpu2", None)]
    with pytest.raises(KeyError):
        model.add(GPU1, Origin.REGISTERED)


def test_draining_a_name_outside_the_fleet_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        FleetModel([GPU1]).set_drained("gpu9", True)


def test_a_state_that_does_not_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    model = FleetModel([GPU1])
    with caplog.at_level(logging.INFO, logger="paddler.agent"):
        for reason in ("connection refused", "connection refused", "no answer within 0.8s"):
            model.record_poll("gpu1", BackendStatus.down(State.UNREACHABLE, reason), now=1.0, window=WINDOW)

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
        "gpu1: pending -> unreachable (connection refused)"]


# --- AgentCheckReplies ----------------------------------------------------------------------


def test_reply_is_down_before_the_first_poll() -> None:
    _, replies = wired(GPU1)

    assert replies.reply_for("gpu1") == "down #awaiting first poll\n"


def test_reply_for_a_name_outside_the_fleet_is_none() -> None:
    _, replies = wired(GPU1)

    assert replies.reply_for("gpu9") is None


def test_a_poll_result_changes_the_cached_reply() -> None:
    model, replies = wired(GPU1)
    assert replies.reply_for("gpu1") == "down #awaiting first poll\n"  # now cached

    model.record_poll("gpu1", ready(4, 1), now=1.0, window=WINDOW)
    assert replies.reply_for("gpu1") == "up ready 75% maxconn:4 #idle=3 processing=1 via slots\n"

    model.record_poll("gpu1", ready(4, 3), now=2.0, window=WINDOW)
    assert replies.reply_for("gpu1") == "up ready 25% maxconn:4 #idle=1 processing=3 via slots\n"

    model.record_poll("gpu1", BackendStatus.down(State.LOADING, ""), now=3.0, window=WINDOW)
    assert replies.reply_for("gpu1") == "down #loading\n"


def test_drain_and_undrain_change_the_cached_reply() -> None:
    model, replies = wired(GPU1)
    model.record_poll("gpu1", ready(4), now=1.0, window=WINDOW)
    assert replies.reply_for("gpu1") == "up ready 100% maxconn:4 #idle=4 processing=0 via slots\n"

    model.set_drained("gpu1", True)
    assert replies.reply_for("gpu1") == \
        "up drain maxconn:4 #drained by operator, idle=4 processing=0 via slots\n"

    model.set_drained("gpu1", False)
    assert replies.reply_for("gpu1") == "up ready 100% maxconn:4 #idle=4 processing=0 via slots\n"


def test_with_capacity_weights_a_new_larger_backend_rescales_the_others() -> None:
    model, replies = wired(GPU1, GPU2, formula=WeightFormula.CAPACITY)
    model.record_poll("gpu1", ready(2), now=1.0, window=WINDOW)
    assert replies.reply_for("gpu1") == "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"

    model.record_poll("gpu2", ready(4), now=2.0, window=WINDOW)

    assert replies.reply_for("gpu1") == "up ready 50% maxconn:2 #idle=2 processing=0 via slots\n"
    assert replies.reply_for("gpu2") == "up ready 100% maxconn:4 #idle=4 processing=0 via slots\n"


def test_after_a_down_reply_ready_replies_say_0_percent_for_the_return_window() -> None:
    clock = [100.0]
    model = FleetModel([GPU1])
    replies = AgentCheckReplies(model, WeightFormula.IDLE, return_window=2.5, clock=lambda: clock[0])
    model.subscribe(replies.on_member_change)
    ask = Request(name="gpu1")
    model.record_poll("gpu1", ready(2), now=1.0, window=WINDOW)
    assert replies.answer(ask).startswith("up ready 100% ")  # no down before: no window

    model.record_poll("gpu1", BackendStatus.down(State.UNREACHABLE, "connection failed"), now=2.0, window=WINDOW)
    assert replies.answer(ask) == "down #unreachable: connection failed\n"
    clock[0] = 105.0  # the window starts at the first ready reply, however long it was down
    model.record_poll("gpu1", ready(2), now=3.0, window=WINDOW)
    returning = "up ready 0% maxconn:2 #back from down, weight follows, idle=2 processing=0 via slots\n"
    assert replies.answer(ask) == returning
    clock[0] = 107.4
    assert replies.answer(ask) == returning
    assert replies.reply_for("gpu1").startswith("up ready 100% ")  # the dashboard shows the weight to come
    clock[0] = 107.5
    assert replies.answer(ask).startswith("up ready 100% ")
    assert replies.served == {"ready": 4, "down": 1}


def test_a_server_restarted_between_two_ready_polls_comes_back_at_0_percent() -> None:
    clock = [100.0]
    model = FleetModel([GPU1])
    replies = AgentCheckReplies(model, WeightFormula.IDLE, return_window=2.5, clock=lambda: clock[0])
    model.subscribe(replies.on_member_change)
    ask = Request(name="gpu1")

    def poll(*tasks: int | None) -> None:
        model.record_poll("gpu1", replace(ready(2), slot_tasks=tasks), now=1.0, window=WINDOW)

    poll(None, None)
    poll(7, None)
    poll(7, 12)  # task ids grow: the same process
    assert replies.answer(ask).startswith("up ready 100% ")
    poll(None, None)  # slots that ran tasks show none: a new process, though no poll saw it down
    assert replies.answer(ask).startswith("up ready 0% maxconn:2 #back from down, weight follows")
    clock[0] = 102.5
    assert replies.answer(ask).startswith("up ready 100% ")
    poll(3, None)
    poll(2, None)  # an older task on the same slot: restarted again
    assert replies.answer(ask).startswith("up ready 0% ")


def test_a_spare_carrying_a_server_restarted_between_polls_says_0_percent_too() -> None:
    clock = [100.0]
    model = FleetModel([GPU1])
    replies = AgentCheckReplies(model, WeightFormula.IDLE, return_window=2.5, clock=lambda: clock[0])
    model.subscribe(replies.on_member_change)
    model.add(Backend("gpu7", Address("127.0.0.1", 8087)), Origin.REGISTERED)
    replies.set_spares({"paddler-spare-1": "gpu7"})
    spare = Request(name="paddler-spare-1")
    model.record_poll("gpu7", replace(ready(2), slot_tasks=(7, None)), now=1.0, window=WINDOW)
    assert replies.answer(spare).startswith("up 100% maxconn:2 ")
    model.record_poll("gpu7", replace(ready(2), slot_tasks=(None, None)), now=2.0, window=WINDOW)
    assert replies.answer(spare).startswith("up 0% maxconn:2 #back from down")
    clock[0] = 102.5
    assert replies.answer(spare).startswith("up 100% maxconn:2 ")


def test_an_empty_spare_forgets_the_down_of_the_member_it_carried() -> None:
    clock = [100.0]
    model = FleetModel([GPU1])
    replies = AgentCheckReplies(model, WeightFormula.IDLE, return_window=2.5, clock=lambda: clock[0])
    model.subscribe(replies.on_member_change)
    spare = Request(name="paddler-spare-1")
    model.add(Backend("gpu7", Address("127.0.0.1", 8087)), Origin.REGISTERED)
    replies.set_spares({"paddler-spare-1": "gpu7"})
    assert replies.answer(spare) == "down #awaiting first poll\n"  # HAProxy's spare is down (agent)
    replies.set_spares({})
    # `up 0%`: HAProxy's spare is up at weight 0 again, so the next member on it needs no 0% window.
    assert replies.answer(spare) == "up 0% #paddler-agent: empty spare server\n"
    model.add(Backend("gpu8", Address("127.0.0.1", 8088)), Origin.REGISTERED)
    model.record_poll("gpu8", ready(2), now=1.0, window=WINDOW)
    replies.set_spares({"paddler-spare-1": "gpu8"})
    assert replies.answer(spare).startswith("up 100% maxconn:2 ")


def test_a_drained_backend_back_from_down_stays_drained() -> None:
    model = FleetModel([GPU1])
    replies = AgentCheckReplies(model, WeightFormula.IDLE, return_window=2.5, clock=lambda: 0.0)
    model.subscribe(replies.on_member_change)
    assert replies.answer(Request(name="gpu1")) == "down #awaiting first poll\n"
    model.record_poll("gpu1", ready(2), now=1.0, window=WINDOW)
    model.set_drained("gpu1", True)

    assert replies.answer(Request(name="gpu1")).startswith("up drain maxconn:2 ")


def test_a_spare_server_is_answered_for_the_member_it_carries_without_admin_words() -> None:
    model, replies = wired(GPU1)
    gpu7 = Backend("gpu7", Address("127.0.0.1", 8087))
    model.add(gpu7, Origin.REGISTERED)
    model.record_poll("gpu7", ready(2), now=1.0, window=WINDOW)
    spare = Request(name="paddler-spare-3")
    # HAProxy applies `ready`/`drain` to a disabled spare too: only the spare pool sets a spare's admin state.
    assert replies.answer(spare) == "up 0% #paddler-agent: empty spare server\n"
    replies.set_spares({"paddler-spare-3": "gpu7"})
    assert replies.reply_for("gpu7") == "up ready 100% maxconn:2 #idle=2 processing=0 via slots\n"
    assert replies.answer(spare) == "up 100% maxconn:2 #idle=2 processing=0 via slots\n"
    model.set_leaving("gpu7", True, "deregistered")
    assert replies.answer(spare) == "up maxconn:2 #leaving the fleet, idle=2 processing=0 via slots\n"
    model.remove("gpu7")  # before the pool hears of it
    released = "up 0% #paddler-agent: spare server released, its sessions are ending\n"
    assert replies.answer(spare) == released
    replies.set_spares({"paddler-spare-3": None})
    assert replies.answer(spare) == released
    assert replies.served == {"spare": 3, "ready": 1, "drain": 1}


def test_a_spare_whose_member_was_down_comes_back_at_0_percent_like_any_server() -> None:
    clock = [100.0]
    model = FleetModel([GPU1])
    replies = AgentCheckReplies(model, WeightFormula.IDLE, return_window=2.5, clock=lambda: clock[0])
    model.subscribe(replies.on_member_change)
    model.add(Backend("gpu7", Address("127.0.0.1", 8087)), Origin.REGISTERED)
    replies.set_spares({"paddler-spare-1": "gpu7"})
    spare = Request(name="paddler-spare-1")
    assert replies.answer(spare) == "down #awaiting first poll\n"
    model.record_poll("gpu7", ready(2), now=1.0, window=WINDOW)
    assert replies.answer(spare).startswith("up 0% maxconn:2 #back from down")
    clock[0] = 102.5
    assert replies.answer(spare).startswith("up 100% maxconn:2 ")


@pytest.mark.parametrize(("backends", "request_", "reply", "kind"), [
    ((GPU1,), Request(), "up ready 100% maxconn:4 #idle=4 processing=0 via slots\n", "ready"),
    ((GPU1, GPU2), Request(), "down #paddler-agent: agent-send must name a backend (this agent watches several)\n",
     "invalid"),
    ((GPU1, GPU2), Request(name="gpu1"), "up ready 100% maxconn:4 #idle=4 processing=0 via slots\n", "ready"),
    ((GPU1, GPU2), Request(name="gpu2"), "down #awaiting first poll\n", "down"),
    ((GPU1,), Request(name="gpu9"), "down #paddler-agent: unknown backend 'gpu9', check agent-send\n", "unknown"),
    ((GPU1,), Request(problem="agent-send is not ASCII text"), "down #paddler-agent: agent-send is not ASCII text\n",
     "invalid"),
])
def test_answers_and_their_counts(backends: tuple[Backend, ...], request_: Request, reply: str, kind: str) -> None:
    model, replies = wired(*backends)
    model.record_poll("gpu1", ready(4), now=1.0, window=WINDOW)

    assert replies.answer(request_) == reply
    assert replies.served == {kind: 1}
