"""The model a request names: the Envoy filter's scanner (configs/envoy/paddler.lua, LuaJIT = Lua 5.1, no utf8
library) against fleet.contract.request_model, with the HAProxy bridge's cases and damaged-body generator.
Bodies go to one real LuaJIT process, as Envoy runs the filter."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.contract import MODEL_ABSENT, MODEL_MALFORMED, MODEL_NAMED, request_model
from generator.envoy import packaged_lua_path
from tests.unit.test_request_model import CASES, bodies

LUAJIT = shutil.which("luajit")

# Reads hex-encoded bodies, one per line; prints "verdict<TAB>hex(model)" per body.
_DRIVER = """
local paddler = dofile(%s)
for line in io.lines() do
  local body = line:gsub("%%x%%x", function(h) return string.char(tonumber(h, 16)) end)
  local verdict, model = paddler.request_model(body)
  io.write(verdict, "\\t", (model or ""):gsub(".", function(c) return string.format("%%02x", c:byte()) end), "\\n")
end
"""


def lua_verdicts(bodies: list[bytes]) -> list[tuple[str, str | None]]:
    if LUAJIT is None:
        pytest.fail("luajit is not installed (scripts/test.sh installs it with apt-get)")
    script = _DRIVER % json.dumps(str(packaged_lua_path()))
    result = subprocess.run([LUAJIT, "-e", script], input="".join(body.hex() + "\n" for body in bodies),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verdicts = []
    for line in result.stdout.splitlines():
        verdict, model = line.split("\t")
        verdicts.append((verdict, bytes.fromhex(model).decode("utf-8") if verdict == MODEL_NAMED else None))
    return verdicts


# UTF-8 edges LuaJIT has no library for: each lead byte's range of second bytes, and the largest code point.
UTF8_CASES = [
    (b'{"model":"\xc2\x80\xdf\xbf"}', (MODEL_NAMED, "\u0080\u07ff")),
    (b'{"model":"\xe0\xa0\x80\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbf"}', (MODEL_NAMED, "\u0800\ud7ff\ue000\uffff")),
    (b'{"model":"\xf0\x90\x80\x80\xf4\x8f\xbf\xbf"}', (MODEL_NAMED, "\U00010000\U0010ffff")),
    (b'{"model":"\\udbff\\udfff"}', (MODEL_NAMED, "\U0010ffff")),
    (b'{"model":"\xc1\xbf"}', (MODEL_MALFORMED, None)),  # overlong
    (b'{"model":"\xe0\x9f\xbf"}', (MODEL_MALFORMED, None)),  # overlong
    (b'{"model":"\xf0\x8f\xbf\xbf"}', (MODEL_MALFORMED, None)),  # overlong
    (b'{"model":"\xed\xbf\xbf"}', (MODEL_MALFORMED, None)),  # a surrogate
    (b'{"model":"\xf5\x80\x80\x80"}', (MODEL_MALFORMED, None)),  # above U+10FFFF
    (b'{"model":"\x80"}', (MODEL_MALFORMED, None)),  # a continuation byte alone
    (b'{"model":"\xf0\x90\x80"}', (MODEL_MALFORMED, None)),  # cut short by the quote
    (b'{"x":"\xe2\x82\xac"} ', (MODEL_ABSENT, None)),
]


def test_reference_and_luajit_agree_on_each_case() -> None:
    cases = CASES + UTF8_CASES
    bodies = [body for body, _ in cases]
    assert [request_model(body) for body in bodies] == [expected for _, expected in cases]
    assert lua_verdicts(bodies) == [expected for _, expected in cases]


@settings(max_examples=60, deadline=None)
@given(st.lists(bodies(), min_size=20, max_size=20))
def test_luajit_reads_generated_and_damaged_bodies_as_the_reference_does(batch: list[bytes]) -> None:
    assert lua_verdicts(batch) == [request_model(body) for body in batch]
