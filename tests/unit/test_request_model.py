"""The model a request names: both Lua bridges' scanners against fleet.contract.request_model, the reference
that reads a body as llama-server's JSON parser does. Bodies go to one real Lua process per batch, as each
proxy runs it: HAProxy's paddler.lua in Lua 5.3, Envoy's in LuaJIT (Lua 5.1, no utf8 library).

The scanner reads the top level in full and decodes the keys and the model's value, but skips other
strings and nested arrays and objects (matching their brackets only); a flaw inside them is llama-server's
to refuse. So on every body the reference accepts the two agree
exactly, and on the others the scanner may read a model (llama-server refuses the body anyway)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.contract import (
    MAX_JSON_DEPTH,
    MAX_TOP_LEVEL_MEMBERS,
    MODEL_ABSENT,
    MODEL_MALFORMED,
    MODEL_NAMED,
    request_model,
)
from generator import envoy, haproxy

# (interpreter, the bridge it runs): each proxy's Lua, as the proxy runs it.
BRIDGES = {"haproxy": ("lua5.3", haproxy.packaged_lua_path()), "envoy": ("luajit", envoy.packaged_lua_path())}

# Reads hex-encoded bodies, one per line; prints "verdict<TAB>hex(model)" per body.
_DRIVER = """
local paddler = dofile(%s)
for line in io.lines() do
  local body = line:gsub("%%x%%x", function(h) return string.char(tonumber(h, 16)) end)
  local verdict, model = paddler.request_model(body)
  io.write(verdict, "\\t", (model or ""):gsub(".", function(c) return string.format("%%02x", c:byte()) end), "\\n")
end
"""


pytestmark = pytest.mark.parametrize("bridge", list(BRIDGES))


def lua_verdicts(bridge: str, bodies: list[bytes]) -> list[tuple[str, str | None]]:
    interpreter, path = BRIDGES[bridge]
    binary = shutil.which(interpreter)
    if binary is None:
        pytest.fail(f"{interpreter} is not installed (scripts/test.sh installs it with apt-get)")
    script = _DRIVER % json.dumps(str(path))
    result = subprocess.run([binary, "-e", script], input="".join(body.hex() + "\n" for body in bodies),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verdicts = []
    for line in result.stdout.splitlines():
        verdict, model = line.split("\t")
        verdicts.append((verdict, bytes.fromhex(model).decode("utf-8") if verdict == MODEL_NAMED else None))
    return verdicts


CASES = [
    (b'{"model":"alpha","messages":[{"role":"user","content":"hi"}]}', (MODEL_NAMED, "alpha")),
    (b' \r\n\t{ "model" : "beta" } \n', (MODEL_NAMED, "beta")),
    (b'{"model":"a","model":"b"}', (MODEL_NAMED, "b")),
    (b'{"model":"a","model":null}', (MODEL_ABSENT, None)),
    (b'{"model":7,"model":"c"}', (MODEL_NAMED, "c")),
    (b'{"mod\\u0065l":"z"}', (MODEL_NAMED, "z")),
    (b'{"model":"q\\u00e9\\ud83d\\ude00\\n\\"\\\\\\/"}', (MODEL_NAMED, 'q\u00e9\U0001F600\n"\\/')),
    (b'{"nested":{"model":"x"},"list":[{"model":"y"}]}', (MODEL_ABSENT, None)),
    (b'{}', (MODEL_ABSENT, None)),
    (b'{"model":null}', (MODEL_ABSENT, None)),
    (b'{"a":[],"b":{},"c":[1,-0.5e+3,true,false,null,"s",[[]]]}', (MODEL_ABSENT, None)),
    (b'{"model":["alpha"]}', (MODEL_MALFORMED, None)),
    (b'{"model":{"id":"alpha"}}', (MODEL_MALFORMED, None)),
    (b'{"model":true}', (MODEL_MALFORMED, None)),
    (b'', (MODEL_MALFORMED, None)),
    (b'[{"model":"alpha"}]', (MODEL_MALFORMED, None)),
    (b'"alpha"', (MODEL_MALFORMED, None)),
    (b'{"model":"alpha"', (MODEL_MALFORMED, None)),
    (b'{"model":"alpha"} {}', (MODEL_MALFORMED, None)),
    (b'{"model":"alpha",}', (MODEL_MALFORMED, None)),
    (b'{"a":[1,}', (MODEL_MALFORMED, None)),
    (b'{"a":[{"b":1]}}', (MODEL_MALFORMED, None)),
    (b"{'model':'alpha'}", (MODEL_MALFORMED, None)),
    (b'{"x":NaN}', (MODEL_MALFORMED, None)),
    (b'{"x":01}', (MODEL_MALFORMED, None)),
    (b'{"x":1.}', (MODEL_MALFORMED, None)),
    (b'{"x":1e}', (MODEL_MALFORMED, None)),
    (b'{"x":tru}', (MODEL_MALFORMED, None)),
    (b'{"model":"\\ud800"}', (MODEL_MALFORMED, None)),
    (b'{"model":"\\udc00\\ud800"}', (MODEL_MALFORMED, None)),
    (b'{"model":"\\q"}', (MODEL_MALFORMED, None)),
    (b'{"model":"tab\there"}', (MODEL_MALFORMED, None)),
    (b'{"model":"\xff"}', (MODEL_MALFORMED, None)),
    (b'{"model":"\xc0\xaf"}', (MODEL_MALFORMED, None)),
    (b'{"model":"\xed\xa0\x80"}', (MODEL_MALFORMED, None)),
    (b'{"model":"\xf4\x90\x80\x80"}', (MODEL_MALFORMED, None)),
    (b'{"mod\xe2\x82el":"a"}', (MODEL_MALFORMED, None)),
    (b'{"x":["\\"],"model":"a"}', (MODEL_MALFORMED, None)),
    (b'{"x":["\\\\"],"model":"a"}', (MODEL_NAMED, "a")),
    (b'{"x":{"k\\"":"v"},"model":"a"}', (MODEL_NAMED, "a")),
    (b'{"x":"\xf0\x9f\x98\x80 ok"}', (MODEL_ABSENT, None)),
    (b'{"a":' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}", (MODEL_ABSENT, None)),
    (b'{"a":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}", (MODEL_MALFORMED, None)),
    (b'{"model":"alpha","pad":"' + b"x" * 200_000 + b'"}', (MODEL_NAMED, "alpha")),
    # UTF-8 edges (LuaJIT has no library for them): each lead byte's range of second bytes, the largest code point.
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
    (b'{"' + b"k" * 100_000 + b'":1,"model":"a"}', (MODEL_NAMED, "a")),
    (b'{"x":[' + b",".join(b'"s"' for _ in range(5000)) + b'],"model":"a"}', (MODEL_NAMED, "a")),
    (b'{"x":{' + b",".join(b'"k%d":[1]' % n for n in range(1000)) + b'},"model":"a"}', (MODEL_NAMED, "a")),
    (b"{" + b",".join(b'"k%d":1' % n for n in range(MAX_TOP_LEVEL_MEMBERS)) + b"}", (MODEL_ABSENT, None)),
    (b"{" + b",".join(b'"k%d":1' % n for n in range(MAX_TOP_LEVEL_MEMBERS + 1)) + b"}", (MODEL_MALFORMED, None)),
]


# Flaws inside what the scanner skips (other strings, nested arrays and objects whose brackets match):
# llama-server refuses these bodies, the scanner reads on.
SKIPPED_FLAWS = [
    (b'{"x":"\\ud800","model":"a"}', (MODEL_NAMED, "a")),
    (b'{"x":"\\q"}', (MODEL_ABSENT, None)),
    (b'{"x":["tab\there"]}', (MODEL_ABSENT, None)),
    (b'{"x":{"\xff":"\xc0\xaf"},"model":"a"}', (MODEL_NAMED, "a")),
    (b'{"a":[1,]}', (MODEL_ABSENT, None)),
    (b'{"a":{"b":tru},"model":"a"}', (MODEL_NAMED, "a")),
]


def test_reference_and_lua_agree_on_each_case(bridge: str) -> None:
    bodies = [body for body, _ in CASES]
    assert [request_model(body) for body in bodies] == [expected for _, expected in CASES]
    assert lua_verdicts(bridge, bodies) == [expected for _, expected in CASES]


def test_lua_reads_past_flaws_inside_what_it_skips(bridge: str) -> None:
    bodies = [body for body, _ in SKIPPED_FLAWS]
    assert all(request_model(body) == (MODEL_MALFORMED, None) for body in bodies)
    assert lua_verdicts(bridge, bodies) == [expected for _, expected in SKIPPED_FLAWS]


def test_a_model_longer_than_any_model_name_is_read_as_no_name_at_all(bridge: str) -> None:
    body = b'{"model":"' + b"m" * 2000 + b'"}'
    assert request_model(body) == (MODEL_NAMED, "m" * 2000)
    assert lua_verdicts(bridge, [body]) == [(MODEL_NAMED, "")]  # no pool has either name: 404 model_not_found


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
documents = st.dictionaries(st.sampled_from(["model", "mod\u0065l", "messages", "m", ""]) | st.text(max_size=6),
                            json_values, max_size=5)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """JSON documents, spaced and escaped in varied ways, then sometimes damaged."""
    text = json.dumps(draw(documents), ensure_ascii=draw(st.booleans()),
                      indent=draw(st.sampled_from([None, 0, 2])),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")])))
    body = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "cut", "insert", "flip"]))
    if damage != "none" and body:
        at = draw(st.integers(0, len(body) - 1))
        if damage == "cut":
            body = body[:at]
        elif damage == "insert":
            inserted = draw(st.sampled_from([b",", b"]", b"}", b'"', b"\\", b"\x00", b"\xff", b" "]))
            body = body[:at] + inserted + body[at:]
        else:
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
    return body


@settings(max_examples=60, deadline=None)
@given(st.lists(bodies(), min_size=20, max_size=20))
def test_lua_reads_every_body_llama_server_accepts_as_the_reference_does(bridge: str, batch: list[bytes]) -> None:
    for body, lua in zip(batch, lua_verdicts(bridge, batch), strict=True):
        reference = request_model(body)
        assert lua == reference or reference == (MODEL_MALFORMED, None), body


@settings(max_examples=30, deadline=None)
@given(documents, st.data())
def test_a_body_cut_short_is_malformed_to_lua(bridge: str, document: dict[str, object], data: st.DataObject) -> None:
    body = json.dumps(document).encode()
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=10))))
    assert lua_verdicts(bridge, [body[:cut] for cut in cuts]) == [(MODEL_MALFORMED, None)] * len(cuts)
