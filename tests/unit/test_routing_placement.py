"""The placement rules bench.routing.placement compares inside the ideal queue."""

from __future__ import annotations

import pytest

from bench.routing.model import TOKEN, RequestSpec, ServerSpec, ServerState, chat_template, ideal, tokens
from bench.routing.placement import LEASTCONN_IDLE, RULES, affine, lowest, reprefill


def states(*busy_slots_speed: tuple[int, int, float]) -> list[ServerState]:
    servers = []
    for index, (busy, slots, token_ms) in enumerate(busy_slots_speed):
        state = ServerState(ServerSpec(chr(ord("a") + index), slots=slots, token_ms=token_ms))
        for request_id in range(busy):
            state.admit(request_id, RequestSpec(request_id, 0.0, prompt_tokens=1, output_tokens=10))
        servers.append(state)
    return servers


REQUEST = RequestSpec(99, 0.0, prompt_tokens=1, output_tokens=1)


def test_lowest_skips_full_servers_and_breaks_ties_by_name() -> None:
    by_free = lowest(lambda state, _: (-state.free,))
    assert by_free(states((4, 4, 10), (1, 4, 10), (1, 4, 10)), REQUEST, 0.0) == 1
    assert by_free(states((2, 2, 10), (1, 1, 10)), REQUEST, 0.0) is None


def test_each_rule_makes_the_choice_its_balancer_makes() -> None:
    # a: fast, 1 of 2 busy; b: 3x slower, 1 of 8 busy.
    servers = states((1, 2, 10), (1, 8, 30))
    choice = {name: make()(servers, REQUEST, 0.0) for name, make in RULES.items()}
    assert choice["most free slots (Paddler)"] == 1
    # leastconn: a (1+1) * 2/1 = 4 against b (1+1) * 8/7 = 2.3; scaled by speed b is 6.9, so a.
    assert choice["leastconn, weight idle (paddler-haproxy)"] == 1
    assert choice["leastconn, weight idle x speed"] == 0
    assert choice["speed class, then most free (paddler-envoy)"] == 0
    assert choice["ideal (first token soonest)"] == 0


def conversation_with_home_busy(busy_for: int) -> list[RequestSpec]:
    """Turn 1 (500 prompt tokens) goes to a; an unrelated request takes a's only slot for ``busy_for`` tokens
    just before turn 2 arrives (0.1 s after turn 1 ended), while b is idle."""
    first = chat_template([("user", "q" * 2000)])
    second = first + TOKEN + "<|im_end|>\n<|im_start|>user\nnext?<|im_end|>\n<|im_start|>assistant\n"
    return [RequestSpec(0, 0.0, tokens(first), 1, text=first),
            RequestSpec(1, 0.0, tokens(second), 1, text=second, follows=0, think=0.1),
            RequestSpec(2, 0.55, 1, busy_for)]


TWINS = [ServerSpec(name, slots=1, token_ms=10, batch_slowdown=0, prompt_ms_per_token=1) for name in "ab"]


def test_affinity_sends_a_turn_home_only_when_home_has_a_slot_free() -> None:
    got = ideal(conversation_with_home_busy(busy_for=20), TWINS, affine(LEASTCONN_IDLE)())
    assert [o.server for o in got] == ["a", "b", "a"]
    assert got[1].cached_tokens == 0 and got[1].ttft > 0.5  # re-read all of it on b


def test_affinity_waits_for_home_up_to_the_re_prefill_and_no_longer() -> None:
    # a frees 0.2 s after turn 2 arrives, sooner than b would re-read its 500 tokens: it waits, and gains.
    got = ideal(conversation_with_home_busy(busy_for=20), TWINS, affine(LEASTCONN_IDLE, reprefill)())
    assert [o.server for o in got] == ["a", "a", "a"]
    assert got[1].cached_tokens > 490 and got[1].ttft < 0.3
    # a is busy for 2 s: turn 2 waits as long as its re-prefill on b would take, then goes there.
    got = ideal(conversation_with_home_busy(busy_for=200), TWINS, affine(LEASTCONN_IDLE, reprefill)())
    assert [o.server for o in got] == ["a", "b", "a"]
    prompt = conversation_with_home_busy(busy_for=1)[1].prompt_tokens  # b has none of it cached
    assert got[1].cached_tokens == 0
    assert got[1].ttft == pytest.approx(prompt * 0.001 + 0.010 + prompt * 0.001)  # waited, then one step re-reading
