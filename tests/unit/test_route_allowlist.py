"""The allow-list of what reaches llama-server, the same on both proxies and as llama-server decodes.

fleet/contract.py holds the reference: ``route_key`` (the request as llama-server will route
it) and ``route_table`` (what is forwarded). Both Lua bridges compute the key themselves, each
on its proxy's Lua (HAProxy: Lua 5.3; Envoy: LuaJIT). Here the three are compared on the
encodings that bypassed the old deny-list and on generated targets full of escapes, and the
rendered configs are checked to carry exactly the contract's table. Real proxies in front of a
real llama-server replay the same corpus in tests/integration/test_allowlist_real.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import default_fleet, parse_fleet
from fleet.contract import decide, route_key, route_table
from generator.envoy import packaged_lua_path as envoy_lua
from generator.envoy import render_envoy
from generator.haproxy import packaged_lua_path as haproxy_lua
from generator.haproxy import render_haproxy

LUAS = {"haproxy": ("lua5.3", haproxy_lua), "envoy": ("luajit", envoy_lua)}

# Reads "METHOD hex(target)" lines, prints hex(route_key): bytes survive the pipe unchanged.
KEYS_SCRIPT = """
local paddler = dofile(%s)
local function unhex(text) return (text:gsub("%%x%%x", function(h) return string.char(tonumber(h, 16)) end)) end
local function hex(text) return (text:gsub(".", function(c) return string.format("%%02x", c:byte()) end)) end
for line in io.lines() do
  local method, target = line:match("^(%%S+) (%%x*)$")
  print(hex(paddler.route_key(method, unhex(target))))
end
"""

# Encodings of endpoints that must not be forwarded by default, as a user of the old deny-list
# found them, plus the neighbours that must be.
KNOWN = [
    ("GET", "/%u0073lots"), ("GET", "/slot%u0073"), ("GET", "/%u006detrics"), ("POST", "/%u0070rops"),
    ("POST", "/%u006cora-adapters"), ("POST", "/%u0073lots/0?action=erase"), ("GET", "/%73lots"),
    ("GET", "/%2573lots"), ("GET", "/%uD800slots"), ("GET", "/sl%u006Fts"), ("GET", "/SLOTS"), ("GET", "//slots"),
    ("GET", "/./slots"), ("GET", "/x/../slots"), ("GET", "/slots;x"), ("GET", "/slots/"), ("POST", "/slots/0/"),
    ("POST", "/slots%2F0"), ("GET", "/slots#frag"), ("GET", "/slots?x#y"), ("HEAD", "/metrics"),
    ("OPTIONS", "/metrics"), ("OPTIONS", "/props"), ("POST", "/props"), ("GET", "/props"),
    ("POST", "/v1/%63hat/completions"), ("POST", "/v1/%u0063hat/completions"), ("GET", "/v1/chat/completions"),
    ("POST", "/models/%u006coad"), ("GET", "/tools"), ("POST", "/cors-proxy"), ("GET", "/"), ("GET", "/%"),
    ("GET", "/%u"), ("GET", "/%u12"), ("GET", "/%zz"), ("POST", "/%u00e9"), ("DELETE", "/v1/models"),
]

TOKENS = ["/", "%", "%u", "%u00", "%uD8", "%2", "%5", "%7", "3", "6", "7", "F", "f", "D", "e", "0", "u", "U", "s",
          "slots", "lots", "metrics", "props", "v1", "chat", "completions", "models", "?", "#", ".", ";", "=", " "]
targets = st.lists(st.sampled_from(TOKENS), max_size=12).map("".join)
methods = st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "DELETE"])


def lua_keys(proxy: str, requests: list[tuple[str, str]]) -> list[str]:
    binary, lua_path = LUAS[proxy]
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed (scripts/test.sh installs it with apt-get)")
    lines = "".join(f"{method} {target.encode('latin-1').hex()}\n" for method, target in requests)
    script = KEYS_SCRIPT % json.dumps(str(lua_path()))
    with_script = subprocess.run([binary, "-e", script], input=lines, capture_output=True, text=True, timeout=30)
    assert with_script.returncode == 0, with_script.stderr
    return [bytes.fromhex(line).decode("latin-1") for line in with_script.stdout.splitlines()]


@pytest.mark.parametrize("proxy", LUAS)
def test_the_known_bypasses_get_the_same_key_in_lua_as_in_the_contract(proxy: str) -> None:
    assert lua_keys(proxy, KNOWN) == [route_key(method, target) for method, target in KNOWN]


@pytest.mark.parametrize("proxy", LUAS)
@settings(max_examples=25, deadline=None)
@given(requests=st.lists(st.tuples(methods, targets), min_size=1, max_size=200))
def test_generated_targets_get_the_same_key_in_lua_as_in_the_contract(proxy: str,
                                                                      requests: list[tuple[str, str]]) -> None:
    assert lua_keys(proxy, requests) == [route_key(method, target) for method, target in requests]


@pytest.mark.parametrize(("method", "target", "verdict"), [
    ("GET", "/%u0073lots", "slots"), ("GET", "/slot%u0073", "slots"), ("GET", "/%u006detrics", "admin"),
    ("POST", "/%u0070rops", "admin"), ("POST", "/%u006cora-adapters", "admin"),
    ("POST", "/%u0073lots/0?action=erase", "slots"), ("GET", "/%uD800slots", "slots"),
    ("GET", "/%2573lots", "not_found"), ("GET", "//slots", "not_found"), ("GET", "/x/../slots", "not_found"),
    ("GET", "/slots;x", "not_found"), ("POST", "/slots%2F0", "slots"), ("OPTIONS", "/props", "forward"),
    ("OPTIONS", "/metrics", "admin"), ("HEAD", "/v1/models", "forward"), ("POST", "/v1/%u0063hat/completions",
                                                                           "forward"),
    ("GET", "/v1/chat/completions", "not_found"), ("GET", "/tools", "not_found"), ("GET", "/", "not_found"),
])
def test_decisions(method: str, target: str, verdict: str) -> None:
    assert decide(method, target) == verdict


def test_expose_settings_forward_their_endpoints_and_nothing_else() -> None:
    assert decide("GET", "/%u0073lots", expose_slots=True) == "forward"
    assert decide("POST", "/slots/0", expose_slots=True) == "forward"
    assert decide("GET", "/metrics", expose_slots=True) == "admin"
    assert decide("POST", "/lora-adapters", expose_admin=True) == "forward"
    assert decide("GET", "/tools", expose_slots=True, expose_admin=True) == "not_found"


def haproxy_table(config: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for verdict, keys in re.findall(r"^    acl route_(\w+) var\(txn\.paddler_route\) -m str (.+)$", config, re.M):
        for key in keys.split():
            assert key not in table, f"{key} has two verdicts"
            table[key] = verdict
    return table


@pytest.mark.parametrize("expose", [(False, False), (True, False), (False, True), (True, True)])
def test_both_rendered_configs_carry_exactly_the_contracts_table(expose: tuple[bool, bool]) -> None:
    fleet = parse_fleet({"backends": [{"name": "a", "address": "127.0.0.1:8080"}],
                         "balancer": {"expose_slots": expose[0], "expose_admin": expose[1]}})
    expected = route_table(*expose)
    assert haproxy_table(render_haproxy(fleet)) == expected
    envoy = yaml.safe_load(render_envoy(fleet))
    routes = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    # /health, then llama.cpp's two routes (placed by the picker, and the fallback) with one table.
    assert [r["metadata"]["filter_metadata"]["envoy.filters.http.lua"].get("routes") for r in routes] == [
        None, expected, expected]


def test_the_default_table_forwards_inference_and_reads_only() -> None:
    forwarded = sorted(key for key, verdict in route_table(False, False).items()
                       if verdict == "forward" and not key.startswith("OPTIONS:"))
    assert forwarded == [
        "GET:/health", "GET:/models", "GET:/props", "GET:/v1/health", "GET:/v1/models",
        "POST:/apply-template", "POST:/audio/transcriptions", "POST:/chat/completions",
        "POST:/chat/completions/input_tokens", "POST:/completion", "POST:/completions", "POST:/detokenize",
        "POST:/embedding", "POST:/embeddings", "POST:/infill", "POST:/rerank", "POST:/reranking",
        "POST:/responses", "POST:/responses/input_tokens", "POST:/tokenize", "POST:/v1/audio/transcriptions",
        "POST:/v1/chat/completions", "POST:/v1/chat/completions/input_tokens", "POST:/v1/completions",
        "POST:/v1/embeddings", "POST:/v1/messages", "POST:/v1/messages/count_tokens", "POST:/v1/rerank",
        "POST:/v1/reranking", "POST:/v1/responses", "POST:/v1/responses/input_tokens",
    ]
    assert default_fleet().balancer.expose_slots is False
