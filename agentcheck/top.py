"""``paddler-agent top``: the fleet table in a terminal, read from the management API only.

``render`` is the whole screen as plain data (lines and how to colour them), so it is tested without a
terminal; ``fetch`` and ``_watch`` are the thin edges that talk HTTP and curses. The API is polled, never
trusted: any row may lack keys or carry odd types, and text from backends is made printable before it
reaches the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import enum
import http.client
import json
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.schema import AgentConfig, duration, parse_address

PROG = "paddler-agent top"
DEFAULT_AGENT_URL = f"http://{AgentConfig().management}"
AGENTS_PATH = "/api/v1/agents"
parse_interval = duration(0.1, 60)  # faster is pointless on a screen; slower and it is no longer live
MAX_BODY = 8 * 1024 * 1024  # a fleet of 1024 backends is well under 1 MiB of JSON
MODEL_WIDTH = 24  # longer model names (paths) keep their tail: the file name tells models apart
WAITING = frozenset({"pending", "loading"})  # not down: will be ready without anyone doing anything
HEADINGS = ("NAME", "STATE", "ADDRESS", "IDLE", "PROC", "TOTAL", "MODEL", "UPDATED")
NUMERIC = frozenset({"IDLE", "PROC", "TOTAL"})


class Tone(enum.Enum):
    """How a line is drawn; the curses edge maps tones to colours when the terminal has them."""

    PLAIN = "plain"
    HEADING = "heading"
    READY = "ready"  # green
    BUSY = "busy"  # yellow: no idle slot, or not ready yet
    DOWN = "down"  # red
    DRAINED = "drained"  # grey
    PROBLEM = "problem"  # the API itself: unreachable, non-200, not JSON


@dataclass(frozen=True)
class Line:
    text: str
    tone: Tone = Tone.PLAIN


class FetchError(Exception):
    """The agent could not be asked, or its answer is not the fleet: one line for the status bar."""


# --- the pure core -------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """Backend words reach the screen: an escape sequence in a reason must not drive the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return _printable(str(value))


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def clock(moment: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(moment))


def age(last_update: Any, now: float) -> str:
    """Like the web dashboard: tenths of a second while fresh, whole seconds, then hours."""
    if isinstance(last_update, bool) or not isinstance(last_update, (int, float)):
        return "never"
    seconds = max(0.0, now - last_update)
    if seconds < 10:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{round(seconds)}s ago"
    return f"{round(seconds / 3600)}h ago"


def _model(value: Any) -> str:
    text = _text(value)
    return text if len(text) <= MODEL_WIDTH else "..." + text[-(MODEL_WIDTH - 3):]


def _models(agent: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The backend's model rows that have a name; [] from an agent that reports none (or an older agent)."""
    raw = agent.get("models")
    return [model for model in (raw if isinstance(raw, list) else [])
            if isinstance(model, Mapping) and isinstance(model.get("name"), str)]


def _models_listed(agent: Mapping[str, Any]) -> bool:
    """Worth a line of their own: a router's, several, or the fleet declares them (declared and discovered may
    differ). A plain server's one discovered model fits in the MODEL column."""
    models = _models(agent)
    return bool(models) and (agent.get("router") is True or agent.get("models_declared") is True or len(models) > 1)


def _model_cell(agent: Mapping[str, Any]) -> str:
    models = _models(agent)
    if not _models_listed(agent):
        return _model(models[0]["name"] if models else agent.get("model"))
    if agent.get("router") is True:
        loaded = sum(1 for model in models if model.get("load") == "loaded")
        return f"router, {loaded}/{len(models)} loaded"
    return f"{len(models)} model{'s' if len(models) > 1 else ''}"


def _model_text(model: Mapping[str, Any], ready: bool, declaring: bool) -> str:
    """``alpha loaded 1/2 busy``, ``beta unloaded``; what the fleet declares and discovery disagree on, in
    capitals."""
    text = _printable(model["name"])
    load = model.get("load")
    if model.get("discovered") is False:
        text += " declared, NOT DISCOVERED" if ready else " declared"
    elif load == "loaded":
        text += f" loaded {_count(model.get('slots_processing'))}/{_count(model.get('slots_total'))} busy"
    else:
        text += f" {_text(load)}"
    if declaring and model.get("declared") is False:
        text += ", NOT DECLARED"
    return text


def models_line(agent: Mapping[str, Any]) -> str:
    ready = agent.get("state") == "ready"
    declaring = agent.get("models_declared") is True
    return "  models: " + ", ".join(_model_text(model, ready, declaring) for model in _models(agent))


def tone(agent: Mapping[str, Any]) -> Tone:
    """Down beats drained or leaving (the operator must see it), drained beats full."""
    state = agent.get("state")
    if state in WAITING:
        return Tone.BUSY
    if state != "ready":
        return Tone.DOWN
    if agent.get("drained") is True or agent.get("leaving") is True:
        return Tone.DRAINED
    return Tone.BUSY if agent.get("slots_idle") == 0 else Tone.READY


def _cells(agent: Mapping[str, Any], now: float) -> tuple[str, ...]:
    ready = agent.get("state") == "ready"
    name = _text(agent.get("name")) + (" (standby)" if agent.get("standby") is True else "")
    state = _text(agent.get("state")) + "".join(f", {flag}" for flag in ("drained", "leaving")
                                                if agent.get(flag) is True)
    slots = [_count(agent.get(key)) if ready else "-" for key in ("slots_idle", "slots_processing", "slots_total")]
    return (name, state, _text(agent.get("address")), *slots, _model_cell(agent),
            age(agent.get("last_update"), now))


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Heading and rows, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in (HEADINGS, *rows)) for i in range(len(HEADINGS))]
    return ["  ".join(cell.rjust(width) if heading in NUMERIC else cell.ljust(width)
                      for heading, cell, width in zip(HEADINGS, row, widths, strict=True)).rstrip()
            for row in (HEADINGS, *rows)]


def _totals(body: Mapping[str, Any]) -> str:
    totals = body.get("totals")
    totals = totals if isinstance(totals, Mapping) else {}
    buffered = body.get("requests_buffered")
    usable = body.get("usable")
    fleet = "usable" if usable is True else "NOT usable: no ready backend" if usable is False else "usable: unknown"
    return (f"slots idle {_count(totals.get('slots_idle'))}  processing {_count(totals.get('slots_processing'))}"
            f"  total {_count(totals.get('slots_total'))}   "
            f"requests buffered {'unknown' if buffered is None else _count(buffered)}   fleet {fleet}")


def render(body: Mapping[str, Any] | None, fetched_at: float, width: int, height: int, *,
           url: str, problem: str | None = None) -> list[Line]:
    """The screen for ``body`` (the last good ``/api/v1/agents`` answer, fetched at ``fetched_at``), cut to
    ``width`` x ``height``. ``problem`` is why the latest fetch failed; the last good table stays below it."""
    if width < 1 or height < 1:
        return []
    lines = [Line(f"{PROG} - {url} - {'no data yet' if body is None else clock(fetched_at)} - q quits",
                  Tone.HEADING)]
    if problem is not None:
        lines.append(Line(_printable(problem), Tone.PROBLEM))
    if body is not None:
        raw = body.get("agents")
        agents = [agent if isinstance(agent, Mapping) else {} for agent in (raw if isinstance(raw, list) else [])]
        table = _table([_cells(agent, fetched_at) for agent in agents])
        lines += [Line(_totals(body)), Line(""), Line(table[0], Tone.HEADING)]
        for text, agent in zip(table[1:], agents, strict=True):
            lines.append(Line(text, tone(agent)))
            if _models_listed(agent):
                lines.append(Line(models_line(agent), tone(agent)))
            if agent.get("reason"):  # on a line of its own: a reason is long, and it is what the operator needs
                lines.append(Line(f"  reason: {_printable(str(agent['reason']))}", tone(agent)))
        if not agents:
            lines.append(Line("no backends configured"))
    if len(lines) > height > 1:
        hidden = len(lines) - height + 1
        lines = [*lines[:height - 1], Line(f"... {hidden} more line(s): enlarge the terminal")]
    return [Line(line.text[:width], line.tone) for line in lines[:height]]


# --- the edges: command line, HTTP, curses --------------------------------------------------------


def agent_url(text: str) -> str:
    """``http://HOST:PORT`` (a trailing slash allowed), normalised; ValueError says what is wrong."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "http" or parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("expected http://HOST:PORT")
    return f"http://{parse_address(parts.netloc)}"


def _error_message(body: bytes) -> str:
    """The agent's own JSON error message, if that is what it sent."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        return ""
    return f": {message}" if isinstance(message, str) else ""


def fetch(url: str, timeout: float) -> dict[str, Any]:
    """One ``GET /api/v1/agents``, straight to the agent (no proxy from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + AGENTS_PATH, timeout=timeout) as response:
            raw = response.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"the agent answered HTTP {exc.code}{_error_message(exc.read(4096))}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        raise FetchError(f"cannot reach the agent: {reason}") from None
    except TimeoutError:
        raise FetchError(f"the agent did not answer within {timeout:g}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"the agent's answer was cut short: {exc or type(exc).__name__}") from None
    if len(raw) > MAX_BODY:
        raise FetchError(f"the agent's answer is over {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise FetchError("the agent answered something that is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("agents"), list):
        raise FetchError("the agent answered JSON without an agents list")
    return body


def _palette() -> dict[Tone, int]:
    """curses attributes per tone: a colour each where the terminal has colours; drained rows dim either way."""
    palette = dict.fromkeys(Tone, curses.A_NORMAL)
    palette[Tone.HEADING] = curses.A_BOLD
    palette[Tone.PROBLEM] = curses.A_REVERSE
    if curses.has_colors():
        curses.start_color()
        try:
            curses.use_default_colors()
            background = -1  # the terminal's own, so light and dark themes both stay readable
        except curses.error:
            background = curses.COLOR_BLACK
        grey = 8 if curses.COLORS > 8 else curses.COLOR_WHITE  # bright black where there is one
        for number, (kind, colour) in enumerate(((Tone.READY, curses.COLOR_GREEN), (Tone.BUSY, curses.COLOR_YELLOW),
                                                 (Tone.DOWN, curses.COLOR_RED), (Tone.DRAINED, grey),
                                                 (Tone.PROBLEM, curses.COLOR_RED)), start=1):
            curses.init_pair(number, colour, background)
            palette[kind] |= curses.color_pair(number)
    palette[Tone.DRAINED] |= curses.A_DIM
    return palette


def _draw(screen: curses.window, lines: Sequence[Line], palette: Mapping[Tone, int]) -> None:
    screen.erase()
    width = screen.getmaxyx()[1]
    for y, line in enumerate(lines):
        # Filling the bottom-right cell draws it, then fails to move the cursor past the screen's end.
        with contextlib.suppress(curses.error):
            screen.addnstr(y, 0, line.text, width, palette[line.tone])
    screen.refresh()


def _watch(screen: curses.window, url: str, interval: float) -> None:
    """Fetch every ``interval``, redraw on every fetch and resize, until ``q``."""
    with contextlib.suppress(curses.error):  # some terminals cannot hide the cursor; it only looks untidy
        curses.curs_set(0)
    palette = _palette()
    timeout = min(max(interval, 1.0), 5.0)
    body: dict[str, Any] | None = None
    fetched_at = time.time()
    problem: str | None = None
    next_fetch = time.monotonic()
    while True:
        if time.monotonic() >= next_fetch:
            attempt = time.time()
            try:
                body, fetched_at, problem = fetch(url, timeout), attempt, None
            except FetchError as exc:
                problem = f"{clock(attempt)} {exc}; retrying every {interval:g}s"
            next_fetch = time.monotonic() + interval
        height, width = screen.getmaxyx()
        _draw(screen, render(body, fetched_at, width, height, url=url, problem=problem), palette)
        screen.timeout(max(0, round((next_fetch - time.monotonic()) * 1000)))
        if screen.getch() in (ord("q"), ord("Q")):
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The agent's fleet table in a terminal, "
                                     "refreshed from its management API (GET /api/v1/agents). q or Ctrl-C quits.")
    parser.add_argument("--agent", metavar="URL", default=DEFAULT_AGENT_URL,
                        help=f"the agent's management address (default {DEFAULT_AGENT_URL})")
    parser.add_argument("--interval", metavar="DURATION", default="1s", help="refresh every 100ms-1m (default 1s)")
    parser.add_argument("--once", action="store_true", help="print one frame without colours and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = agent_url(args.agent)
    except ValueError as exc:
        print(f"{PROG}: --agent {args.agent!r}: {exc}", file=sys.stderr)
        return 2
    try:
        interval = parse_interval(args.interval)
    except ValueError as exc:
        print(f"{PROG}: --interval: {exc}", file=sys.stderr)
        return 2
    if args.once:
        try:
            body = fetch(url, timeout=5.0)
        except FetchError as exc:
            print(f"{PROG}: {url}: {exc}", file=sys.stderr)
            return 1
        width = shutil.get_terminal_size(fallback=(200, 0)).columns  # piped: wide enough for the reasons
        for line in render(body, time.time(), width, sys.maxsize, url=url):
            print(line.text)
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(f"{PROG}: needs a terminal; --once prints one frame", file=sys.stderr)
        return 1
    try:
        curses.wrapper(_watch, url, interval)
    except KeyboardInterrupt:  # Ctrl-C is a way to quit; curses.wrapper has restored the terminal
        pass
    except curses.error as exc:
        print(f"{PROG}: this needs a terminal ({exc}); --once prints one frame", file=sys.stderr)
        return 1
    return 0
