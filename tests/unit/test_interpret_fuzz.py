"""Fuzzing ``llamacpp.interpret``: whatever a backend answers on any endpoint, a status with a reason.

The properties (the hardening issue's): ``interpret`` never raises; a ready status has
``0 <= processing <= total`` and ``1 <= total <= MAX_SLOTS``; any other status has a
non-empty printable reason (``loading`` excepted: its documented reply is ``down #loading``,
the state is the reason); and the agent-check line made from it is one line of the policy's
vocabulary whose ``maxconn`` HAProxy can take.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcheck.llamacpp import MAX_SLOTS, Failure, Outcome, Reply, interpret
from agentcheck.policy import agent_reply
from agentcheck.status import BackendStatus, SlotSource, State

REPLY_LINE = re.compile(r"(up |down #)[\x20-\x7e]*\n")
MAXCONN = re.compile(r"maxconn:(\d+) ")
MAX_REASON_LENGTH = 300

HEALTH_OK = Reply(200, b'{"status":"ok"}')
SLOTS_DISABLED = Reply(501, b'{"error":{"code":501,"message":"This server does not support slots endpoint."}}')
PROPS_4_SLOTS = Reply(200, b'{"total_slots":4,"model_path":"/models/tiny.gguf"}')


def check(status: BackendStatus) -> None:
    """The properties every status from ``interpret`` has, and the reply line made from it."""
    assert isinstance(status, BackendStatus)
    assert status.state in set(State)
    if status.state is State.READY:
        assert 1 <= status.slots_total <= MAX_SLOTS
        assert 0 <= status.slots_processing <= status.slots_total
        assert status.slot_source in set(SlotSource)
        assert status.reason == ""
    else:
        assert status.slots_total == 0
        if status.state is State.LOADING:
            assert status.reason == ""
        else:
            assert status.reason != ""
        assert status.reason.isprintable()
        assert len(status.reason) <= MAX_REASON_LENGTH
    reply = agent_reply(status, 8)
    assert REPLY_LINE.fullmatch(reply), reply
    maxconn = MAXCONN.search(reply)
    assert (maxconn is not None) is (status.state is State.READY)
    if maxconn is not None:
        assert 1 <= int(maxconn.group(1)) <= MAX_SLOTS


# --- strategies -------------------------------------------------------------------------------

odd_numbers = st.one_of(
    st.integers(-3, 8),
    st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, MAX_SLOTS, MAX_SLOTS + 1, 10**4000]),
    st.integers(),
    st.floats(),  # NaN and infinities included: json.dumps writes them as NaN/Infinity tokens
    st.booleans(),
    st.none(),
    st.sampled_from(["4", "NaN", "Infinity", "", "0x10", "1e30"]),
    st.text(max_size=8),
)
keys = st.sampled_from(["status", "slots_idle", "slots_processing", "is_processing", "state", "id", "n_ctx",
                        "total_slots", "model_path", "model_alias", "is_sleeping", "error", "x", ""])
json_values = st.recursive(
    odd_numbers,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=25,
)
slot_objects = st.fixed_dictionaries(
    {"id": odd_numbers},
    optional={"is_processing": odd_numbers, "state": odd_numbers, "n_ctx": odd_numbers},
)
health_objects = st.fixed_dictionaries(
    {}, optional={"status": st.text(max_size=2000) | odd_numbers, "slots_idle": odd_numbers,
                  "slots_processing": odd_numbers, "requests_buffered": odd_numbers})
props_objects = st.fixed_dictionaries(
    {}, optional={"total_slots": odd_numbers, "model_path": odd_numbers | st.text(max_size=300),
                  "model_alias": odd_numbers, "is_sleeping": odd_numbers})


def many_idle_slots(count: int) -> bytes:
    return json.dumps([{"id": index, "is_processing": False} for index in range(count)]).encode()


def nested(depth: int, balanced: bool) -> bytes:
    return b"[" * depth + (b"]" * depth if balanced else b"")


metric_values = st.one_of(
    st.sampled_from(["3", "0", "-5", "1e30", "-1e30", "1e308", "NaN", "+Inf", "-Inf", "3.7", "0x10", "1_000",
                     "", "abc", "9" * 400, "4 1700000000000", "4 notatimestamp"]),
    st.floats().map(repr),
    st.integers().map(str),
)
metric_lines = st.one_of(
    st.tuples(st.sampled_from(["llamacpp:requests_processing", 'llamacpp:requests_processing{slot="0"}',
                               "llamacpp:requests_deferred", "llamacpp:requests_processing{", "x"]),
              metric_values).map(" ".join),
    st.sampled_from(["# TYPE llamacpp:requests_processing gauge", "# TYPE llamacpp:requests_processing counter",
                     "# HELP llamacpp:requests_processing busy", "# TYPE x", "#", ""]),
    st.text(max_size=20),
)
metrics_texts = st.lists(metric_lines, max_size=6).map(
    lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))

HTML = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
        b"<body><h1>502 Bad Gateway</h1><hr><center>nginx</center></body></html>")

bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.lists(slot_objects | json_values, max_size=6).map(lambda value: json.dumps(value).encode()),
    health_objects.map(lambda value: json.dumps(value).encode()),
    props_objects.map(lambda value: json.dumps(value).encode()),
    st.integers(0, 3000).map(many_idle_slots),
    st.builds(nested, st.integers(1, 3000), st.booleans()),
    metrics_texts,
    st.sampled_from([HTML, b"", b"null", b"{}", b"[]", b"NaN", b"-Infinity", b"\xef\xbb\xbf[]", b"[{}]" * 3]),
)
http_statuses = st.one_of(st.just(200), st.sampled_from([200, 401, 403, 404, 500, 501, 503]),
                          st.integers(0, 999))
failures = st.builds(Failure, st.one_of(
    st.sampled_from(["connection failed (Connection refused)", "no answer within 10s",
                     "connection closed mid-response", "response larger than 4194304 bytes",
                     "invalid HTTP response (bad status line)"]),
    st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=100),
))
outcomes: st.SearchStrategy[Outcome] = st.one_of(st.builds(Reply, http_statuses, bodies), failures)
configured = st.one_of(st.none(), st.integers(1, 64), st.sampled_from([MAX_SLOTS, MAX_SLOTS + 1, 10**30]))


# --- properties -------------------------------------------------------------------------------


@settings(database=None, derandomize=True, max_examples=2000, deadline=None)
@given(health=st.none() | outcomes, slots=outcomes, props=st.none() | outcomes, metrics=st.none() | outcomes,
       configured_slots=configured)
def test_any_answers_on_any_endpoint_give_a_sound_status(
    health: Outcome | None, slots: Outcome, props: Outcome | None, metrics: Outcome | None,
    configured_slots: int | None,
) -> None:
    check(interpret(health, slots, props, metrics, configured_slots))


@settings(database=None, derandomize=True, max_examples=500, deadline=None)
@given(health=st.builds(Reply, st.just(200), health_objects.map(lambda value: json.dumps(value).encode())),
       slots=st.builds(Reply, st.sampled_from([401, 403, 404, 501]), bodies),
       props=st.none() | st.builds(Reply, st.just(200), props_objects.map(lambda value: json.dumps(value).encode())),
       metrics=st.none() | st.builds(Reply, st.just(200), metrics_texts),
       configured_slots=configured)
def test_fallbacks_after_slots_is_refused_give_a_sound_status(
    health: Reply, slots: Reply, props: Reply | None, metrics: Reply | None, configured_slots: int | None,
) -> None:
    # The generic property seldom reaches /health's slot counts, /props and /metrics; this one always does.
    check(interpret(health, slots, props, metrics, configured_slots))


@settings(database=None, derandomize=True, max_examples=300, deadline=None)
@given(body=st.one_of(st.lists(slot_objects, max_size=8).map(lambda value: json.dumps(value).encode()), bodies),
       configured_slots=configured)
def test_any_slots_body_gives_a_sound_status(body: bytes, configured_slots: int | None) -> None:
    check(interpret(HEALTH_OK, Reply(200, body), PROPS_4_SLOTS, None, configured_slots))


# --- what the fuzzing found: literal regressions ----------------------------------------------

TOO_MANY = "slots: at most 1024 are supported"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        pytest.param((Reply(200, b'{"status":"ok","slots_idle":1000000000000000000000000000000,"slots_processing":0}'),
                      Reply(404, b"")), f"over 1000000 {TOO_MANY}", id="legacy-health-10**30-idle"),
        pytest.param((HEALTH_OK, SLOTS_DISABLED, Reply(200, b'{"total_slots":1000000000000000000000000000000}')),
                     f"over 1000000 {TOO_MANY}", id="props-10**30-total"),
        pytest.param((HEALTH_OK, Reply(200, many_idle_slots(1025))), f"1025 {TOO_MANY}", id="slots-list-1025"),
        pytest.param((HEALTH_OK, Reply(200, many_idle_slots(2)), None, None, 10**30), f"over 1000000 {TOO_MANY}",
                     id="configured-10**30"),
        pytest.param((Reply(503, b'{"status":"' + b"x" * 5000 + b'"}'), Reply(503, b"")),
                     "downstream balancer reports '" + "x" * 60 + "...'", id="downstream-status-5000-chars"),
    ],
)
def test_absurd_answers_are_errors_with_a_short_reason(args: tuple[Any, ...], reason: str) -> None:
    status = interpret(*args)

    assert status == BackendStatus(State.ERROR, reason)


def test_legacy_health_whose_counts_overflow_str_does_not_break_the_reply_line() -> None:
    # Two 4,300-digit counts add up to more digits than str() converts: the reply used to raise.
    count = b"9" * 4300
    status = interpret(Reply(200, b'{"slots_idle":' + count + b',"slots_processing":' + count + b"}"),
                       Reply(404, b""))

    assert status == BackendStatus(State.ERROR, f"over 1000000 {TOO_MANY}")
    assert agent_reply(status, 4) == "down #error: over 1000000 slots: at most 1024 are supported\n"


def test_exactly_max_slots_is_ready() -> None:
    status = interpret(HEALTH_OK, Reply(200, many_idle_slots(MAX_SLOTS)))

    assert (status.state, status.slots_total, status.slots_processing) == (State.READY, 1024, 0)


def test_metrics_reporting_more_busy_requests_than_slots_counts_every_slot_busy() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, Reply(200, b"llamacpp:requests_processing 1e30\n"))

    assert status == BackendStatus(State.READY, slots_total=4, slots_processing=4, slot_source=SlotSource.METRICS,
                                   model="/models/tiny.gguf")
