"""The routing benchmark's service model (ServerState) and the ideal-queue DES built on it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.routing.model import (
    TOKEN,
    Hold,
    Outcome,
    PromptCache,
    RequestSpec,
    ServerSpec,
    ServerState,
    chat_template,
    common_tokens,
    ideal,
    tokens,
)


def req(id: int, arrival: float = 0.0, prompt: int = 0, out: int = 1) -> RequestSpec:
    return RequestSpec(id=id, arrival=arrival, prompt_tokens=prompt, output_tokens=out)


# --- ServerSpec --------------------------------------------------------------------------------

def test_step_seconds_grows_with_the_batch() -> None:
    spec = ServerSpec("s", slots=4, token_ms=20, batch_slowdown=0.1)
    assert spec.step_seconds(1) == pytest.approx(0.020)
    assert spec.step_seconds(2) == pytest.approx(0.022)
    assert spec.step_seconds(4) == pytest.approx(0.026)
    assert spec.tokens_per_second_full() == pytest.approx(4 / 0.026)
    with pytest.raises(ValueError):
        spec.step_seconds(0)


def test_specs_reject_impossible_values() -> None:
    with pytest.raises(ValueError):
        ServerSpec("s", slots=0, token_ms=10)
    with pytest.raises(ValueError):
        ServerSpec("s", slots=1, token_ms=0)
    with pytest.raises(ValueError):
        req(0, out=0)
    with pytest.raises(ValueError):
        req(0, prompt=-1)


# --- ServerState: the shared service model ------------------------------------------------------

def test_step_includes_the_prompt_cost_of_requests_joining_it() -> None:
    spec = ServerSpec("s", slots=2, token_ms=10, batch_slowdown=0.5, prompt_ms_per_token=0.1)
    state = ServerState(spec)
    assert state.admit(1, req(1, prompt=100, out=3)) is False
    assert state.needs_step
    assert state.start_step(0.0) == pytest.approx(0.010 + 0.010)  # one busy + 100 prompt tokens * 0.1 ms
    assert state.end_step(0.020) == ([1], [])
    # A second request joins: its prompt makes the shared step longer for both.
    state.admit(2, req(2, prompt=50, out=1))
    end = state.start_step(0.020)
    assert end == pytest.approx(0.020 + 0.010 * 1.5 + 0.005)
    assert state.end_step(end) == ([2], [2])
    assert state.last_emitted == (1, 2)
    # Request 1 alone again, no prompt to pay: the plain one-slot step.
    assert state.start_step(end) == pytest.approx(end + 0.010)


def test_request_arriving_mid_step_joins_at_the_next_step() -> None:
    state = ServerState(ServerSpec("s", slots=2, token_ms=10, prompt_ms_per_token=0))
    state.admit(1, req(1, out=5))
    state.start_step(0.0)
    state.admit(2, req(2, out=5))  # takes the free slot now, joins the batch next step
    assert state.busy == 2 and state.queued == 0 and state.deferred_count == 0
    assert state.end_step(0.010) == ([1], [])
    assert state.last_emitted == (1,)
    state.start_step(0.010)
    assert state.end_step(0.021) == ([2], [])


def test_over_admission_defers_and_slots_free_in_fifo_order() -> None:
    state = ServerState(ServerSpec("s", slots=1, token_ms=10, prompt_ms_per_token=0))
    assert [state.admit(i, req(i, out=2)) for i in range(3)] == [False, True, True]
    assert (state.busy, state.queued, state.deferred_count) == (1, 2, 2)
    now, finished_order = 0.0, []
    while state.needs_step:
        now = state.start_step(now)
        finished_order += state.end_step(now)[1]
    assert finished_order == [0, 1, 2]
    assert now == pytest.approx(0.060)
    assert (state.busy, state.queued, state.deferred_count, state.completed) == (0, 0, 2, 3)


def test_cancel_frees_the_slot_for_the_oldest_deferred_request() -> None:
    state = ServerState(ServerSpec("s", slots=1, token_ms=10))
    for i in range(3):
        state.admit(i, req(i, out=10))
    state.start_step(0.0)
    assert state.cancel(2) is True  # a deferred one leaves the FIFO
    assert state.cancel(0) is True  # the running one frees its slot: 1 moves in
    assert (state.busy, state.queued) == (1, 0)
    assert state.end_step(0.010) == ([], [])  # 0 is gone, 1 joins at the next step
    assert state.cancel(99) is False


def test_steps_must_alternate() -> None:
    state = ServerState(ServerSpec("s", slots=1, token_ms=10))
    with pytest.raises(RuntimeError):
        state.start_step(0.0)  # idle
    with pytest.raises(RuntimeError):
        state.end_step(0.0)
    state.admit(1, req(1))
    end = state.start_step(0.0)
    with pytest.raises(RuntimeError):
        state.start_step(0.0)
    with pytest.raises(ValueError):
        state.end_step(end / 2)  # too early


@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 4)), max_size=60), slots=st.integers(1, 4))
def test_busy_never_exceeds_slots_and_deferral_counts_full_arrivals(ops: list[tuple[bool, int]], slots: int) -> None:
    state = ServerState(ServerSpec("s", slots=slots, token_ms=5))
    now, expected_deferred, next_id = 0.0, 0, 0
    for is_arrival, out in ops:
        if is_arrival:
            full = state.busy >= slots
            assert state.admit(next_id, req(next_id, out=out)) is full
            expected_deferred += full
            next_id += 1
        elif state.needs_step:
            now = state.start_step(now)
            state.end_step(now)
        assert state.busy <= slots
        assert state.queued == 0 or state.busy == slots
    assert state.deferred_count == expected_deferred


# --- ideal(): the discrete-event reference -------------------------------------------------------

def test_ideal_one_server_one_slot_is_the_hand_computed_fifo_timeline() -> None:
    server = ServerSpec("solo", slots=1, token_ms=10, batch_slowdown=0.1, prompt_ms_per_token=0.05)
    trace = [req(0, 0.000, prompt=100, out=3), req(1, 0.005, prompt=200, out=2), req(2, 0.100, prompt=20, out=1)]
    # r0: idle server, step 0 → 0.015 (10 ms + 100 * 0.05 ms), then 0.025, 0.035: done.
    # r1: arrived at 0.005, waits in the queue; joins at 0.035: 10 + 200 * 0.05 = 20 ms → first token
    #     0.055, then 0.065: done. ttft 0.050, e2e 0.060 from its arrival.
    # r2: arrives at 0.100 to an idle server: 10 + 20 * 0.05 = 11 ms, one token.
    got = ideal(trace, [server])
    expected = [(0, 0.015, 0.035), (1, 0.050, 0.060), (2, 0.011, 0.011)]
    assert [(o.id, o.ttft, o.e2e) for o in got] == [(i, pytest.approx(t), pytest.approx(e)) for i, t, e in expected]
    assert all(o.server == "solo" and not o.deferred for o in got)


def test_ideal_uses_every_free_slot_in_one_shared_batch() -> None:
    server = ServerSpec("s", slots=2, token_ms=10, batch_slowdown=0.5, prompt_ms_per_token=0)
    got = ideal([req(0, 0.0, out=2), req(1, 0.0, out=1)], [server])
    # Both join the first step: 10 ms * (1 + 0.5) = 15 ms; r0 then runs alone for 10 ms.
    assert [(o.ttft, o.e2e) for o in got] == [(pytest.approx(0.015), pytest.approx(0.025)),
                                              (pytest.approx(0.015), pytest.approx(0.015))]


def test_ideal_picks_the_server_whose_step_stays_fastest() -> None:
    fast = ServerSpec("fast", slots=2, token_ms=10, batch_slowdown=1.0, prompt_ms_per_token=0)
    slow = ServerSpec("slow", slots=2, token_ms=15, batch_slowdown=0.0, prompt_ms_per_token=0)
    got = ideal([req(i, 0.0, out=50) for i in range(4)], [slow, fast])
    # fast(10) < slow(15); then fast with 2 busy = 20 > slow 15; then slow, slow(15) < full-fast.
    assert [o.server for o in got] == ["fast", "slow", "slow", "fast"]
    # Ties: equal speed → more free slots, then name.
    twins = [ServerSpec("b", slots=3, token_ms=10), ServerSpec("a", slots=2, token_ms=10)]
    assert ideal([req(0)], twins)[0].server == "b"
    twins = [ServerSpec("b", slots=2, token_ms=10), ServerSpec("a", slots=2, token_ms=10)]
    assert ideal([req(0)], twins)[0].server == "a"


def test_ideal_takes_another_placement_and_keeps_its_perfect_queue() -> None:
    fast = ServerSpec("fast", slots=1, token_ms=10, prompt_ms_per_token=0)
    slow = ServerSpec("slow", slots=1, token_ms=30, prompt_ms_per_token=0)

    def slowest_free(servers: list[ServerState], _: RequestSpec, _waited: float) -> int | None:
        free = [index for index, state in enumerate(servers) if state.free > 0]
        return max(free, key=lambda index: servers[index].spec.token_ms, default=None)

    trace = [req(i, 0.0, out=2) for i in range(3)]
    assert [o.server for o in ideal(trace, [fast, slow])] == ["fast", "slow", "fast"]
    got = ideal(trace, [fast, slow], slowest_free)
    # The slow server first, the fast one next; the third waits in the queue for whichever frees first (fast,
    # at 20 ms), never deferred.
    assert [o.server for o in got] == ["slow", "fast", "fast"]
    assert [o.ttft for o in got] == [pytest.approx(0.030), pytest.approx(0.010), pytest.approx(0.030)]
    assert not any(o.deferred for o in got)


def test_a_held_request_lets_the_ones_behind_it_go_and_is_asked_again_at_its_time() -> None:
    fleet = [ServerSpec("a", slots=1, token_ms=10, prompt_ms_per_token=0), ServerSpec("b", slots=1, token_ms=10,
                                                                                       prompt_ms_per_token=0)]
    asked: list[tuple[int, float]] = []

    def hold_request_0(servers: list[ServerState], request: RequestSpec, waited: float) -> int | Hold | None:
        asked.append((request.id, waited))
        if request.id == 0 and waited < 0.05:
            return Hold(0.05 - waited)
        return next((index for index, state in enumerate(servers) if state.free > 0), None)

    got = ideal([req(0, 0.0, out=1), req(1, 0.0, out=1)], fleet, hold_request_0)
    assert (got[1].server, got[1].ttft) == ("a", pytest.approx(0.010))  # went past the held one
    assert (got[0].server, got[0].ttft) == ("a", pytest.approx(0.060))  # taken at 0.05, without any other event
    assert asked[-1] == (0, pytest.approx(0.05))


def test_ideal_queues_instead_of_deferring() -> None:
    fleet = [ServerSpec("a", slots=1, token_ms=10), ServerSpec("b", slots=2, token_ms=20)]
    trace = [req(i, 0.001 * i, prompt=50, out=20) for i in range(30)]
    got = ideal(trace, fleet)
    assert not any(o.deferred for o in got)
    # Oversubscribed 10x: later requests wait; the queue is FIFO, so first tokens come in arrival order per server.
    for name in ("a", "b"):
        firsts = [trace[o.id].arrival + o.ttft for o in got if o.server == name]
        assert firsts == sorted(firsts)


def _random_trace(seed: int, n: int, rate: float) -> list[RequestSpec]:
    rng, t, trace = random.Random(seed), 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        trace.append(RequestSpec(i, t, rng.randint(10, 800), rng.randint(1, 100)))
    return trace


FLEET = [ServerSpec("a", 2, 20), ServerSpec("b", 4, 25), ServerSpec("c", 8, 30, batch_slowdown=0.05)]


def test_ideal_is_deterministic() -> None:
    trace = _random_trace(7, 500, rate=20)
    assert ideal(trace, FLEET) == ideal(list(trace), list(reversed(FLEET)))


def test_ideal_handles_5000_requests() -> None:
    # Near the fleet's capacity: long queues, many steps. How fast is bench.routing's to say (it prints
    # its own timings); a timed assertion here only measured how busy the machine was.
    trace = _random_trace(3, 5000, rate=6)
    got = ideal(trace, FLEET)
    assert len(got) == 5000


def test_ideal_rejects_bad_input() -> None:
    assert ideal([], FLEET) == []
    with pytest.raises(ValueError):
        ideal([req(0)], [])
    with pytest.raises(ValueError):
        ideal([req(0), req(0)], FLEET)
    with pytest.raises(ValueError):
        ideal([req(0)], [ServerSpec("a", 1, 10), ServerSpec("a", 2, 10)])


requests_st = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 2000), st.integers(1, 40)), min_size=1, max_size=40)
servers_st = st.lists(
    st.tuples(st.integers(1, 4), st.floats(0.5, 50), st.floats(0, 1), st.floats(0, 0.2)), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(requests=requests_st, servers=servers_st)
def test_every_request_gets_exactly_one_outcome(requests: list[tuple[float, int, int]],
                                                servers: list[tuple[int, float, float, float]]) -> None:
    trace = [RequestSpec(i * 3 + 1, arrival, prompt, out) for i, (arrival, prompt, out) in enumerate(requests)]
    fleet = [ServerSpec(f"s{i}", slots, token_ms, slowdown, prompt_ms)
             for i, (slots, token_ms, slowdown, prompt_ms) in enumerate(servers)]
    got = ideal(trace, fleet)
    assert [o.id for o in got] == [r.id for r in trace]
    names = {s.name for s in fleet}
    for outcome, request in zip(got, trace, strict=False):
        assert isinstance(outcome, Outcome)
        assert 0 < outcome.ttft <= outcome.e2e
        assert outcome.server in names and not outcome.deferred
        spec = next(s for s in fleet if s.name == outcome.server)
        # Never faster than running alone: prompt + one step per token at batch size 1.
        alone = spec.prompt_seconds(request.prompt_tokens) + spec.step_seconds(1) * request.output_tokens
        assert outcome.e2e >= alone - 1e-9


# --- The prompt cache (SIMULATOR's model of llama-server's) ------------------------------------------------

def text(n_tokens: int, fill: str = "a") -> str:
    return fill * (4 * n_tokens)


def turn(id: int, prompt: str, out: int = 2, follows: int | None = None) -> RequestSpec:
    return RequestSpec(id, 0.0, tokens(prompt), out, text=prompt, follows=follows)


def serve(state: ServerState, request: RequestSpec, now: float = 0.0) -> tuple[int, float]:
    """Run ``request`` alone to its end: (prompt tokens it reused, when it finished)."""
    state.admit(request.id, request)
    cached = state.reused.pop(request.id)
    while state.needs_step:
        now = state.start_step(now)
        state.end_step(now)
    return cached, now


def test_tokens_and_common_prefix_count_whole_4_byte_tokens() -> None:
    assert tokens("") == 1 and tokens("abcd" * 10) == 10 and tokens("abcdefg") == 1
    assert common_tokens("abcdefgh", "abcdefgX") == 1  # 7 bytes in common: one whole token
    assert common_tokens("abcdefgh", "abcdefgh") == 2
    assert common_tokens("x" * 4000 + "A", "x" * 4000 + "B") == 1000
    assert common_tokens("", "abcd") == 0


def test_a_second_turn_on_the_same_slot_reuses_the_first_turns_prompt_and_answer() -> None:
    state = ServerState(ServerSpec("s", slots=1, token_ms=10, prompt_ms_per_token=1.0))
    first = chat_template([("system", text(100)), ("user", "hello there?")])
    cached, _ = serve(state, turn(1, first, out=5))
    assert cached == 0
    second = chat_template([("system", text(100)), ("user", "hello there?"), ("assistant", TOKEN * 5),
                            ("user", "and then?")])
    cached, _ = serve(state, turn(2, second, follows=1))
    # Everything the slot held (first prompt + its 5 answer tokens) up to where the texts part.
    assert cached == common_tokens(second, first + TOKEN * 5) > tokens(first)
    assert (state.prompt_tokens_total, state.cached_tokens_total) == (tokens(first) + tokens(second), cached)


def test_the_same_turn_on_another_server_reuses_nothing() -> None:
    one, other = (ServerState(ServerSpec(name, slots=1, token_ms=10)) for name in ("one", "other"))
    prompt = chat_template([("user", text(200))])
    serve(one, turn(1, prompt))
    follow_up = prompt + TOKEN * 2 + "<|im_end|>\n"
    assert other.cached_if_sent(turn(2, follow_up)) == 0
    assert one.cached_if_sent(turn(2, follow_up)) > 200


def test_a_fully_cached_prompt_still_evaluates_its_last_token() -> None:
    state = ServerState(ServerSpec("s", slots=1, token_ms=10))
    serve(state, turn(1, text(50)))
    assert serve(state, turn(2, text(50)))[0] == 49


def test_the_cost_model_charges_only_uncached_prompt_tokens() -> None:
    spec = ServerSpec("s", slots=1, token_ms=10, batch_slowdown=0, prompt_ms_per_token=0.5)
    state = ServerState(spec)
    prompt = text(400)
    state.admit(1, turn(1, prompt, out=1))
    assert state.start_step(0.0) == pytest.approx(0.010 + 400 * 0.0005)  # nothing cached: all 400
    state.end_step(0.210)
    follow_up = prompt + TOKEN + text(20, "b")  # 400 + 1 answer token + 20 new tokens
    state.admit(2, turn(2, follow_up, out=1))
    assert state.reused[2] == 401
    assert state.start_step(1.0) == pytest.approx(1.0 + 0.010 + 20 * 0.0005)  # only the 20 new ones


def test_the_idle_slot_with_the_most_similar_prompt_is_chosen_else_the_least_recently_used() -> None:
    state = ServerState(ServerSpec("s", slots=2, token_ms=10, cache_tokens=0))  # no host cache
    a, b = text(100, "a"), text(100, "b")
    state.admit(1, turn(1, a, out=1))
    state.admit(2, turn(2, b, out=1))
    now = state.start_step(0.0)
    state.end_step(now)
    # Each prompt finds its own slot again, whichever order they come in.
    assert state.cached_if_sent(turn(3, b + "more")) == 100
    assert state.cached_if_sent(turn(3, a + "more")) == 100
    # Unlike both (similarity under 0.1): the least recently used slot, whose cache is lost.
    assert serve(state, turn(3, text(100, "c")), now)[0] == 0
    assert state.cached_if_sent(turn(4, a + "more")) == 0  # slot 0 (a's, used first) went to c
    assert state.cached_if_sent(turn(4, b + "more")) == 100


def test_the_host_cache_restores_a_prefix_after_its_slot_was_reused() -> None:
    state = ServerState(ServerSpec("s", slots=1, token_ms=10, cache_tokens=10_000))
    conversation = chat_template([("user", text(300))])
    _, now = serve(state, turn(1, conversation))
    _, now = serve(state, turn(2, text(300, "z")), now)  # another prompt overwrites the only slot ...
    assert conversation + TOKEN * 2 in state.host  # ... after its cache went to host memory
    follow_up = conversation + TOKEN * 2 + "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
    cached, _ = serve(state, turn(3, follow_up), now)
    assert cached == common_tokens(follow_up, conversation + TOKEN * 2) > 300
    without_host = ServerState(ServerSpec("s", slots=1, token_ms=10, cache_tokens=0))
    for request in (turn(1, conversation), turn(2, text(300, "z"))):
        serve(without_host, request)
    assert serve(without_host, turn(3, follow_up))[0] == 0


def test_the_host_cache_evicts_the_least_recently_used_at_its_size_limit() -> None:
    cache = PromptCache(limit=250)
    cache.save(text(100, "a"))
    cache.save(text(100, "b"))
    cache.touch(text(100, "a"))  # a is now the most recently used
    cache.save(text(100, "c"))  # 300 > 250: b, the least recently used, goes
    assert (text(100, "a") in cache, text(100, "b") in cache, text(100, "c") in cache) == (True, False, True)
    assert cache.size == 200
    cache.save(text(300, "d"))  # larger than the whole cache: not kept, nothing evicted for it
    assert text(300, "d") not in cache and cache.size == 200
    cache.save(text(100, "a") + text(20, "e"))  # extends a: replaces it
    assert text(100, "a") not in cache and cache.size == 220
    assert cache.best(text(100, "a") + text(5, "q")) == (100, text(100, "a") + text(20, "e"))


def test_ideal_sends_a_follow_up_where_its_cache_is_and_counts_what_it_reused() -> None:
    twins = [ServerSpec("a", slots=2, token_ms=10, prompt_ms_per_token=0.5),
             ServerSpec("b", slots=2, token_ms=10, prompt_ms_per_token=0.5)]
    first = chat_template([("user", text(500, "q"))])
    second = first + TOKEN * 3 + "<|im_end|>\n<|im_start|>user\nnext?<|im_end|>\n<|im_start|>assistant\n"
    trace = [RequestSpec(0, 0.0, tokens(first), 3, text=first),
             RequestSpec(1, 0.0, tokens(second), 2, text=second, follows=0, think=1.0),
             RequestSpec(2, 0.5, 10, 200)]  # keeps a slot of one server busy when the follow-up comes
    got = ideal(trace, twins)
    assert got[1].server == got[0].server and got[1].cached_tokens == common_tokens(second, first + TOKEN * 3)
    assert got[1].arrival == pytest.approx(got[0].e2e + 1.0)  # sent its think time after turn 1 ended
    # Its first token: the end of request 2's running step (at most 10 ms), then one shared step plus only its
    # uncached tokens, far from the 0.26 s all of them would cost.
    joined = 0.010 * 1.1 + (tokens(second) - got[1].cached_tokens) * 0.0005
    assert joined <= got[1].ttft <= joined + 0.010 < tokens(second) * 0.0005
    with pytest.raises(ValueError):
        ideal([RequestSpec(0, 0.0, 1, 1, follows=7)], twins)
