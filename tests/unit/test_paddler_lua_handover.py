"""The pure parts of paddler.lua's reload handover, run by a real Lua 5.3 without HAProxy.

How many slots a llama-server's /slots shows busy, how much of that is another worker's, and the room a
new worker leaves itself: room shrinks on one high sample and grows only when `window` samples agree.
"""

from __future__ import annotations

import json

import pytest

from tests.unit.test_paddler_lua import run_lua

SLOTS_BODY = json.dumps([
    {"id": 0, "id_task": 7, "n_ctx": 1024, "is_processing": True, "params": {"n_predict": 5}},
    {"id": 1, "id_task": -1, "n_ctx": 1024, "is_processing": False},
    {"id": 2, "id_task": 9, "n_ctx": 1024, "is_processing": True},
], indent=1)


@pytest.mark.parametrize(("body", "expected"), [
    (SLOTS_BODY, "3 2"),
    ('[{"id":0,"is_processing":false}]', "1 0"),
    ('{"error":{"code":501,"message":"This server does not support slots endpoint."}}', "nil"),
    ("", "nil"),
])
def test_count_slots_reads_llama_servers_slots_list(body: str, expected: str) -> None:
    assert run_lua(f"local slots, busy = paddler.count_slots({json.dumps(body)})\n"
                   "print(slots == nil and 'nil' or (slots .. ' ' .. busy))") == expected


@pytest.mark.parametrize(("addr", "url"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080/slots"),
    ("::1:8080", "http://[::1]:8080/slots"),
    ("<unknown>", "nil"),
    ("0.0.0.0:0", "nil"),  # an empty spare server
])
def test_slots_url_from_haproxys_server_address(addr: str, url: str) -> None:
    assert run_lua(f"print(paddler.slots_url({json.dumps(addr)}) or 'nil')") == url


@pytest.mark.parametrize(("busy", "before", "after", "others"), [
    (3, 1, 1, 2),  # one of the three busy slots is this worker's
    (3, 1, 2, 2),  # a request of its own started meanwhile: not taken for someone else's
    (2, 2, 1, 1),  # one of its own ended meanwhile
    (1, 2, 2, 0),  # its own requests not in a slot yet: never below 0
])
def test_others_is_busy_slots_less_this_workers_requests(busy: int, before: int, after: int, others: int) -> None:
    assert run_lua(f"print(paddler.others({busy}, {before}, {after}))") == str(others)


def test_room_shrinks_on_one_sample_and_grows_when_the_window_agrees() -> None:
    samples = [3, 1, 1, 3, 1, 1, 1, 0]  # what others were seen to run on a 3-slot server, window 3
    out = run_lua("local kept = {}\n"
                  f"for _, value in ipairs({{{', '.join(map(str, samples))}}}) do\n"
                  "  io.write(paddler.handover_room(kept, value, 3, 3), ' ')\n"
                  "end")
    assert out.split() == ["0", "0", "0", "0", "0", "0", "2", "2"]


def test_usable_count_needs_an_up_server_with_weight() -> None:
    servers = ('{status="UP", weight=1}, {status="no check", weight=100}, {status="UP", weight=0}, '
               '{status="DOWN", weight=100}, {status="DRAIN", weight=0}')
    assert run_lua(f"print(paddler.usable_count({{{servers}}}))") == "2"
