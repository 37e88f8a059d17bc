"""agentcheck.policy: the exact agent-check line HAProxy receives for every status."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcheck.policy import (
    WeightFormula,
    agent_reply,
    invalid_request_reply,
    speed_class,
    unknown_backend_reply,
    weight_percent,
)
from agentcheck.status import PENDING, BackendStatus, SlotSource, State

# Words HAProxy acts on in an agent reply (src/tcpcheck.c, tcpcheck_agent_expect_reply).
HAPROXY_STATE_WORDS = {"up", "down", "stopped", "fail", "ready", "drain", "maint"}


def haproxy_parse(reply: str) -> tuple[list[str], str]:
    """Split a reply the way HAProxy does: cut at the first CR/LF, words split on space, tab
    or comma, and a word starting with '#' begins the description (never parsed for words)."""
    line = re.split(r"[\r\n]", reply, maxsplit=1)[0]
    words: list[str] = []
    index = 0
    while index < len(line):
        char = line[index]
        if char in " \t,":
            index += 1
            continue
        if char == "#":
            return words, line[index + 1:].lstrip(" \t")
        end = index + 1
        while end < len(line) and line[end] not in " \t,":
            end += 1
        words.append(line[index:end])
        index = end + 1
    return words, ""


def ready(total: int, processing: int = 0, source: SlotSource = SlotSource.SLOTS,
          sleeping: bool = False) -> BackendStatus:
    return BackendStatus(State.READY, slots_total=total, slots_processing=processing, slot_source=source,
                         sleeping=sleeping)


def assert_single_line(reply: str) -> None:
    assert reply.endswith("\n")
    assert reply.count("\n") == 1
    assert "\r" not in reply


# --- exact lines ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "fleet_max", "line"),
    [
        pytest.param(ready(4, 1, SlotSource.SLOTS), 4,
                     "up ready 75% maxconn:4 #idle=3 processing=1 via slots\n", id="ready-slots"),
        pytest.param(ready(4, 1, SlotSource.LEGACY_HEALTH), 4,
                     "up ready 75% maxconn:4 #idle=3 processing=1 via health\n", id="ready-legacy-health"),
        pytest.param(ready(2, 2, SlotSource.METRICS), 4,
                     "up ready 1% maxconn:2 #idle=0 processing=2 via metrics\n", id="ready-metrics"),
        pytest.param(ready(4, 0, SlotSource.CONFIGURED), 4,
                     "up ready 100% maxconn:4 #idle=4 processing=0 via configured\n", id="ready-configured"),
        pytest.param(ready(4, 0, SlotSource.SLOTS, sleeping=True), 4,
                     "up ready 100% maxconn:4 #idle=4 processing=0 via slots sleeping\n", id="ready-sleeping"),
        pytest.param(ready(2, 5, SlotSource.METRICS), 2,
                     "up ready 1% maxconn:2 #idle=0 processing=5 via metrics\n", id="ready-overcommitted"),
        pytest.param(PENDING, 0, "down #awaiting first poll\n", id="pending"),
        pytest.param(BackendStatus.down(State.LOADING, ""), 4, "down #loading\n", id="loading"),
        pytest.param(BackendStatus.down(State.UNREACHABLE, "connection failed (Connection refused)"), 4,
                     "down #unreachable: connection failed (Connection refused)\n", id="unreachable"),
        pytest.param(BackendStatus.down(State.UNREACHABLE, "no answer within 0.8s"), 4,
                     "down #unreachable: no answer within 0.8s\n", id="unreachable-timeout"),
        pytest.param(BackendStatus.down(State.UNAUTHORIZED, "GET /slots answered HTTP 401"), 4,
                     "down #unauthorized: GET /slots answered HTTP 401\n", id="unauthorized"),
        pytest.param(BackendStatus.down(State.ERROR, "GET /slots: body is not valid JSON"), 4,
                     "down #error: GET /slots: body is not valid JSON\n", id="error"),
        pytest.param(BackendStatus.down(State.ERROR, ""), 4, "down #error\n", id="error-without-reason"),
    ],
)
def test_reply_line_for_each_state(status: BackendStatus, fleet_max: int, line: str) -> None:
    reply = agent_reply(status, fleet_max)

    assert reply == line
    assert_single_line(reply)


@pytest.mark.parametrize("source", list(SlotSource))
def test_ready_reply_is_parsed_by_haproxy_as_up_ready_weight_and_maxconn(source: SlotSource) -> None:
    words, description = haproxy_parse(agent_reply(ready(2, 1, source), 4))

    assert words == ["up", "ready", "50%", "maxconn:2"]
    assert description == f"idle=1 processing=1 via {source.value}"


@pytest.mark.parametrize("state", [s for s in State if s is not State.READY])
def test_every_non_ready_state_is_parsed_by_haproxy_as_down_only(state: State) -> None:
    words, _ = haproxy_parse(agent_reply(BackendStatus.down(state, "some reason"), 4))

    assert words == ["down"]


def test_a_returning_backend_is_up_at_0_percent_with_its_maxconn() -> None:
    # HAProxy applies the weight before up: a server it brings UP at 0% takes nothing from the queue.
    reply = agent_reply(ready(2, 0), 4, returning=True)

    assert haproxy_parse(reply)[0] == ["up", "ready", "0%", "maxconn:2"]
    assert reply == "up ready 0% maxconn:2 #back from down, weight follows, idle=2 processing=0 via slots\n"


def test_returning_changes_neither_a_drained_nor_a_down_reply() -> None:
    assert agent_reply(ready(2), 4, drained=True, returning=True) == agent_reply(ready(2), 4, drained=True)
    down = BackendStatus.down(State.UNREACHABLE, "connection failed")
    assert agent_reply(down, 4, returning=True) == agent_reply(down, 4)


def test_loading_is_exactly_down_loading() -> None:
    assert agent_reply(BackendStatus.down(State.LOADING, ""), 4) == "down #loading\n"


def test_long_reason_is_truncated_in_the_comment() -> None:
    reply = agent_reply(BackendStatus.down(State.ERROR, "x" * 1000), 4)

    assert reply == "down #error: " + "x" * 153 + "\n"  # the comment is cut at 160 characters
    assert len(reply) == len("down #") + 160 + len("\n")


# --- weights and maxconn --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "fleet_max", "percent"),
    [
        (2, 4, 50),
        (4, 4, 100),
        (3, 4, 75),
        (1, 3, 33),
        (1, 1000, 1),  # rounds to 0: never below 1
        (1, 201, 1),
        (8, 4, 100),  # larger than the recorded maximum: capped
    ],
)
def test_capacity_weight_is_relative_to_the_largest_backend(slots: int, fleet_max: int, percent: int) -> None:
    assert weight_percent(ready(slots), fleet_max, WeightFormula.CAPACITY) == percent


@pytest.mark.parametrize(
    ("status", "fleet_max"),
    [(BackendStatus.down(State.ERROR, "x"), 4), (PENDING, 4)],
    ids=["not-ready", "pending"],
)
def test_weight_percent_of_unusable_backend_is_the_minimum_not_0(status: BackendStatus, fleet_max: int) -> None:
    assert weight_percent(status, fleet_max) == 1


@pytest.mark.parametrize("fleet_max", [0, -1])
def test_backend_larger_than_any_recorded_counts_as_the_largest(fleet_max: int) -> None:
    assert weight_percent(ready(4), fleet_max, WeightFormula.CAPACITY) == 100


@pytest.mark.parametrize(
    ("formula", "slots", "processing", "percent"),
    [
        (WeightFormula.EQUAL, 2, 2, 100),
        (WeightFormula.EQUAL, 4, 0, 100),
        (WeightFormula.IDLE, 4, 1, 75),
        (WeightFormula.IDLE, 4, 4, 1),  # all busy: still never 0, HAProxy's queue holds the excess
        (WeightFormula.IDLE, 2, 0, 100),
        (WeightFormula.CAPACITY, 2, 2, 50),
    ],
)
def test_each_weight_formula(formula: WeightFormula, slots: int, processing: int, percent: int) -> None:
    assert weight_percent(ready(slots, processing), 4, formula) == percent


@settings(database=None, derandomize=True, max_examples=300)
@given(
    total=st.integers(min_value=1, max_value=10_000),
    processing=st.integers(min_value=0, max_value=20_000),
    fleet_max=st.integers(min_value=-1, max_value=20_000),
    source=st.sampled_from(list(SlotSource)),
    sleeping=st.booleans(),
)
def test_ready_reply_weight_is_1_to_100_and_maxconn_is_never_0(
    total: int, processing: int, fleet_max: int, source: SlotSource, sleeping: bool
) -> None:
    reply = agent_reply(ready(total, processing, source, sleeping), fleet_max)

    assert_single_line(reply)
    words, _ = haproxy_parse(reply)
    assert words[:2] == ["up", "ready"]
    weight = int(words[2].rstrip("%"))
    assert 1 <= weight <= 100
    assert words[3] == f"maxconn:{total}"
    assert words[3] != "maxconn:0"


def test_ready_status_with_zero_slots_never_sends_maxconn_0() -> None:
    # maxconn:0 means "unlimited" to HAProxy; the module promises it is never sent.
    reply = agent_reply(ready(0), 4)

    assert "maxconn:0" not in reply


# --- hostile text never escapes the comment -------------------------------------------------

hostile_text = st.one_of(
    st.text(),
    st.sampled_from([
        "up",
        "up ready 100% maxconn:1000",
        "\nup ready 100%",
        "x\r\nup",
        "# up",
        "ok, up, ready, 100%, maxconn:999",
        "\tup\tdrain",
        "düsseldorf \u2028 up \u0085 ready",
        "\x00up",
    ]),
    st.lists(st.sampled_from(["up", "down", "ready", "drain", "maint", "100%", "maxconn:9", "#", ",", " ", "\n",
                              "\r", "\t", "é", "\u2028"]), max_size=12).map("".join),
)


@settings(database=None, derandomize=True, max_examples=500)
@given(state=st.sampled_from([s for s in State if s is not State.READY]), reason=hostile_text)
def test_reason_text_never_adds_lines_or_haproxy_words(state: State, reason: str) -> None:
    reply = agent_reply(BackendStatus.down(state, reason), 4)

    assert_single_line(reply)
    assert reply.isascii()
    assert reply.count("#") == 1
    words, _ = haproxy_parse(reply)
    assert words == ["down"]


@settings(database=None, derandomize=True, max_examples=300)
@given(text=hostile_text)
def test_unknown_backend_and_invalid_request_replies_stay_down_and_single_line(text: str) -> None:
    for reply in (unknown_backend_reply(text), invalid_request_reply(text)):
        assert_single_line(reply)
        assert reply.isascii()
        assert reply.startswith("down #")
        assert reply.count("#") == 1
        words, _ = haproxy_parse(reply)
        assert words == ["down"]


def test_unknown_backend_reply_names_the_backend() -> None:
    assert unknown_backend_reply("gpu9") == "down #paddler-agent: unknown backend 'gpu9', check agent-send\n"


def test_invalid_request_reply_states_the_problem() -> None:
    assert invalid_request_reply("agent-send is not ASCII text") == \
        "down #paddler-agent: agent-send is not ASCII text\n"


def test_a_router_with_no_model_loaded_takes_one_request_to_load_one() -> None:
    idle_router = BackendStatus(State.READY, slots_total=0, slot_source=SlotSource.SLOTS, router=True)
    assert agent_reply(idle_router, 4) == "up ready 1% maxconn:1 #router, no model loaded: a request loads one\n"
    assert agent_reply(idle_router, 4, returning=True).startswith("up ready 0% maxconn:1 ")
    assert agent_reply(idle_router, 4, drained=True) == (
        "up drain maxconn:1 #drained by operator, router with no model loaded\n")


@pytest.mark.parametrize(("seconds", "fastest", "expected"), [
    (0.010, 0.010, 0), (0.012, 0.010, 0), (0.0124, 0.010, 0), (0.0126, 0.010, 1), (0.016, 0.010, 2),
    (0.030, 0.010, 4), (0.008, 0.010, 0), (None, 0.010, 0), (0.010, None, 0),
])
def test_speed_classes_group_servers_within_a_quarter_of_each_other(
        seconds: float | None, fastest: float | None, expected: int) -> None:
    assert speed_class(seconds, fastest) == expected
