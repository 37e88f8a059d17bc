"""Both Lua bridges key a conversation alike (HAProxy's paddler.lua in Lua 5.3, Envoy's in LuaJIT), and the
Envoy filter's digest is FNV-1a as written down (two 32-bit hashes from two offsets)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generator import envoy, haproxy

BRIDGES = {"haproxy": ("lua5.3", haproxy.packaged_lua_path()), "envoy": ("luajit", envoy.packaged_lua_path())}

# Reads hex-encoded "body<TAB>session" lines; prints the remember and lookup keys, hex-encoded, per line.
_DRIVER = """
local paddler = dofile(%s)
local function unhex(text) return (text:gsub("%%x%%x", function(h) return string.char(tonumber(h, 16)) end)) end
local function hex(text) return (text:gsub(".", function(c) return string.format("%%02x", c:byte()) end)) end
for line in io.lines() do
  local body_hex, session_hex = line:match("^(%%x*)\\t(%%x*)$")
  local body, session = unhex(body_hex), session_hex ~= "" and unhex(session_hex) or nil
  local _, _, fields = paddler.request_model(body)
  local remember, lookups = paddler.affinity_keys(body, fields or {}, session)
  local out = {}
  for _, key in ipairs(remember) do out[#out + 1] = hex(key) end
  out[#out + 1] = "|"
  for _, key in ipairs(lookups) do out[#out + 1] = hex(key) end
  print(table.concat(out, " "))
end
"""


def keys(bridge: str, cases: list[tuple[bytes, str]]) -> list[str]:
    interpreter, path = BRIDGES[bridge]
    binary = shutil.which(interpreter)
    if binary is None:
        pytest.fail(f"{interpreter} is not installed (scripts/test.sh installs it with apt-get)")
    lines = "".join(f"{body.hex()}\t{session.encode().hex()}\n" for body, session in cases)
    result = subprocess.run([binary, "-e", _DRIVER % json.dumps(str(path))], input=lines, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=40)}), max_size=6)
requests = st.fixed_dictionaries({"messages": messages}, optional={
    "prompt_cache_key": st.text(max_size=8), "user": st.text(max_size=8), "prompt": st.text(max_size=300),
    "model": st.sampled_from(["alpha", "beta"])})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(requests, st.sampled_from(["", "session-1"])), min_size=10, max_size=10))
def test_both_bridges_key_a_conversation_alike(batch: list[tuple[dict[str, object], str]]) -> None:
    cases = [(json.dumps(body).encode(), session) for body, session in batch]
    assert keys("haproxy", cases) == keys("envoy", cases)


def fnv1a(data: bytes, offset: int) -> int:
    value = offset
    for byte in data:
        value = ((value ^ byte) * 16777619) % 2**32
    return value


@pytest.mark.parametrize("text", ["", "a", "foobar", "m:[{\"role\":\"user\"}", "\u00e9" * 50, "x" * 5000])
def test_the_envoy_digest_is_two_fnv1a_hashes(text: str) -> None:
    binary = shutil.which("luajit")
    if binary is None:
        pytest.fail("luajit is not installed (scripts/test.sh installs it with apt-get)")
    script = (f"local paddler = dofile({json.dumps(str(envoy.packaged_lua_path()))})\n"
              "io.write(paddler.digest(io.read('a')))")
    result = subprocess.run([binary, "-e", script], input=text.encode(), capture_output=True, timeout=30)
    data = text.encode()
    assert result.stdout.decode() == f"{fnv1a(data, 0x811C9DC5):08x}{fnv1a(data, 0x050C5D1F):08x}"
