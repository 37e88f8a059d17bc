"""The HAProxy Lua bridge's pure helpers, run by a real Lua 5.3 (HAProxy 2.6's Lua) without HAProxy.

paddler.lua only registers with HAProxy when ``core`` exists, and returns its table, so its
decisions (which servers count, what /health says) can be checked on their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from generator.haproxy import packaged_lua_path

LUA = shutil.which("lua5.3")


def run_lua(body: str) -> str:
    if LUA is None:
        pytest.fail("lua5.3 is not installed (scripts/test.sh installs it with apt-get)")
    script = f"local paddler = dofile({json.dumps(str(packaged_lua_path()))})\n{body}"
    result = subprocess.run([LUA, "-"], input=script, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(("status", "usable"), [
    ("UP", True), ("no check", True), ("UP 1/2", True), ("DOWN", False), ("DOWN (agent)", False),
    ("DRAIN", False), ("MAINT", False), ("NOLB", False),
])
def test_which_haproxy_states_count_as_usable(status: str, usable: bool) -> None:
    assert run_lua(f"print(paddler.is_usable({json.dumps(status)}))") == str(usable).lower()


def health(servers: list[dict], buffered: int = 0) -> tuple[dict, int]:
    rows = ", ".join(f"{{status={json.dumps(s['status'])}, slim={s['slim']}, scur={s['scur']}, bck={s['bck']}}}"
                     for s in servers)
    out = run_lua(f"local body, code = paddler.health_body(paddler.aggregate({{{rows}}}), {buffered})\n"
                  "print(code) print(body)")
    code, body = out.split("\n", 1)
    return json.loads(body), int(code)


def test_health_sums_usable_primaries_only() -> None:
    body, code = health([
        {"status": "no check", "slim": 4, "scur": 1, "bck": 0},
        {"status": "UP", "slim": 2, "scur": 2, "bck": 0},
        {"status": "DOWN (agent)", "slim": 8, "scur": 0, "bck": 0},
        {"status": "no check", "slim": 2, "scur": 0, "bck": 1},  # standby: unused while primaries serve
    ], buffered=3)
    assert code == 200
    assert body == {"status": "ok", "slots_idle": 3, "slots_processing": 3, "requests_buffered": 3}


def test_health_counts_standby_when_no_primary_is_usable() -> None:
    body, code = health([
        {"status": "DOWN", "slim": 4, "scur": 0, "bck": 0},
        {"status": "no check", "slim": 2, "scur": 1, "bck": 1},
    ])
    assert (code, body["status"], body["slots_idle"], body["slots_processing"]) == (200, "ok", 1, 1)


def test_health_with_nothing_usable_is_503_unavailable() -> None:
    body, code = health([{"status": "DOWN", "slim": 4, "scur": 0, "bck": 0}], buffered=2)
    assert code == 503
    assert body == {"status": "unavailable", "slots_idle": 0, "slots_processing": 0, "requests_buffered": 2}


def test_more_sessions_than_maxconn_never_report_negative_idle() -> None:
    body, _ = health([{"status": "UP", "slim": 2, "scur": 3, "bck": 0}])
    assert body["slots_idle"] == 0 and body["slots_processing"] == 3



def required_env(env: dict[str, str], name: str, kind: str) -> str:
    table = ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in env.items())
    return run_lua(f"local env = {{{table}}}\n"
                   f"local ok, result = pcall(paddler.required_env, function(n) return env[n] end, "
                   f"{json.dumps(name)}, {json.dumps(kind)})\n"
                   "print(ok, result)")


def test_a_required_setting_is_read_by_its_fleet_name() -> None:
    env = {"PADDLER_MAX_BUFFERED_REQUESTS": "30"}
    assert required_env(env, "PADDLER_MAX_BUFFERED_REQUESTS", "number") == "true\t30"


@pytest.mark.parametrize(("env", "problem"), [
    ({}, "PADDLER_MAX_BUFFERED_REQUESTS is not set "
         "(setenv PADDLER_MAX_BUFFERED_REQUESTS in haproxy.cfg's global section)"),
    ({"PADDLER_MAX_BUFFERED_REQUESTS": ""}, "PADDLER_MAX_BUFFERED_REQUESTS is not set"),
    ({"PADDLER_MAX_BUFFERED_REQUESTS": "lots"}, "must be a whole number of at least 1, got lots"),
    ({"PADDLER_MAX_BUFFERED_REQUESTS": "0"}, "must be a whole number of at least 1, got 0"),
    ({"PADDLER_MAX_BUFFERED_REQUESTS": "2.5"}, "must be a whole number of at least 1, got 2.5"),
])
def test_a_missing_or_malformed_setting_stops_the_load_instead_of_a_silent_default(
        env: dict[str, str], problem: str) -> None:
    ok, _, message = required_env(env, "PADDLER_MAX_BUFFERED_REQUESTS", "number").partition("\t")
    assert ok == "false"
    assert problem in message


# --- Routing by model --------------------------------------------------------------------------


@pytest.mark.parametrize(("statuses", "answered"), [
    (["L7OK", "L7OK"], True),
    (["L7OK", "L7STS"], True),
    (["* L7OK"], True),
    (["L7OK", "INI"], False),
    (["* INI"], False),
    (["L4CON"], False),
    (["L4TOUT"], False),
    (["L6RSP"], False),
    (["L7TOUT"], False),
    ([""], False),
])
def test_a_pool_waits_until_the_agent_answered_each_of_its_servers(statuses: list[str], answered: bool) -> None:
    rows = ", ".join(f"{{agent_status={json.dumps(status)}}}" for status in statuses)
    assert run_lua(f"print(paddler.agent_answered({{{rows}}}))") == str(answered).lower()


def test_models_setting_gives_each_model_its_backend_and_limits() -> None:
    out = run_lua('local pools, models = paddler.parse_models("alpha,30,10000/qwen3-8b:Q4,50,20000", "llama")\n'
                  'local qwen = pools["llama.qwen3-8b:Q4"]\n'
                  'print(models["alpha"], models["qwen3-8b:Q4"], qwen.max_buffered_requests,\n'
                  '      qwen.buffered_request_timeout_ms, pools["llama.alpha"].max_buffered_requests)')
    assert out.split() == ["llama.alpha", "llama.qwen3-8b:Q4", "50", "20000", "30"]


@pytest.mark.parametrize("text", ["", "alpha", "alpha,30", "alpha,0,10", "alpha,x,10", "alpha,30,10,4"])
def test_a_models_setting_that_cannot_be_read_stops_the_load(text: str) -> None:
    with pytest.raises(AssertionError, match="PADDLER_MODELS"):
        run_lua(f"paddler.parse_models({json.dumps(text)}, 'llama')")


def pool_for(body: str, announced: int | None = None, default: str | None = "llama.alpha") -> str:
    return run_lua(f"""
local pools, models = paddler.parse_models("alpha,30,10000/beta,30,10000", "llama")
paddler.configure_models(models, {json.dumps(default) if default else "nil"}, 64)
print((paddler.pool_for({json.dumps(body)}, {announced if announced is not None else len(body)})))""")


@pytest.mark.parametrize(("body", "announced", "default", "pool"), [
    ('{"model":"beta"}', None, "llama.alpha", "llama.beta"),
    ('{"prompt":"x"}', None, "llama.alpha", "llama.alpha"),
    ('{"prompt":"x"}', None, None, "absent"),
    ('{"model":"gamma"}', None, "llama.alpha", "unknown"),
    ('{"model":"beta"', None, "llama.alpha", "malformed"),
    ('{"model":"beta","pad":"' + "x" * 60 + '"}', None, "llama.alpha", "too_large"),
    ('{"model":"beta"}', 65, "llama.alpha", "too_large"),
])
def test_the_pool_of_a_request(body: str, announced: int | None, default: str | None, pool: str) -> None:
    assert pool_for(body, announced, default) == pool


@pytest.mark.parametrize(("query", "pool"), [
    ("", "nil"), ("model=beta", "llama.beta"), ("model=gamma", "false"), ("model=", "false"),
    ("verbose=1", "nil"), ("model=beta&x=1", "nil"),
])
def test_health_asks_about_one_model_or_the_fleet(query: str, pool: str) -> None:
    out = run_lua(f"""
local pools, models = paddler.parse_models("alpha,30,10000/beta,30,10000", "llama")
paddler.configure_models(models, nil, 64)
print(paddler.health_pool({json.dumps(query)}))""")
    assert out == pool


# --- Prompt-cache affinity ---------------------------------------------------------------------


def affinity(body: str, session: str | None = None) -> tuple[list[str], list[str]]:
    out = run_lua(f"""
local body = {json.dumps(body)}
local _, _, fields = paddler.request_model(body)
local remember, lookups = paddler.affinity_keys(body, fields, {json.dumps(session) if session else "nil"})
print(table.concat(remember, "\\1")) print(table.concat(lookups, "\\1"))""")
    remember, lookups = (out + "\n").split("\n")[:2]
    return [key for key in remember.split("\x01") if key], [key for key in lookups.split("\x01") if key]


def chat(*contents: str, **fields: object) -> str:
    roles = ["system", *(["user", "assistant"] * len(contents))]
    messages = [{"role": role, "content": content} for role, content in zip(roles, contents, strict=False)]
    return json.dumps({"model": "alpha", "messages": messages, **fields})


def test_a_follow_up_turn_looks_up_the_previous_turn_first() -> None:
    first_remember, first_lookups = affinity(chat("S", "Q1"))
    second_remember, second_lookups = affinity(chat("S", "Q1", "A1", "Q2"))
    assert first_lookups == first_remember  # a first turn: only itself (a retry)
    assert second_lookups[0] == first_remember[0]  # the previous turn's messages, exactly
    assert len(second_lookups) == 3 and second_lookups[-1] == second_remember[0]
    _, third_lookups = affinity(chat("S", "Q1", "A1", "Q2", "A2", "Q3"))
    assert third_lookups[0] == second_remember[0]


def test_a_shared_system_prompt_alone_is_never_a_key() -> None:
    system_prompt = json.dumps([{"role": "system", "content": "S"}])[:-1]  # the first message's JSON text
    for body in (chat("S", "Q1"), chat("S", "Q1", "A1", "Q2")):
        remember, lookups = affinity(body)
        assert f"m:{system_prompt}" not in remember + lookups
    assert affinity(chat("S")) == ([f"m:{system_prompt}"], [f"m:{system_prompt}"])  # unless it is all there is


def test_named_keys_come_first_in_their_order() -> None:
    body = chat("S", "Q1", prompt_cache_key="pck", user="bob")
    assert affinity(body, "sess") == (["k:pck"], ["k:pck"])
    assert affinity(chat("S", "Q1", user="bob"), "sess") == (["s:sess"], ["s:sess"])
    assert affinity(chat("S", "Q1", user="bob")) == (["u:bob"], ["u:bob"])
    assert affinity(chat("S", "Q1", user="")) == affinity(chat("S", "Q1"))  # an empty name names nothing


def test_a_completion_is_known_by_its_prompts_first_256_bytes() -> None:
    short, _ = affinity(json.dumps({"prompt": "hello"}))
    assert short == ['p:"hello"']
    long_prompt = "x" * 300
    remember, lookups = affinity(json.dumps({"prompt": long_prompt}))
    assert remember == lookups == ['p:"' + "x" * 255]
    assert affinity(json.dumps({"prompt": long_prompt + " and more"}))[1] == lookups


def test_a_body_without_a_conversation_has_no_key() -> None:
    assert affinity(json.dumps({"model": "alpha", "input": "embed me"})) == ([], [])


def test_the_memory_keeps_two_generations_and_recalls_into_the_newer() -> None:
    out = run_lua("""
local memory = paddler.new_memory()
for i = 1, 65536 do paddler.remember(memory, "k" .. i, "gpu1") end
paddler.remember(memory, "fresh", "gpu2")
print(memory.size, paddler.recall(memory, "k1"), memory.size, paddler.recall(memory, "fresh"),
      paddler.recall(memory, "never"))""")
    assert out.split() == ["1", "gpu1", "2", "gpu2", "nil"]


@pytest.mark.parametrize(("stats", "free"), [
    ({"status": "UP", "weight": "100", "scur": "1", "slim": "2"}, True),
    ({"status": "UP", "weight": "100", "scur": "2", "slim": "2"}, False),
    ({"status": "UP", "weight": "0", "scur": "0", "slim": "2"}, False),
    ({"status": "DOWN", "weight": "100", "scur": "0", "slim": "2"}, False),
    ({"status": "DRAIN", "weight": "100", "scur": "0", "slim": "2"}, False),
    ({"status": "no check", "weight": "57", "scur": "0", "slim": "1"}, True),
])
def test_the_load_guard_wants_a_slot_free_now(stats: dict[str, str], free: bool) -> None:
    table = ", ".join(f"{key}={json.dumps(value)}" for key, value in stats.items())
    assert run_lua(f"print(paddler.has_free_slot({{{table}}}))") == str(free).lower()


def servers_table(servers: dict[str, tuple[str, ...]]) -> str:
    """name → (status, weight, scur, slim[, bck[, qcur]]) as a Lua table of get_stats() rows (strings, as
    HAProxy gives them; bck and qcur "0" unless given)."""
    rows = []
    for name, row in servers.items():
        status, weight, scur, slim, bck, qcur = (*row, "0", "0")[:6]
        rows.append(f"[{json.dumps(name)}] = {{status={json.dumps(status)}, weight={json.dumps(weight)}, "
                    f"scur={json.dumps(scur)}, slim={json.dumps(slim)}, bck={json.dumps(bck)}, "
                    f"qcur={json.dumps(qcur)}}}")
    return "{" + ", ".join(rows) + "}"


@pytest.mark.parametrize(("servers", "worth"), [
    ({"home": ("UP", "100", "2", "2"), "other": ("UP", "100", "0", "2")}, True),  # full, and another is free
    ({"home": ("UP", "100", "2", "2"), "other": ("UP", "100", "2", "2")}, False),  # all full: the queue will do
    ({"home": ("DOWN", "100", "0", "2"), "other": ("UP", "100", "0", "2")}, False),  # home is not coming back
    ({"home": ("UP", "0", "2", "2"), "other": ("UP", "100", "0", "2")}, False),  # drained by the agent
    ({"home": ("UP", "100", "2", "2"), "other": ("DRAIN", "100", "0", "2")}, False),  # the only free one is out
    ({"other": ("UP", "100", "0", "2")}, False),  # home is not in this backend
    # A free standby server takes nothing while the primaries serve: no reason to wait.
    ({"home": ("UP", "100", "2", "2"), "other": ("UP", "100", "2", "2"), "standby": ("UP", "100", "0", "2", "1")},
     False),
    # Home is a standby (the primaries are down): the other standby servers are its peers.
    ({"home": ("UP", "100", "2", "2", "1"), "standby": ("UP", "100", "0", "2", "1")}, True),
])
def test_a_conversation_waits_for_its_server_only_while_it_is_full_and_another_is_free(
        servers: dict[str, tuple[str, ...]], worth: bool) -> None:
    assert run_lua(f'print(paddler.worth_waiting("home", {servers_table(servers)}))') == str(worth).lower()


@pytest.mark.parametrize(("servers", "queued", "at_home"), [
    # Everyone full, home has 2 of 6 slots: 2 queued requests take the 4 slots the others free before home frees one.
    ({"home": ("UP", "100", "2", "2"), "other": ("UP", "100", "4", "4")}, 2, True),
    ({"home": ("UP", "100", "2", "2"), "other": ("UP", "100", "4", "4")}, 1, False),  # a slot elsewhere would idle
    ({"home": ("UP", "100", "8", "8"), "other": ("UP", "100", "2", "2")}, 1, True),  # the big server frees first
    ({"home": ("UP", "100", "8", "8"), "other": ("UP", "100", "2", "2")}, 0, False),  # nothing else would take it
    ({"home": ("UP", "100", "2", "2"), "other": ("UP", "100", "1", "4")}, 9, False),  # a slot is free: go there
    ({"home": ("UP", "100", "2", "2", "0", "2"), "other": ("UP", "100", "2", "2")}, 9, False),  # its queue is full
    ({"home": ("UP", "100", "2", "2", "0", "1"), "other": ("UP", "100", "2", "2")}, 9, True),
    ({"home": ("DOWN", "100", "0", "2"), "other": ("UP", "100", "2", "2")}, 9, False),  # home is not coming back
    ({"home": ("UP", "0", "2", "2"), "other": ("UP", "100", "2", "2")}, 9, False),  # drained by the agent
    ({"other": ("UP", "100", "2", "2")}, 9, False),  # home is not in this backend
    # A free standby server takes nothing while the primaries serve; a drained one frees nothing.
    ({"home": ("UP", "100", "2", "2"), "standby": ("UP", "100", "0", "8", "1"), "out": ("UP", "0", "0", "8")}, 0,
     True),
])
def test_a_conversation_queues_at_its_server_when_every_server_is_full_and_others_would_take_the_slots_freed(
        servers: dict[str, tuple[str, ...]], queued: int, at_home: bool) -> None:
    lua = f'print(paddler.queue_at_home("home", {servers_table(servers)}, {queued}))'
    assert run_lua(lua) == str(at_home).lower()


def test_the_queue_counts_requests_waiting_for_one_server_too() -> None:
    """/health's requests_buffered: the backend's queue and its servers' (where affinity_wait queues a turn)."""
    lua = """
local function stats_of(qcur) return function() return { qcur = qcur } end end
local backend = { get_stats = stats_of("3"),
                  servers = { home = { get_stats = stats_of("1") }, other = { get_stats = stats_of("0") } } }
print(paddler.queued(backend))"""
    assert run_lua(lua) == "4"
