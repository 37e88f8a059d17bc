"""The placement rules bench.routing.placement compares inside the ideal queue."""

from __future__ import annotations

from bench.routing.model import RequestSpec, ServerSpec, ServerState
from bench.routing.placement import PLACEMENTS, lowest


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
    assert by_free(states((4, 4, 10), (1, 4, 10), (1, 4, 10)), REQUEST) == 1
    assert by_free(states((2, 2, 10), (1, 1, 10)), REQUEST) is None


def test_each_rule_makes_the_choice_its_balancer_makes() -> None:
    # a: fast, 1 of 2 busy; b: 3x slower, 1 of 8 busy.
    servers = states((1, 2, 10), (1, 8, 30))
    choice = {name: place(servers, REQUEST) for name, place in PLACEMENTS.items()}
    assert choice["most free slots (Paddler)"] == 1
    # leastconn: a (1+1) * 2/1 = 4 against b (1+1) * 8/7 = 2.3; scaled by speed b is 6.9, so a.
    assert choice["leastconn, weight idle (paddler-haproxy)"] == 1
    assert choice["leastconn, weight idle x speed"] == 0
    assert choice["speed class, then most free (paddler-envoy)"] == 0
    assert choice["ideal (first token soonest)"] == 0
