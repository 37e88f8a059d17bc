"""``paddler-agent top``: the screen as plain lines (no terminal), the URL check, and the fetch edge against
a stdlib HTTP server on loopback that answers whatever each test says."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import agentcheck.main as agent_main
from agentcheck import top
from agentcheck.top import FetchError, Line, Tone, agent_url, fetch, render
from devstack.processes import free_port

URL = "http://127.0.0.1:8085"
FETCHED_AT = 1795786146.0  # 13:29:06 UTC

FLEET: dict[str, Any] = {
    "agents": [
        {"name": "gpu1", "address": "10.0.0.11:8080", "standby": False, "state": "ready", "reason": "",
         "drained": True, "slots_idle": 3, "slots_processing": 1, "slots_total": 4, "slot_source": "slots",
         "model": "/models/qwen2.5-7b-instruct-q4_k_m.gguf", "last_update": 1795786145.2, "poll_seconds": 0.01,
         "agent_check_reply": "up ready 0% maxconn:4 #idle=3 processing=1 drained"},
        {"name": "gpu2", "address": "10.0.0.12:8080", "standby": False, "state": "unreachable",
         "reason": "GET /health: connection failed (Connection refused)", "drained": False,
         "slots_idle": 0, "slots_processing": 0, "slots_total": 0, "slot_source": None, "model": None,
         "last_update": 1795786141.0, "poll_seconds": 0.01, "agent_check_reply": "down #unreachable"},
        {"name": "spare", "address": "10.0.0.13:8080", "standby": True, "state": "ready", "reason": "",
         "drained": False, "slots_idle": 2, "slots_processing": 0, "slots_total": 2, "slot_source": "slots",
         "model": "tiny", "last_update": 1795786145.5, "poll_seconds": 0.01, "agent_check_reply": "up"},
    ],
    "totals": {"slots_idle": 2, "slots_processing": 1, "slots_total": 6},
    "usable": True,
    "requests_buffered": 0,
}

FLEET_SCREEN = [
    Line("paddler-agent top - http://127.0.0.1:8085 - 13:29:06 - q quits", Tone.HEADING),
    Line("slots idle 2  processing 1  total 6   requests buffered 0   fleet usable"),
    Line(""),
    Line("NAME             STATE           ADDRESS         IDLE  PROC  TOTAL  MODEL                     UPDATED",
         Tone.HEADING),
    Line("gpu1             ready, drained  10.0.0.11:8080     3     1      4  ...-instruct-q4_k_m.gguf  0.8s ago",
         Tone.DRAINED),
    Line("gpu2             unreachable     10.0.0.12:8080     -     -      -  -                         5.0s ago",
         Tone.DOWN),
    Line("  reason: GET /health: connection failed (Connection refused)", Tone.DOWN),
    Line("spare (standby)  ready           10.0.0.13:8080     2     0      2  tiny                      0.5s ago",
         Tone.READY),
]


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The header shows local time; pin it so the expected lines are literal."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def screen(body: dict[str, Any] | None, width: int = 120, height: int = 30, problem: str | None = None) -> list[Line]:
    return render(body, FETCHED_AT, width, height, url=URL, problem=problem)


# --- render ----------------------------------------------------------------------------------------


def test_a_fleet_of_three_shows_drained_down_with_its_reason_and_standby() -> None:
    assert screen(FLEET) == FLEET_SCREEN


def test_every_line_is_cut_to_the_terminal_width() -> None:
    assert screen(FLEET, width=40) == [
        Line("paddler-agent top - http://127.0.0.1:808", Tone.HEADING),
        Line("slots idle 2  processing 1  total 6   re"),
        Line(""),
        Line("NAME             STATE           ADDRESS", Tone.HEADING),
        Line("gpu1             ready, drained  10.0.0.", Tone.DRAINED),
        Line("gpu2             unreachable     10.0.0.", Tone.DOWN),
        Line("  reason: GET /health: connection failed", Tone.DOWN),
        Line("spare (standby)  ready           10.0.0.", Tone.READY),
    ]


def model(name: str, load: str | None, total: int = 0, processing: int = 0, declared: bool = False,
          discovered: bool = True) -> dict[str, Any]:
    return {"name": name, "load": load, "slots_idle": total - processing, "slots_processing": processing,
            "slots_total": total, "declared": declared, "discovered": discovered}


MODELS_FLEET: dict[str, Any] = {
    "agents": [
        {"name": "router", "address": "10.0.0.21:8080", "state": "ready", "slots_idle": 1, "slots_processing": 1,
         "slots_total": 2, "model": None, "router": True, "models_declared": False, "last_update": 1795786145.0,
         "models": [model("alpha", "loaded", 2, 1), model("beta", "loading"), model("gamma", "unloaded")]},
        {"name": "plain", "address": "10.0.0.22:8080", "state": "ready", "slots_idle": 4, "slots_processing": 0,
         "slots_total": 4, "model": "omega", "router": False, "models_declared": True, "last_update": 1795786145.0,
         "models": [model("alpha", None, declared=True, discovered=False), model("omega", "loaded", 4, 0)]},
        {"name": "down", "address": "10.0.0.23:8080", "state": "unreachable", "reason": "connection failed",
         "model": None, "router": False, "models_declared": True, "last_update": 1795786145.0,
         "models": [model("delta", None, declared=True, discovered=False)]},
        {"name": "single", "address": "10.0.0.24:8080", "state": "ready", "slots_idle": 1, "slots_processing": 0,
         "slots_total": 1, "model": "/models/tiny.gguf", "router": False, "models_declared": False,
         "last_update": 1795786145.0, "models": [model("/models/tiny.gguf", "loaded", 1, 0)]},
    ],
    "totals": {"slots_idle": 6, "slots_processing": 1, "slots_total": 7}, "usable": True, "requests_buffered": 0,
}


def test_models_show_their_load_state_and_where_the_fleet_and_discovery_disagree() -> None:
    assert screen(MODELS_FLEET)[3:] == [
        Line("NAME    STATE        ADDRESS         IDLE  PROC  TOTAL  MODEL               UPDATED", Tone.HEADING),
        Line("router  ready        10.0.0.21:8080     1     1      2  router, 1/3 loaded  1.0s ago", Tone.READY),
        Line("  models: alpha loaded 1/2 busy, beta loading, gamma unloaded", Tone.READY),
        Line("plain   ready        10.0.0.22:8080     4     0      4  2 models            1.0s ago", Tone.READY),
        Line("  models: alpha declared, NOT DISCOVERED, omega loaded 0/4 busy, NOT DECLARED", Tone.READY),
        Line("down    unreachable  10.0.0.23:8080     -     -      -  1 model             1.0s ago", Tone.DOWN),
        Line("  models: delta declared", Tone.DOWN),
        Line("  reason: connection failed", Tone.DOWN),
        Line("single  ready        10.0.0.24:8080     1     0      1  /models/tiny.gguf   1.0s ago", Tone.READY),
    ]


def test_odd_model_rows_are_skipped_and_names_made_printable() -> None:
    body = {"agents": [{"name": "r", "state": "ready", "router": True,
                        "models": ["x", {"name": 7}, {"name": "a\x1b[2J", "load": "loaded", "slots_total": "2"}]}]}

    assert screen(body)[4:] == [
        Line("r     ready  -           -     -      -  router, 1/1 loaded  never", Tone.READY),
        Line("  models: a?[2J loaded -/- busy", Tone.READY),
    ]


def test_a_short_terminal_says_how_many_lines_it_hides() -> None:
    assert screen(FLEET, height=6) == [
        *FLEET_SCREEN[:5],
        Line("... 3 more line(s): enlarge the terminal"),
    ]


@pytest.mark.parametrize(("width", "height"), [(0, 0), (0, 30), (120, 0), (-1, -1)])
def test_no_room_means_no_lines(width: int, height: int) -> None:
    assert screen(FLEET, width=width, height=height) == []


def test_a_one_cell_terminal_gets_one_character() -> None:
    assert screen(FLEET, width=1, height=1) == [Line("p", Tone.HEADING)]


def test_an_empty_fleet_says_so() -> None:
    body = {"agents": [], "totals": {"slots_idle": 0, "slots_processing": 0, "slots_total": 0},
            "usable": False, "requests_buffered": None}

    assert screen(body) == [
        Line("paddler-agent top - http://127.0.0.1:8085 - 13:29:06 - q quits", Tone.HEADING),
        Line("slots idle 0  processing 0  total 0   requests buffered unknown   fleet NOT usable: no ready backend"),
        Line(""),
        Line("NAME  STATE  ADDRESS  IDLE  PROC  TOTAL  MODEL  UPDATED", Tone.HEADING),
        Line("no backends configured"),
    ]


def test_missing_keys_and_odd_values_show_as_dashes() -> None:
    body = {"agents": [{}, "not a row", {"name": "a", "state": "ready", "slots_idle": "3", "slots_total": True,
                                         "last_update": "yesterday", "model": 7}],
            "totals": "nonsense"}

    assert screen(body) == [
        Line("paddler-agent top - http://127.0.0.1:8085 - 13:29:06 - q quits", Tone.HEADING),
        Line("slots idle -  processing -  total -   requests buffered unknown   fleet usable: unknown"),
        Line(""),
        Line("NAME  STATE  ADDRESS  IDLE  PROC  TOTAL  MODEL  UPDATED", Tone.HEADING),
        Line("-     -      -           -     -      -  -      never", Tone.DOWN),
        Line("-     -      -           -     -      -  -      never", Tone.DOWN),
        Line("a     ready  -           -     -      -  7      never", Tone.READY),
    ]


def test_terminal_control_characters_from_a_backend_are_not_passed_through() -> None:
    body = {"agents": [{"name": "a", "state": "error", "reason": "bad \x1b[2Jbody\n", "model": "m\x07"}]}

    lines = screen(body)

    assert lines[4] == Line("a     error  -           -     -      -  m?     never", Tone.DOWN)
    assert lines[5] == Line("  reason: bad ?[2Jbody?", Tone.DOWN)


@pytest.mark.parametrize(
    ("agent", "tone"),
    [
        ({"state": "ready", "slots_idle": 1}, Tone.READY),
        ({"state": "ready", "slots_idle": 0}, Tone.BUSY),  # full
        ({"state": "loading"}, Tone.BUSY),
        ({"state": "pending"}, Tone.BUSY),
        ({"state": "ready", "slots_idle": 1, "drained": True}, Tone.DRAINED),
        ({"state": "unreachable", "drained": True}, Tone.DOWN),  # down outranks drained
        ({"state": "unauthorized"}, Tone.DOWN),
        ({"state": "error"}, Tone.DOWN),
    ],
)
def test_rows_are_toned_by_state(agent: dict[str, Any], tone: Tone) -> None:
    assert top.tone(agent) is tone


def test_a_failed_fetch_shows_its_problem_above_the_last_good_table() -> None:
    problem = "13:29:09 cannot reach the agent: Connection refused; retrying every 1s"

    assert screen(FLEET, problem=problem) == [
        FLEET_SCREEN[0],
        Line(problem, Tone.PROBLEM),
        *FLEET_SCREEN[1:],
    ]


def test_before_any_good_fetch_only_the_problem_shows() -> None:
    assert screen(None, problem="13:29:06 cannot reach the agent: Connection refused; retrying every 1s") == [
        Line("paddler-agent top - http://127.0.0.1:8085 - no data yet - q quits", Tone.HEADING),
        Line("13:29:06 cannot reach the agent: Connection refused; retrying every 1s", Tone.PROBLEM),
    ]


@pytest.mark.parametrize(
    ("last_update", "shown"),
    [(FETCHED_AT - 0.04, "0.0s ago"), (FETCHED_AT - 9.94, "9.9s ago"), (FETCHED_AT - 10.4, "10s ago"),
     (FETCHED_AT - 3599, "3599s ago"), (FETCHED_AT - 7200, "2h ago"), (FETCHED_AT + 3, "0.0s ago"),
     (None, "never"), (True, "never")],
)
def test_last_update_is_an_age(last_update: Any, shown: str) -> None:
    assert top.age(last_update, FETCHED_AT) == shown


# --- the --agent URL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url"),
    [("http://127.0.0.1:8085", "http://127.0.0.1:8085"), ("http://127.0.0.1:8085/", "http://127.0.0.1:8085"),
     ("http://localhost:9000", "http://localhost:9000"), ("http://[::1]:8085", "http://[::1]:8085")],
)
def test_agent_url_is_http_host_port(given: str, url: str) -> None:
    assert agent_url(given) == url


@pytest.mark.parametrize(
    ("given", "problem"),
    [("https://127.0.0.1:8085", "expected http://HOST:PORT"),
     ("127.0.0.1:8085", "expected http://HOST:PORT"),
     ("http://127.0.0.1:8085/api/v1/agents", "expected http://HOST:PORT"),
     ("http://127.0.0.1:8085?x=1", "expected http://HOST:PORT"),
     ("http://user@127.0.0.1:8085", "expected http://HOST:PORT"),
     ("http://127.0.0.1", "expected host:port, got '127.0.0.1'"),
     ("http://127.0.0.1:0", "port must be 1-65535, got '0'"),
     ("http://bad_host:1", "'bad_host' is not a valid host name or IPv4 address")],
)
def test_other_agent_urls_are_refused(given: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        agent_url(given)

    assert str(info.value) == problem


def test_a_bad_agent_url_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = agent_main.main(["top", "--agent", "ftp://127.0.0.1:8085", "--once"])

    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", "paddler-agent top: --agent 'ftp://127.0.0.1:8085': expected http://HOST:PORT\n")


@pytest.mark.parametrize("interval", ["0s", "50ms", "2m", "soon"])
def test_an_interval_out_of_range_exits_2_with_one_line(interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = agent_main.main(["top", "--interval", interval])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("paddler-agent top: --interval: ")
    assert err.count("\n") == 1


def test_watching_needs_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    code = agent_main.main(["top", "--agent", "http://127.0.0.1:8085"])  # pytest's stdin is not a terminal

    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", "paddler-agent top: needs a terminal; --once prints one frame\n")


# --- fetch and --once against a real HTTP server ---------------------------------------------------


class Answer:
    status = 200
    body = b""


@pytest.fixture
def agent() -> Iterator[tuple[str, type[Answer]]]:
    """A loopback HTTP server answering GET /api/v1/agents with ``Answer``'s status and body."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = (Answer.status, Answer.body) if self.path == "/api/v1/agents" else (404, b"")
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [(421, b'{"error": {"code": 421, "message": "this agent does not serve that Host"}}',
      "the agent answered HTTP 421: this agent does not serve that Host"),
     (500, b"<html>oops</html>", "the agent answered HTTP 500"),
     (200, b"<html>a proxy's page</html>", "the agent answered something that is not JSON"),
     (200, b'{"agents": {}}', "the agent answered JSON without an agents list"),
     (200, b"[1, 2]", "the agent answered JSON without an agents list")],
)
def test_fetch_turns_a_bad_answer_into_one_line(agent: tuple[str, type[Answer]], status: int, body: bytes,
                                                problem: str) -> None:
    url, answer = agent
    answer.status, answer.body = status, body

    with pytest.raises(FetchError) as info:
        fetch(url, timeout=5.0)

    assert str(info.value) == problem


def test_fetch_of_an_agent_that_is_not_there_says_so() -> None:
    with pytest.raises(FetchError) as info:
        fetch(f"http://127.0.0.1:{free_port()}", timeout=5.0)

    assert str(info.value) == "cannot reach the agent: Connection refused"


def test_once_prints_one_frame_without_colours(agent: tuple[str, type[Answer]], capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    url, answer = agent
    answer.status, answer.body = 200, b'{"agents": [{"name": "a", "address": "127.0.0.1:1", "state": "loading", ' \
                                      b'"reason": "model loading"}], "usable": false}'
    monkeypatch.setenv("COLUMNS", "60")

    code = agent_main.main(["top", "--agent", url, "--once"])

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == [
        "slots idle -  processing -  total -   requests buffered unkn",
        "",
        "NAME  STATE    ADDRESS      IDLE  PROC  TOTAL  MODEL  UPDATE",  # cut at 60 columns
        "a     loading  127.0.0.1:1     -     -      -  -      never",
        "  reason: model loading",
    ]
    assert out.splitlines()[0].startswith(f"paddler-agent top - {url} - ")


def test_once_against_no_agent_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    code = agent_main.main(["top", "--agent", url, "--once"])

    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", f"paddler-agent top: {url}: cannot reach the agent: Connection refused\n")
