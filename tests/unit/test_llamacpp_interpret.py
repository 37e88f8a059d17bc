"""agentcheck.llamacpp.interpret: raw endpoint answers → BackendStatus, without sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcheck.llamacpp import Failure, Reply, interpret
from agentcheck.status import BackendStatus, SlotSource, State


def ok(data: Any) -> Reply:
    return Reply(200, json.dumps(data).encode())


def slots(*busy: bool) -> Reply:
    """Current /slots format: one object per slot with is_processing."""
    return ok([{"id": index, "n_ctx": 4096, "is_processing": flag} for index, flag in enumerate(busy)])


HEALTH_OK = ok({"status": "ok"})
NOT_FOUND = Reply(404, b'{"error":{"code":404,"message":"File Not Found"}}')
SLOTS_DISABLED = Reply(501, b'{"error":{"code":501,"message":"This server does not support slots endpoint.",'
                            b'"type":"not_supported_error"}}')
METRICS_DISABLED = Reply(501, b'{"error":{"code":501,"message":"This server does not support metrics endpoint."}}')
PROPS_4_SLOTS = ok({"total_slots": 4, "model_path": "/models/tiny.gguf"})

METRICS_TEXT = b"""\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 120
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""


# --- /slots available ---------------------------------------------------------------------


def test_ready_from_current_slots_format_counts_busy_slots() -> None:
    status = interpret(HEALTH_OK, slots(True, False, True, False))

    assert status == BackendStatus(State.READY, slots_total=4, slots_processing=2, slot_source=SlotSource.SLOTS)
    assert status.slots_idle == 2


def test_ready_from_old_slot_format_with_numeric_state() -> None:
    old_format = ok([{"id": 0, "state": 1}, {"id": 1, "state": 0}, {"id": 2, "state": 0}])

    status = interpret(HEALTH_OK, old_format)

    assert status.state is State.READY
    assert (status.slots_total, status.slots_processing) == (3, 1)
    assert status.slot_source is SlotSource.SLOTS


def test_each_slots_last_task_id_is_read_and_a_missing_or_odd_one_is_none() -> None:
    body = [{"id": 0, "is_processing": True, "id_task": 41}, {"id": 1, "is_processing": False},
            {"id": 2, "is_processing": False, "id_task": -1}, {"id": 3, "is_processing": False, "id_task": "7"},
            {"id": 4, "is_processing": False, "id_task": True}]
    status = interpret(HEALTH_OK, ok(body))

    assert (status.state, status.slots_processing, status.slot_tasks) == (State.READY, 1, (41, None, None, None, None))
    assert status == BackendStatus(State.READY, slots_total=5, slots_processing=1, slot_source=SlotSource.SLOTS)


def test_configured_slots_override_the_count_from_slots() -> None:
    status = interpret(HEALTH_OK, slots(False, False, False, True), configured_slots=2)

    assert status.state is State.READY
    assert status.slots_total == 2
    assert status.slots_processing == 1
    assert status.slot_source is SlotSource.SLOTS


def test_props_is_sleeping_is_reported_on_a_ready_backend() -> None:
    status = interpret(HEALTH_OK, slots(False), ok({"total_slots": 1, "is_sleeping": True}))

    assert status.state is State.READY
    assert status.sleeping is True


def test_props_model_path_is_reported_as_model() -> None:
    status = interpret(HEALTH_OK, slots(False), ok({"model_path": "/models/qwen.gguf", "total_slots": 1}))

    assert status.model == "/models/qwen.gguf"
    assert status.sleeping is False


def test_props_model_alias_wins_over_model_path() -> None:
    status = interpret(HEALTH_OK, slots(False), ok({"model_alias": "qwen", "model_path": "/models/qwen.gguf"}))

    assert status.model == "qwen"


@pytest.mark.parametrize(
    "props",
    [None, Failure("connection closed mid-response"), NOT_FOUND, Reply(200, b"not json"), ok([1, 2]),
     Reply(500, b"<html><body><h1>Internal Server Error</h1></body></html>"), Reply(200, b"<html>It works!</html>")],
    ids=["absent", "failure", "404", "not-json", "not-an-object", "500-html", "html"],
)
def test_unusable_props_do_not_stop_a_ready_verdict(props: Any) -> None:
    status = interpret(HEALTH_OK, slots(True, False), props)

    assert status.state is State.READY
    assert status.model is None
    assert status.sleeping is False


# --- /slots unusable ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots_reply", "reason_part"),
    [
        pytest.param(Reply(200, b"[{'id': 0,"), "JSON", id="malformed-json"),
        pytest.param(ok({"slots": []}), "expected a JSON list of slots", id="not-a-list"),
        pytest.param(ok([]), "no slots", id="empty-list"),
        pytest.param(ok([{"id": 0, "n_ctx": 4096}]), "slot 0 has no boolean is_processing", id="missing-is-processing"),
        pytest.param(ok([{"id": 0, "is_processing": "yes"}]), "slot 0 has no boolean is_processing",
                     id="non-bool-is-processing"),
        pytest.param(ok([{"id": 0, "state": True}]), "slot 0 has no boolean is_processing", id="bool-state"),
        pytest.param(ok([{"id": 0, "is_processing": False}, 7]), "slot 1 is not a JSON object", id="slot-not-object"),
    ],
)
def test_unusable_slots_body_is_an_error(slots_reply: Reply, reason_part: str) -> None:
    status = interpret(HEALTH_OK, slots_reply)

    assert status.state is State.ERROR
    assert status.reason.startswith("GET /slots: ")
    assert reason_part in status.reason


def test_slot_fields_the_agent_does_not_read_cannot_make_a_backend_unusable() -> None:
    """Only is_processing counts: string ids and a negative n_ctx around it change nothing."""
    odd = ok([{"id": "a", "n_ctx": -4096, "is_processing": True}, {"id": "b", "n_ctx": -1, "is_processing": False}])

    status = interpret(HEALTH_OK, odd)

    assert status == BackendStatus(State.READY, slots_total=2, slots_processing=1, slot_source=SlotSource.SLOTS)


def test_slots_failure_is_unreachable_with_the_failure_reason() -> None:
    status = interpret(HEALTH_OK, Failure("connection closed mid-response"))

    assert status == BackendStatus(State.UNREACHABLE, "GET /slots: connection closed mid-response")


def test_unexpected_slots_status_is_an_error() -> None:
    status = interpret(HEALTH_OK, Reply(500, b"boom"))

    assert status == BackendStatus(State.ERROR, "GET /slots answered HTTP 500")


# --- legacy /health with slot counts (old llama.cpp, Paddler-style balancers) ---------------


@pytest.mark.parametrize("slots_status", [404, 403, 501])
def test_legacy_health_slot_counts_are_used_when_slots_is_refused(slots_status: int) -> None:
    health = ok({"status": "ok", "slots_idle": 3, "slots_processing": 1})

    status = interpret(health, Reply(slots_status, b""))

    assert status == BackendStatus(
        State.READY, slots_total=4, slots_processing=1, slot_source=SlotSource.LEGACY_HEALTH
    )


def test_legacy_health_with_zero_slots_is_an_error() -> None:
    health = ok({"status": "ok", "slots_idle": 0, "slots_processing": 0})

    status = interpret(health, NOT_FOUND)

    assert status.state is State.ERROR


def test_slots_200_wins_over_legacy_health_counts() -> None:
    health = ok({"status": "ok", "slots_idle": 9, "slots_processing": 9})

    status = interpret(health, slots(True, False))

    assert (status.slots_total, status.slot_source) == (2, SlotSource.SLOTS)


# --- /health ------------------------------------------------------------------------------


def test_health_503_means_the_model_is_loading() -> None:
    status = interpret(Reply(503, b'{"error":{"code":503,"message":"Loading model"}}'), Reply(503, b""))

    assert status == BackendStatus(State.LOADING, "")


def test_health_failure_is_unreachable_with_the_failure_reason() -> None:
    refused = Failure("connection failed (Connection refused)")
    status = interpret(refused, refused)

    assert status == BackendStatus(State.UNREACHABLE, "connection failed (Connection refused)")


@pytest.mark.parametrize("code", [401, 403])
def test_health_refusing_the_key_is_unauthorized(code: int) -> None:
    status = interpret(Reply(code, b""), Reply(code, b""))

    assert status == BackendStatus(State.UNAUTHORIZED, f"GET /health answered HTTP {code}")


@pytest.mark.parametrize("code", [401, 403])
def test_slots_refusing_the_key_is_unauthorized(code: int) -> None:
    # llama-server leaves /health public but protects /slots with --api-key.
    status = interpret(HEALTH_OK, Reply(code, b'{"error":{"code":401,"message":"Invalid API Key"}}'))

    assert status == BackendStatus(State.UNAUTHORIZED, f"GET /slots answered HTTP {code}")


@pytest.mark.parametrize(
    ("health", "reason"),
    [
        (Reply(500, b""), "GET /health answered HTTP 500"),
        (Reply(302, b""), "GET /health answered HTTP 302"),
        (Reply(200, b"OK"), "GET /health: body is not a JSON object"),
        (ok(["ok"]), "GET /health: body is not a JSON object"),
    ],
)
def test_health_that_is_not_llama_cpp_is_an_error(health: Reply, reason: str) -> None:
    status = interpret(health, slots(False))

    assert status == BackendStatus(State.ERROR, reason)


# --- /slots disabled (--no-slots): /metrics, then configured counts -------------------------


def test_metrics_requests_processing_is_used_when_slots_is_disabled() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, Reply(200, METRICS_TEXT))

    assert status.state is State.READY
    assert status.slot_source is SlotSource.METRICS
    assert (status.slots_total, status.slots_processing) == (4, 3)


def test_bare_metrics_line_without_help_or_type_is_understood() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, Reply(200, b"llamacpp:requests_processing 3\n"))

    assert (status.state, status.slot_source, status.slots_processing) == (State.READY, SlotSource.METRICS, 3)


def test_props_total_slots_is_used_when_slots_and_metrics_are_disabled() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, METRICS_DISABLED)

    assert status == BackendStatus(
        State.READY, slots_total=4, slots_processing=0, slot_source=SlotSource.CONFIGURED,
        model="/models/tiny.gguf",
    )


def test_configured_slots_are_used_when_slots_metrics_and_props_say_nothing() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, NOT_FOUND, METRICS_DISABLED, configured_slots=6)

    assert (status.state, status.slot_source, status.slots_total) == (State.READY, SlotSource.CONFIGURED, 6)


def test_configured_slots_beat_props_total_slots() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, METRICS_DISABLED, configured_slots=2)

    assert status.slots_total == 2


def test_slots_disabled_and_no_known_slot_count_is_an_error() -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, NOT_FOUND, METRICS_DISABLED)

    assert status.state is State.ERROR
    assert "slot count is unknown" in status.reason


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html><body>nginx</body></html>", id="html"),
        pytest.param(b"llamacpp:requests_processing three\n", id="non-numeric-value"),
        pytest.param(b"# TYPE other gauge\nother 1\n", id="metric-missing"),
        pytest.param(b"\xff\xfe\xfd", id="not-utf8"),
    ],
)
def test_garbage_metrics_is_an_error(body: bytes) -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, Reply(200, body))

    assert status.state is State.ERROR
    assert status.reason.startswith("GET /metrics: ")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"llamacpp:requests_processing NaN\n", id="nan-value"),
        pytest.param(b"llamacpp:requests_processing +Inf\n", id="infinite-value"),
        pytest.param(b'{,\t="}', id="text-that-crashes-the-prometheus-parser"),
    ],
)
def test_metrics_that_break_the_parser_or_int_conversion_is_an_error_not_an_exception(body: bytes) -> None:
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, Reply(200, body))

    assert status.state is State.ERROR


@pytest.mark.parametrize("endpoint", ["health", "slots"])
def test_deeply_nested_json_is_an_error_not_an_exception(endpoint: str) -> None:
    nested = Reply(200, b"[" * 100_000)
    health, slots_reply = (nested, slots(False)) if endpoint == "health" else (HEALTH_OK, nested)

    status = interpret(health, slots_reply)

    assert status.state is State.ERROR


# --- interpret never raises -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(
        st.sampled_from(["status", "slots_idle", "slots_processing", "is_processing", "state", "id",
                         "total_slots", "model_path", "model_alias", "is_sleeping", "x"]),
        children,
        max_size=6,
    ),
    max_leaves=20,
)
metrics_texts = st.lists(
    st.tuples(
        st.sampled_from(["llamacpp:requests_processing", "llamacpp:requests_deferred", "# TYPE", "# HELP", "x{", ""]),
        st.one_of(st.floats().map(repr), st.sampled_from(["NaN", "+Inf", "-Inf", "gauge", "3"]), st.text(max_size=8)),
    ).map(" ".join),
    max_size=5,
).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
bodies = st.one_of(st.binary(max_size=200), json_values.map(lambda value: json.dumps(value).encode()), metrics_texts)
statuses = st.one_of(st.sampled_from([200, 401, 403, 404, 501, 503]), st.integers(min_value=100, max_value=599))
outcomes = st.one_of(st.builds(Reply, statuses, bodies), st.builds(Failure, st.text(max_size=20)))


@settings(database=None, derandomize=True, max_examples=1000)
@given(
    health=outcomes,
    slots_outcome=outcomes,
    props=st.none() | outcomes,
    metrics=st.none() | outcomes,
    configured_slots=st.none() | st.integers(min_value=1, max_value=64),
)
def test_interpret_never_raises_and_always_returns_a_status(
    health: Any, slots_outcome: Any, props: Any, metrics: Any, configured_slots: int | None
) -> None:
    status = interpret(health, slots_outcome, props, metrics, configured_slots)

    assert isinstance(status, BackendStatus)
    if status.state is State.READY:
        assert status.slots_total >= 1
        assert status.slot_source is not None
    else:
        assert status.slots_total == 0


@settings(database=None, derandomize=True, max_examples=500)
@given(metrics_body=st.one_of(st.binary(max_size=200), metrics_texts))
def test_interpret_never_raises_for_any_metrics_body_when_slots_is_disabled(metrics_body: bytes) -> None:
    # The generic property above rarely reaches the /metrics branch; this one always does.
    status = interpret(HEALTH_OK, SLOTS_DISABLED, PROPS_4_SLOTS, Reply(200, metrics_body))

    assert status.state in (State.READY, State.ERROR)


def test_downstream_balancer_with_nothing_usable_is_an_error_not_loading() -> None:
    body = b'{"status":"unavailable","slots_idle":0,"slots_processing":0,"requests_buffered":1}'
    status = interpret(Reply(503, body), Reply(403, b"{}"))
    assert status.state is State.ERROR
    assert status.reason == "downstream balancer reports 'unavailable'"


def test_downstream_balancer_health_counts_as_one_big_server() -> None:
    body = b'{"status":"ok","slots_idle":5,"slots_processing":2,"requests_buffered":0}'
    status = interpret(Reply(200, body), Reply(403, b'{"error":{"code":403}}'))
    assert (status.state, status.slots_total, status.slots_processing, status.slot_source) == (
        State.READY, 7, 2, SlotSource.LEGACY_HEALTH)
