"""The Envoy Lua filter (configs/envoy/paddler.lua) on a real LuaJIT (Envoy's Lua), and a few checks in real Envoy.

The filter returns its table of pure helpers and defines Envoy's two globals; here each test
loads it with ``dofile`` and drives ``envoy_on_request`` / ``envoy_on_response`` with request and
response handles stubbed in Lua. The stubs print one line per thing the filter does (headers
removed or added, local replies, calls to the agent, log lines), and the tests compare those
lines with literal expectations. Like Envoy, the stubs invalidate header handles when the filter
yields in ``httpCall``, so reusing a stale handle fails here as it would in Envoy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from devstack.processes import LOOPBACK, EnvoyProcess, free_port, http_get, wait_until
from fleet import load_fleet
from fleet.contract import MODEL_ROUTES, route_table
from generator.envoy import packaged_lua_path, render_envoy

LUAJIT = shutil.which("luajit")

SLOTS_FORBIDDEN = '{"error":{"code":403,"type":"forbidden","message":"/slots is not exposed through the balancer"}}'
ADMIN_FORBIDDEN = ('{"error":{"code":403,"type":"forbidden",'
                   '"message":"admin endpoints are not exposed through the balancer"}}')
NOT_EXPOSED = ('{"error":{"code":404,"type":"not_found",'
               '"message":"this endpoint is not exposed through the balancer"}}')

# Envoy handles, stubbed. metadata, picker and dynamic state are plain Lua tables given by each test.
HARNESS = r"""
local function say(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  print(table.concat(parts, " "))
end

local function sorted_pairs(map)
  local keys = {}
  for key in pairs(map) do keys[#keys + 1] = key end
  table.sort(keys)
  local parts = {}
  for _, key in ipairs(keys) do parts[#parts + 1] = key .. "=" .. tostring(map[key]) end
  return table.concat(parts, " ")
end

-- One handle per call of headers(); all of them die when the filter yields, as in Envoy.
local function header_handle(values, handles)
  local handle = { alive = true }
  local function check() if not handle.alive then error("header handle used after a yield") end end
  function handle:get(name) check() return values[name] end
  function handle:remove(name) check() say("remove", name) values[name] = nil end
  function handle:add(name, value) check() say("add", name, value) values[name] = value end
  handles[#handles + 1] = handle
  return handle
end

local function kill(handles) for _, handle in ipairs(handles) do handle.alive = false end end

local function dynamic_metadata(store)
  return {
    get = function(_, filter) return store[filter] end,
    set = function(_, filter, key, value)
      say("dynamic-set", filter, key, value)
      store[filter] = store[filter] or {}
      store[filter][key] = value
    end,
  }
end

local function http_call(handles, picker)
  return function(_, cluster, headers, body, timeout_ms, async)
    say("httpCall", cluster, headers[":method"], headers[":path"], "authority=" .. headers[":authority"],
        "token=" .. tostring(headers["x-paddler-picker-token"]), "body=" .. body, "timeout=" .. timeout_ms,
        "async=" .. tostring(async == true))
    if headers["x-paddler-endpoint"] then say("  x-paddler-endpoint", headers["x-paddler-endpoint"]) end
    if headers["x-paddler-model"] then say("  x-paddler-model", headers["x-paddler-model"]) end
    kill(handles)
    if async then return end
    return picker.headers, picker.body
  end
end

function request(request_headers, metadata, picker, store, body)
  local handles = {}
  local handle = {}
  function handle:headers() return header_handle(request_headers, handles) end
  -- Like Envoy: nil when the request has no body; reading it yields (header handles die).
  function handle:body()
    say("body read")
    kill(handles)
    if body == nil then return nil end
    return { length = function() return #body end,
             getBytes = function(_, start, length) return string.sub(body, start + 1, start + length) end }
  end
  function handle:metadata() return { get = function(_, key) return metadata[key] end } end
  function handle:streamInfo() return { dynamicMetadata = function() return dynamic_metadata(store) end } end
  function handle:respond(headers, body) say("respond", sorted_pairs(headers), body) end
  function handle:logWarn(message) say("warn", message) end
  function handle:logErr(message) say("err", message) end
  handle.httpCall = http_call(handles, picker or {})
  envoy_on_request(handle)
  say("upstream", sorted_pairs(request_headers))
end

function response(chunks, store, metadata, picker, response_headers)
  local handles = {}
  local handle = {}
  function handle:headers() return header_handle(response_headers or {}, handles) end
  function handle:metadata() return { get = function(_, key) return metadata[key] end } end
  function handle:streamInfo() return { dynamicMetadata = function() return dynamic_metadata(store) end } end
  function handle:bodyChunks()
    local i = 0
    return function() i = i + 1 if chunks[i] then say("chunk", chunks[i]) end return chunks[i] end
  end
  handle.httpCall = http_call(handles, picker or {})
  envoy_on_response(handle)
  say("response done")
end
"""


def run_lua(body: str) -> list[str]:
    if LUAJIT is None:
        pytest.fail("luajit is not installed (scripts/test.sh installs it with apt-get)")
    script = f"local paddler = dofile({json.dumps(str(packaged_lua_path()))})\n{HARNESS}\n{body}"
    result = subprocess.run([LUAJIT, "-"], input=script, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def lua(value: object) -> str:
    """A Python str / bool / int / dict as a Lua literal."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, str)):
        return json.dumps(value)
    assert isinstance(value, dict)
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua(v)}" for k, v in value.items()) + "}"


TOKEN = "a-picker-token-from-the-env"  # the route's picker_token, sent to the agent on every call
# The route's settings as paddler-gen writes them; the allow-list itself is input data here (its
# contents are checked against fleet/contract.py in test_route_allowlist.py).
ROUTE = {"picker_timeout_ms": 11000, "routes": route_table(expose_slots=False, expose_admin=False),
         "slots_forbidden_body": SLOTS_FORBIDDEN, "admin_forbidden_body": ADMIN_FORBIDDEN,
         "not_exposed_body": NOT_EXPOSED, "picker_token": TOKEN}
GRANTED = {"headers": {":status": "200", "x-paddler-endpoint": "10.0.0.11:8080", "x-paddler-lease": "42"}, "body": ""}


def on_request(path: str = "/v1/chat/completions", method: str = "POST", route: dict | None = None,
               picker: dict | None = None, extra_headers: dict | None = None) -> list[str]:
    headers = {":method": method, ":path": path, **(extra_headers or {})}
    return run_lua(f"request({lua(headers)}, {lua(ROUTE if route is None else route)}, "
                   f"{lua(picker or GRANTED)}, {{}})")


ACQUIRE = ("httpCall paddler_agent POST /api/v1/picker/acquire authority=paddler-agent "
           "token=a-picker-token-from-the-env body= timeout=11000 async=false")
RELEASE_42 = ("httpCall paddler_agent POST /api/v1/picker/release/42 authority=paddler-agent "
              "token=a-picker-token-from-the-env body= timeout=1000 async=false")


def test_the_file_loads_on_luajit_with_its_globals_and_returns_its_helpers() -> None:
    assert run_lua("print(type(envoy_on_request), type(envoy_on_response), type(paddler.refusal))\n"
                   "print(envoy_on_request == paddler.on_request, envoy_on_response == paddler.on_response)") == [
        "function\tfunction\tfunction", "true\ttrue"]


def test_the_file_leaks_no_other_globals() -> None:
    assert run_lua("envoy_on_request, envoy_on_response = nil, nil\n"
                   "local before = {}\n"
                   "for k in pairs(_G) do before[k] = true end\n"
                   "dofile(" + json.dumps(str(packaged_lua_path())) + ")\n"
                   "local new = {}\n"
                   "for k in pairs(_G) do if not before[k] then new[#new + 1] = k end end\n"
                   "table.sort(new) print(table.concat(new, ' '))") == ["envoy_on_request envoy_on_response"]


def test_picker_200_sets_the_endpoint_and_records_the_lease() -> None:
    assert on_request() == [
        "remove x-paddler-endpoint",
        ACQUIRE,
        "add x-paddler-endpoint 10.0.0.11:8080",
        "dynamic-set paddler lease 42",
        "upstream :method=POST :path=/v1/chat/completions x-paddler-endpoint=10.0.0.11:8080",
    ]


def test_a_client_supplied_endpoint_header_is_removed_before_anything_else() -> None:
    lines = on_request(extra_headers={"x-paddler-endpoint": "203.0.113.9:22"},
                       picker={"headers": {":status": "000"}, "body": ""})
    assert lines[0] == "remove x-paddler-endpoint"
    assert lines[-1] == "upstream :method=POST :path=/v1/chat/completions"


def test_a_client_supplied_endpoint_header_is_removed_on_skip_picker_routes_too() -> None:
    assert on_request(path="/health", method="GET", route={"skip_picker": True},
                      extra_headers={"x-paddler-endpoint": "203.0.113.9:22"}) == [
        "remove x-paddler-endpoint",
        "upstream :method=GET :path=/health",
    ]


def test_picker_503_with_a_verdict_is_passed_to_the_client_with_retry_after() -> None:
    body = '{"error":{"code":503,"type":"buffer_full","message":"all llama.cpp slots are busy"}}'
    picker = {"headers": {":status": "503", "x-paddler-verdict": "overflow", "retry-after": "1"}, "body": body}
    assert on_request(picker=picker) == [
        "remove x-paddler-endpoint",
        ACQUIRE,
        f"respond :status=503 content-type=application/json retry-after=1 {body}",
        "upstream :method=POST :path=/v1/chat/completions",
    ]


def test_picker_503_verdict_without_retry_after_still_says_one_second() -> None:
    picker = {"headers": {":status": "503", "x-paddler-verdict": "timeout"}, "body": "{}"}
    assert on_request(picker=picker)[2] == "respond :status=503 content-type=application/json retry-after=1 {}"


@pytest.mark.parametrize(("status", "headers"), [
    ("503", {}),  # Envoy's own 503 when the agent's port refuses: no verdict header
    ("504", {}),  # the picker call timed out
    ("500", {}),
    ("200", {}),  # 200 without an endpoint: nothing to route to
], ids=["503-no-verdict", "504", "500", "200-no-endpoint"])
def test_any_other_picker_answer_means_no_header_and_a_warning(status: str, headers: dict) -> None:
    picker = {"headers": {":status": status, **headers}, "body": "upstream connect error"}
    assert on_request(picker=picker) == [
        "remove x-paddler-endpoint",
        ACQUIRE,
        f"warn paddler-agent picker unavailable (status {status}): falling back to least_request",
        "upstream :method=POST :path=/v1/chat/completions",
    ]


@pytest.mark.parametrize("status", ["403", "421"])
def test_an_agent_refusing_the_filter_is_logged_as_an_error_and_falls_back(status: str) -> None:
    # The agent refuses a wrong picker_token (403) or an unknown :authority (421): a deployment slip,
    # never the client's doing. Serving on least_request beats failing every request.
    picker = {"headers": {":status": status}, "body": '{"error":{"code":403,"message":"wrong picker token"}}'}
    assert on_request(picker=picker) == [
        "remove x-paddler-endpoint",
        ACQUIRE,
        (f"err paddler-agent refused the filter's call (status {status}): paddler-gen envoy and paddler-agent "
         "must read the same agent.picker_token_env; falling back to least_request"),
        "upstream :method=POST :path=/v1/chat/completions",
    ]


def test_picker_200_without_a_lease_routes_and_records_nothing() -> None:
    picker = {"headers": {":status": "200", "x-paddler-endpoint": "10.0.0.12:8080"}, "body": ""}
    assert on_request(picker=picker) == [
        "remove x-paddler-endpoint",
        ACQUIRE,
        "add x-paddler-endpoint 10.0.0.12:8080",
        "upstream :method=POST :path=/v1/chat/completions x-paddler-endpoint=10.0.0.12:8080",
    ]


def test_skip_picker_routes_never_call_the_agent_and_are_not_refused() -> None:
    # No required settings either: the /health route carries only skip_picker.
    assert on_request(path="/slots", method="GET", route={"skip_picker": True}) == [
        "remove x-paddler-endpoint",
        "upstream :method=GET :path=/slots",
    ]


SLOTS_REFUSED = f"respond :status=403 content-type=application/json {SLOTS_FORBIDDEN}"
ADMIN_REFUSED = f"respond :status=403 content-type=application/json {ADMIN_FORBIDDEN}"
NOT_FOUND = f"respond :status=404 content-type=application/json {NOT_EXPOSED}"


@pytest.mark.parametrize(("method", "path", "refusal"), [
    ("GET", "/slots", SLOTS_REFUSED),
    ("POST", "/slots/0?action=erase", SLOTS_REFUSED),
    ("GET", "/slots?fail_on_no_slot=1", SLOTS_REFUSED),
    ("GET", "/%73lots", SLOTS_REFUSED),
    ("GET", "/%73%6C%6F%74%73", SLOTS_REFUSED),
    ("GET", "/%u0073lots", SLOTS_REFUSED),
    ("GET", "/slot%u0073", SLOTS_REFUSED),
    ("GET", "/%uD800slots", SLOTS_REFUSED),  # a lone surrogate decodes to nothing in llama-server
    ("POST", "/%u0073lots/0?action=erase", SLOTS_REFUSED),
    ("POST", "/slots%2F0", SLOTS_REFUSED),  # one segment after /slots/ once decoded: a slot id
    ("OPTIONS", "/slots", SLOTS_REFUSED),
    ("GET", "/metrics", ADMIN_REFUSED),
    ("GET", "/%6detrics", ADMIN_REFUSED),
    ("HEAD", "/%u006detrics", ADMIN_REFUSED),
    ("POST", "/props", ADMIN_REFUSED),
    ("POST", "/%70rops", ADMIN_REFUSED),
    ("POST", "/%u0070rops", ADMIN_REFUSED),
    ("GET", "/lora-adapters", ADMIN_REFUSED),
    ("POST", "/%u006cora-adapters", ADMIN_REFUSED),
    ("POST", "/models/load", ADMIN_REFUSED),
    # Not llama-server routes as it decodes them, or not on the allow-list: never forwarded.
    ("GET", "//slots", NOT_FOUND),
    ("GET", "/slots/0", NOT_FOUND),
    ("GET", "/%2Fslots", NOT_FOUND),
    ("GET", "/%2573lots", NOT_FOUND),
    ("GET", "/slotsx", NOT_FOUND),
    ("GET", "/x/../slots", NOT_FOUND),
    ("GET", "/tools", NOT_FOUND),
    ("POST", "/cors-proxy", NOT_FOUND),
    ("GET", "/", NOT_FOUND),
    ("GET", "/v1/chat/completions", NOT_FOUND),
    ("DELETE", "/v1/models", NOT_FOUND),
])
def test_what_is_not_on_the_allow_list_is_refused_without_calling_the_agent(method: str, path: str,
                                                                            refusal: str) -> None:
    assert on_request(path=path, method=method) == [
        "remove x-paddler-endpoint",
        refusal,
        f"upstream :method={method} :path={path}",
    ]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/%63hat/completions"),
    ("POST", "/v1/%u0063hat/completions"),
    ("POST", "/v1/completions?next=/slots"),
    ("POST", "/completion#/slots"),
    ("GET", "/props"),
    ("GET", "/v1/models"),
    ("HEAD", "/v1/models"),
    ("OPTIONS", "/props"),
    ("OPTIONS", "/v1/embeddings"),
])
def test_allowed_requests_go_to_the_picker(method: str, path: str) -> None:
    assert on_request(path=path, method=method)[1] == ACQUIRE


@pytest.mark.parametrize(("method", "path", "expose_slots", "expose_admin", "refused"), [
    ("GET", "/slots", True, False, False),
    ("POST", "/slots/0", True, False, False),
    ("GET", "/metrics", True, False, True),
    ("GET", "/metrics", False, True, False),
    ("POST", "/props", False, True, False),
    ("POST", "/lora-adapters", False, True, False),
    ("GET", "/slots", False, True, True),
])
def test_expose_settings_let_their_endpoints_through(method: str, path: str, expose_slots: bool,
                                                     expose_admin: bool, refused: bool) -> None:
    route = {**ROUTE, "routes": route_table(expose_slots, expose_admin)}
    second = on_request(path=path, method=method, route=route)[1]
    assert second.startswith("respond :status=403") if refused else second == ACQUIRE


# Prints a decoded path with each byte >= 0x80 as \xNN, so the expectations below stay plain text.
SHOW_HIGH_BYTES = r"""print((string.gsub(decoded, "[\128-\255]",
                                          function(c) return string.format("\\x%02x", c:byte()) end)))"""


@pytest.mark.parametrize(("path", "decoded"), [
    ("/slots?x=1", "/slots"),
    ("/slots#x?y", "/slots"),
    ("//a///b", "//a///b"),  # llama-server merges nothing
    ("/%2F%2fslots", "///slots"),
    ("/a%20b", "/a b"),
    ("/%zzslots", "/%zzslots"),
    ("/%252Fslots", "/%2Fslots"),  # decoded once, as llama-server does
    ("/%u0073lots", "/slots"),
    ("/%U0073lots", "/%U0073lots"),  # only a lower-case u starts a %u escape
    ("/%u00e9", r"/\xc3\xa9"),
    ("/%u20AC", r"/\xe2\x82\xac"),
    ("/%u007", "/%u007"),
    ("/x%", "/x%"),
])
def test_paths_are_decoded_as_llama_server_decodes_them(path: str, decoded: str) -> None:
    shown = run_lua(f"local decoded = paddler.llama_server_path({json.dumps(path)})\n" + SHOW_HIGH_BYTES)
    assert shown == [decoded]


@pytest.mark.parametrize("key", ["picker_timeout_ms", "routes", "slots_forbidden_body", "admin_forbidden_body",
                                 "not_exposed_body", "picker_token"])
def test_a_route_without_a_required_setting_is_a_loud_500_naming_it(key: str) -> None:
    route = {k: v for k, v in ROUTE.items() if k != key}
    message = f"paddler.lua: route metadata lacks {key}"
    body = '{"error":{"code":500,"type":"misconfigured","message":"' + message + '"}}'
    assert on_request(route=route) == [
        "remove x-paddler-endpoint",
        f"err {message}",
        f"respond :status=500 content-type=application/json {body}",
        "upstream :method=POST :path=/v1/chat/completions",
    ]
    assert json.loads(body) == {"error": {"code": 500, "type": "misconfigured", "message": message}}


def test_a_route_with_no_settings_at_all_names_the_first_missing_key() -> None:
    assert on_request(route={})[1] == "err paddler.lua: route metadata lacks picker_timeout_ms"


@pytest.mark.parametrize("value", ["soon", 0, -5])
def test_a_picker_timeout_that_is_not_a_positive_number_is_a_500_too(value: object) -> None:
    message = "paddler.lua: route metadata's picker_timeout_ms is not a positive number"
    assert on_request(route={**ROUTE, "picker_timeout_ms": value})[1:3] == [
        f"err {message}",
        'respond :status=500 content-type=application/json {"error":{"code":500,"type":"misconfigured",'
        f'"message":"{message}"}}}}',
    ]


def test_picker_timeout_comes_from_the_route() -> None:
    assert on_request(route={**ROUTE, "picker_timeout_ms": 2500})[1] == (
        "httpCall paddler_agent POST /api/v1/picker/acquire authority=paddler-agent "
        "token=a-picker-token-from-the-env body= timeout=2500 async=false")


def test_the_lease_is_released_once_the_response_has_streamed_to_its_end() -> None:
    assert run_lua(f'response({{"data: a", "data: b"}}, {{paddler = {{lease = "42"}}}}, {lua(ROUTE)})') == [
        "remove x-paddler-upstream",
        "chunk data: a",
        "chunk data: b",
        RELEASE_42,
        "response done",
    ]


def test_a_response_without_a_lease_releases_nothing() -> None:
    assert run_lua(f'response({{"data: a"}}, {{}}, {lua(ROUTE)})') == ["remove x-paddler-upstream", "response done"]
    assert run_lua(f'response({{"data: a"}}, {{paddler = {{}}}}, {lua(ROUTE)})') == [
        "remove x-paddler-upstream", "response done"]


# x-paddler-upstream: "%UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%",
# values as Envoy 1.40 wrote them in the kill test's access log.
REFUSED_THEN_ANSWERED = "10.0.0.12:8080 2 - via_upstream"
REFUSED_EVERYWHERE = ("10.0.0.11:8080 3 URX,UF upstream_reset_before_response_started"
                      "{remote_connection_failure|delayed_connect_error:_Connection_refused}")
DROPPED_BEFORE_ANSWERING = ("10.0.0.11:8080 1 UC upstream_reset_before_response_started{connection_termination}")


@pytest.mark.parametrize(("upstream", "expected"), [
    ("10.0.0.11:8080 1 - via_upstream", "false nil"),
    (REFUSED_THEN_ANSWERED, "true 10.0.0.12:8080"),
    (REFUSED_EVERYWHERE, "true nil"),
    (DROPPED_BEFORE_ANSWERING, "true nil"),
    ("10.0.0.11:8080 1 UT upstream_response_timeout", "false nil"),  # slow is not dead
    ("- 1 NR route_not_found", "false nil"),
    ("", "false nil"),
    (None, "false nil"),
    ("garbage", "false nil"),
], ids=["answered", "refused-then-retried", "refused-everywhere", "dropped", "timeout",
        "no-upstream", "empty", "absent", "garbage"])
def test_placement_failure_reads_envoys_report_on_the_attempts(upstream: str | None, expected: str) -> None:
    value = "nil" if upstream is None else json.dumps(upstream)
    assert run_lua(f"local failed, served_by = paddler.placement_failure({value})\n"
                   "print(tostring(failed) .. ' ' .. tostring(served_by))") == [expected]


def test_a_refused_placement_is_reported_with_where_it_ran_before_the_body_then_released() -> None:
    headers = {":status": "200", "x-paddler-upstream": REFUSED_THEN_ANSWERED}
    assert run_lua(f'response({{"data: a"}}, {{paddler = {{lease = "42"}}}}, {lua(ROUTE)}, {{}}, {lua(headers)})') == [
        "remove x-paddler-upstream",
        ("httpCall paddler_agent POST /api/v1/picker/failed/42 authority=paddler-agent "
         "token=a-picker-token-from-the-env body= timeout=1000 async=true"),
        "  x-paddler-endpoint 10.0.0.12:8080",
        "chunk data: a",
        RELEASE_42,
        "response done",
    ]


def test_a_placement_that_failed_everywhere_is_reported_without_an_endpoint() -> None:
    headers = {":status": "503", "x-paddler-upstream": REFUSED_EVERYWHERE}
    assert run_lua(f'response({{"upstream connect error"}}, {{paddler = {{lease = "42"}}}}, {lua(ROUTE)}, {{}}, '
                   f'{lua(headers)})')[:2] == [
        "remove x-paddler-upstream",
        ("httpCall paddler_agent POST /api/v1/picker/failed/42 authority=paddler-agent "
         "token=a-picker-token-from-the-env body= timeout=1000 async=true"),
    ]


def test_the_upstream_report_never_reaches_the_client_even_without_a_lease() -> None:
    headers = {":status": "200", "x-paddler-upstream": REFUSED_THEN_ANSWERED}
    assert run_lua(f'local headers = {lua(headers)}\n'
                   f'response({{"data: a"}}, {{}}, {lua(ROUTE)}, {{}}, headers)\n'
                   'print(tostring(headers["x-paddler-upstream"]))') == [
        "remove x-paddler-upstream", "response done", "nil"]


def test_request_then_response_releases_the_lease_the_picker_gave() -> None:
    headers = {":method": "POST", ":path": "/v1/completions"}
    lines = run_lua(f"local store = {{}}\n"
                    f"request({lua(headers)}, {lua(ROUTE)}, {lua(GRANTED)}, store)\n"
                    f'response({{"{{}}"}}, store, {lua(ROUTE)})')
    assert lines[-4:] == [
        "remove x-paddler-upstream",
        "chunk {}",
        RELEASE_42,
        "response done",
    ]


# The same filter in a real Envoy, for what only Envoy can show: it finds the globals, and the
# misconfigured answer and its log line come out as the stubs say. No agent and no llama-server
# run: every request here is answered by the filter before either would be asked.


class RealEnvoy(NamedTuple):
    process: EnvoyProcess
    url: str


@pytest.fixture
def envoy_without(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RealEnvoy]:
    """Envoy on the config paddler-gen renders, less the route setting named by the parameter."""
    listen, admin = free_port(), free_port()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"backends:\n  - {{name: a, address: '{LOOPBACK}:{free_port()}'}}\n"
                     f"agent: {{management: '{LOOPBACK}:{free_port()}'}}\n"
                     f"balancer: {{listen: '{LOOPBACK}:{listen}', metrics_listen: '{LOOPBACK}:{admin}'}}\n")
    config = render_envoy(load_fleet(fleet), lua_dir=str(packaged_lua_path().parent))
    if request.param is not None:
        lines = config.splitlines(keepends=True)
        kept = [line for line in lines if line.strip().split(":")[0] != request.param]
        assert len(kept) == len(lines) - 1, f"the rendered config has no single {request.param} line"
        config = "".join(kept)
    with EnvoyProcess(config, tmp_path / "envoy", f"http://{LOOPBACK}:{admin}") as process:
        yield RealEnvoy(process, f"http://{LOOPBACK}:{listen}")


@pytest.mark.real
@pytest.mark.parametrize("envoy_without", ["picker_timeout_ms", "admin_forbidden_body", "picker_token"], indirect=True)
def test_real_envoy_answers_a_route_without_a_setting_500_and_logs_it(envoy_without: RealEnvoy,
                                                                       request: pytest.FixtureRequest) -> None:
    key = request.node.callspec.params["envoy_without"]
    message = f"paddler.lua: route metadata lacks {key}"
    status, body = http_get(envoy_without.url + "/v1/models")
    assert status == 500
    assert body.decode() == '{"error":{"code":500,"type":"misconfigured","message":"' + message + '"}}'
    wait_until(lambda: message in envoy_without.process.log_path.read_text(errors="replace"), timeout=5,
               what="the error in Envoy's log")


@pytest.mark.real
@pytest.mark.parametrize("envoy_without", [None], indirect=True, ids=["complete-config"])
@pytest.mark.parametrize(("path", "status", "body"), [
    ("/slots", 403, SLOTS_FORBIDDEN), ("/%u0073lots", 403, SLOTS_FORBIDDEN), ("/metrics", 403, ADMIN_FORBIDDEN),
    ("/tools", 404, NOT_EXPOSED)])
def test_real_envoy_refuses_what_is_not_on_the_allow_list(envoy_without: RealEnvoy, path: str, status: int,
                                                          body: str) -> None:
    assert http_get(envoy_without.url + path) == (status, body.encode())


# Routing by model (a fleet whose backends serve several models): the route carries the models and answers.

MODEL_ANSWERS = {"models_list_body": '{"object":"list","data":["alpha","beta"]}', "model_not_found_body": "not-found",
                 "body_not_json_body": "not-json", "model_missing_body": "missing", "body_too_large_body": "too-large",
                 "agent_unavailable_body": "agent-away"}
MODEL_ROUTE = {**ROUTE, "models": {"alpha": True, "beta": True}, "default_model": "alpha", "max_request_body": 64,
               "model_routes": {key: True for key in MODEL_ROUTES}, **MODEL_ANSWERS}
ACQUIRED = ["add x-paddler-endpoint 10.0.0.11:8080", "dynamic-set paddler lease 42"]


def on_model_request(body: str | None, path: str = "/v1/chat/completions", method: str = "POST",
                     route: dict | None = None, picker: dict | None = None, extra_headers: dict | None = None
                     ) -> list[str]:
    headers = {":method": method, ":path": path, **(extra_headers or {})}
    body_arg = "nil" if body is None else lua(body)
    lines = run_lua(f"request({lua(headers)}, {lua(MODEL_ROUTE if route is None else route)}, "
                    f"{lua(picker or GRANTED)}, {{}}, {body_arg})")
    assert lines[0] == "remove x-paddler-endpoint"
    return lines[1:-1]  # between the removal and what goes upstream


def respond(status: str, body: str, **headers: str) -> str:
    fields = " ".join(f"{key}={value}" for key, value in sorted({":status": status, "content-type": "application/json",
                                                                 **headers}.items()))
    return f"respond {fields} {body}"


@pytest.mark.parametrize(("body", "model"), [
    ('{"model":"beta","messages":[]}', "beta"),
    ('{"messages":[]}', "alpha"),  # no model: the default
    ('{"model":null}', "alpha"),
])
def test_a_model_route_asks_the_picker_for_the_model_the_body_names(body: str, model: str) -> None:
    assert on_model_request(body) == ["body read", ACQUIRE, f"  x-paddler-model {model}", *ACQUIRED]


@pytest.mark.parametrize(("body", "answer"), [
    ('{"model":"gamma"}', respond("404", "not-found")),
    ('{"model":"alph\\u0061"}', None),  # escapes are read as llama-server reads them: alpha
    ('{"model":"alpha"', respond("400", "not-json")),
    ('{"model":["alpha"]}', respond("400", "not-json")),
    ("", respond("400", "not-json")),
    (None, respond("400", "not-json")),  # no body at all
])
def test_a_model_route_answers_unknown_models_and_bad_bodies_itself(body: str | None, answer: str | None) -> None:
    lines = on_model_request(body)
    if answer is None:
        assert lines == ["body read", ACQUIRE, "  x-paddler-model alpha", *ACQUIRED]
    else:
        assert lines == ["body read", answer]


def test_without_a_default_model_a_request_naming_none_is_a_400() -> None:
    route = {key: value for key, value in MODEL_ROUTE.items() if key != "default_model"}
    assert on_model_request('{"messages":[]}', route=route) == ["body read", respond("400", "missing")]


def test_a_body_over_the_bound_is_a_413_from_its_length_or_from_what_arrived() -> None:
    large = '{"model":"alpha","pad":"' + "x" * 64 + '"}'
    assert on_model_request(large, extra_headers={"content-length": str(len(large))}) == [
        respond("413", "too-large")]  # refused before reading a byte
    assert on_model_request(large) == ["body read", respond("413", "too-large")]  # chunked: no length
    exact = '{"model":"beta","pad":"' + "x" * (64 - 25) + '"}'
    assert len(exact) == 64
    assert on_model_request(exact, extra_headers={"content-length": "64"}) == [
        "body read", ACQUIRE, "  x-paddler-model beta", *ACQUIRED]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("GET", "/models"), ("HEAD", "/v1/models")])
def test_the_model_list_is_the_filters_own_answer(method: str, path: str) -> None:
    assert on_model_request(None, path=path, method=method) == [
        respond("200", '{"object":"list","data":["alpha","beta"]}')]


@pytest.mark.parametrize(("method", "path"), [("GET", "/props"), ("OPTIONS", "/v1/chat/completions"),
                                              ("POST", "/v1/audio/transcriptions")])
def test_routes_without_a_model_in_their_body_go_to_the_default_model_or_any_server(method: str, path: str) -> None:
    assert on_model_request("ignored", path=path, method=method) == [ACQUIRE, "  x-paddler-model alpha", *ACQUIRED]
    route = {key: value for key, value in MODEL_ROUTE.items() if key != "default_model"}
    assert on_model_request("ignored", path=path, method=method, route=route) == [ACQUIRE, *ACQUIRED]


def test_the_allow_list_still_comes_first() -> None:
    assert on_model_request(None, path="/slots", method="GET") == [respond("403", SLOTS_FORBIDDEN)]


@pytest.mark.parametrize(("status", "log"), [
    ("000", "warn paddler-agent picker unavailable (status 000): "),
    ("403", "err paddler-agent refused the filter's call (status 403): paddler-gen envoy and paddler-agent must "
            "read the same agent.picker_token_env; ")])
def test_without_the_picker_a_fleet_that_routes_by_model_answers_503_never_least_request(status: str,
                                                                                         log: str) -> None:
    assert on_model_request('{"model":"beta"}', picker={"headers": {":status": status}, "body": ""}) == [
        "body read", ACQUIRE, "  x-paddler-model beta",
        log + "this fleet routes by model, so no fallback: answering 503",
        respond("503", "agent-away", **{"retry-after": "1"})]


def test_the_pickers_own_503_is_still_passed_on() -> None:
    picker = {"headers": {":status": "503", "x-paddler-verdict": "buffer_full", "retry-after": "1"}, "body": "full"}
    assert on_model_request('{"model":"beta"}', picker=picker)[-1] == respond("503", "full", **{"retry-after": "1"})


@pytest.mark.parametrize("key", ["model_routes", "max_request_body", "agent_unavailable_body", "models_list_body"])
def test_a_model_route_without_a_model_setting_is_a_loud_500_naming_it(key: str) -> None:
    route = {name: value for name, value in MODEL_ROUTE.items() if name != key}
    problem = f"route metadata lacks {key}"
    assert on_model_request('{"model":"beta"}', route=route) == [
        f"err paddler.lua: {problem}",
        respond("500", '{"error":{"code":500,"type":"misconfigured","message":"paddler.lua: ' + problem + '"}}')]
