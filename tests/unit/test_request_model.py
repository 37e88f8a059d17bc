"""The model a request names: the HAProxy Lua bridge's scanner against fleet.contract.request_model, the
reference that reads a body as llama-server's JSON parser does. Bodies go to one real Lua 5.3 process.

The scanner checks the structure in full but decodes only top-level keys and the model's value; a flaw
inside another string is llama-server's to refuse. So on every body the reference accepts the two agree
exactly, and on the others the scanner may read a model (llama-server refuses the body anyway)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.contract import MAX_JSON_DEPTH, MODEL_ABSENT, MODEL_MALFORMED, MODEL_NAMED, request_model
from generator.haproxy import packaged_lua_path

LUA = shutil.which("lua5.3")

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
    if LUA is None:
        pytest.fail("lua5.3 is not installed (scripts/test.sh installs it with apt-get)")
    script = _DRIVER % json.dumps(str(packaged_lua_path()))
    result = subprocess.run([LUA, "-e", script], input="".join(body.hex() + "\n" for body in bodies),
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
    (b'{"a":[1,]}', (MODEL_MALFORMED, None)),
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
]


# Flaws inside strings the scanner skips: llama-server refuses these bodies, the scanner reads on.
SKIPPED_FLAWS = [
    (b'{"x":"\\ud800","model":"a"}', (MODEL_NAMED, "a")),
    (b'{"x":"\\q"}', (MODEL_ABSENT, None)),
    (b'{"x":["tab\there"]}', (MODEL_ABSENT, None)),
    (b'{"x":{"\xff":"\xc0\xaf"},"model":"a"}', (MODEL_NAMED, "a")),
]


def test_reference_and_lua_agree_on_each_case() -> None:
    bodies = [body for body, _ in CASES]
    assert [request_model(body) for body in bodies] == [expected for _, expected in CASES]
    assert lua_verdicts(bodies) == [expected for _, expected in CASES]


def test_lua_reads_past_flaws_inside_strings_it_does_not_decode() -> None:
    bodies = [body for body, _ in SKIPPED_FLAWS]
    assert all(request_model(body) == (MODEL_MALFORMED, None) for body in bodies)
    assert lua_verdicts(bodies) == [expected for _, expected in SKIPPED_FLAWS]


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
def test_lua_reads_every_body_llama_server_accepts_as_the_reference_does(batch: list[bytes]) -> None:
    for body, lua in zip(batch, lua_verdicts(batch), strict=True):
        reference = request_model(body)
        assert lua == reference or reference == (MODEL_MALFORMED, None), body


@settings(max_examples=30, deadline=None)
@given(documents, st.data())
def test_a_body_cut_short_is_malformed_to_lua(document: dict[str, object], data: st.DataObject) -> None:
    body = json.dumps(document).encode()
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=10))))
    assert lua_verdicts([body[:cut] for cut in cuts]) == [(MODEL_MALFORMED, None)] * len(cuts)
