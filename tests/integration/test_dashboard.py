"""The agent's dashboard in a real headless Chromium, against real llama-servers and the real agent.

Each look at the page is a fresh ``chromium --dump-dom`` (devstack/browser.py): the page's own
JavaScript fetches /api/v1/agents and builds the table, so these tests see what an operator
sees, not what the API returns. Chromium is required: a missing binary fails the test.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

import pytest

from devstack import browser
from devstack.processes import AgentProcess, LlamaServer, wait_until
from tests.integration import clients

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

DUMP_WAIT_MS = 2500  # virtual time: polls at 0, 1 and 2 s, in about half a second of wall time
SCREENSHOT_WAIT_MS = 120_000  # 120 one-second polls: fills the history chart (a few seconds of wall time)
N_PREDICT = 3000  # two of these on one llama-server keep 2 slots busy for ~4-5 s
CTX_PER_SLOT = 4096  # room for N_PREDICT tokens without hitting the context limit
TOTALS = ("total-idle", "total-processing", "total-slots", "requests-buffered")


@dataclass
class Dashboard:
    """What the page shows: per-backend cells by class (``cell-idle`` -> ``idle``) and ids' text."""

    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    polls: int = 0
    row_classes: dict[str, str] = field(default_factory=dict)

    def cell(self, backend: str, name: str) -> str:
        return self.rows.get(backend, {}).get(name, "")


class _DashboardParser(HTMLParser):
    """Collects the text of ``tr[data-backend] td.cell-*`` and of the elements in ``TOTALS`` + ``status``."""

    def __init__(self) -> None:
        super().__init__()
        self.view = Dashboard()
        self._row: str | None = None
        self._capture: tuple[str, str, int] | None = None  # (kind:key, tag, depth of that tag)
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if self._capture is not None:
            key, captured_tag, depth = self._capture
            if tag == captured_tag:
                self._capture = (key, captured_tag, depth + 1)
            return
        if tag == "tr" and "data-backend" in attributes:
            self._row = attributes["data-backend"]
            self.view.rows[self._row] = {}
            self.view.row_classes[self._row] = attributes.get("class", "")
        elif tag == "td" and self._row is not None:
            cells = [c for c in attributes.get("class", "").split() if c.startswith("cell-")]
            if cells:
                self._start("cell:" + cells[0][len("cell-"):], tag)
        elif attributes.get("id") in (*TOTALS, "status"):
            if attributes["id"] == "status":
                self.view.polls = int(attributes.get("data-polls") or 0)
            self._start("id:" + attributes["id"], tag)

    def _start(self, key: str, tag: str) -> None:
        self._capture, self._text = (key, tag, 1), []

    def handle_endtag(self, tag: str) -> None:
        if self._capture is not None:
            key, captured_tag, depth = self._capture
            if tag != captured_tag:
                return
            if depth > 1:
                self._capture = (key, captured_tag, depth - 1)
                return
            text = " ".join("".join(self._text).split())
            kind, _, name = key.partition(":")
            if kind == "cell" and self._row is not None:
                self.view.rows[self._row][name] = text
            else:
                self.view.ids[name] = text
            self._capture = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._capture is not None:
            self._text.append(data)


def parse(dom: str) -> Dashboard:
    parser = _DashboardParser()
    parser.feed(dom)
    parser.close()
    return parser.view


class Page:
    """The dashboard URL; ``look()`` is one real browser visit, ``until(pred)`` re-visits until it holds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.visits = 0
        self.last: Dashboard | None = None

    def look(self, wait_ms: int = DUMP_WAIT_MS) -> Dashboard:
        self.visits += 1
        self.last = parse(browser.dump_dom(self.url, wait_ms))
        return self.last

    def until(self, predicate: Callable[[Dashboard], bool], what: str, timeout: float = 20.0) -> Dashboard:
        def check() -> Dashboard | None:
            view = self.look()
            return view if predicate(view) else None
        try:
            return wait_until(check, timeout=timeout, interval=0.1, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the page last showed rows={self.last and self.last.rows} "
                                 f"ids={self.last and self.last.ids}") from None


def require_chromium() -> str:
    """Fail, never skip: CI installs chromium, so a missing one is a broken environment."""
    try:
        return browser.chromium_binary()
    except browser.BrowserError as exc:
        pytest.fail(f"{exc} (scripts/test.sh installs it)", pytrace=False)


def test_dashboard_follows_slots_and_failures_in_a_real_browser(
        make_llama: Callable[..., LlamaServer], tmp_path: Path) -> None:
    require_chromium()  # before starting anything: a test failure, not a fixture error
    started = time.monotonic()
    a = make_llama("gpu-a", slots=2).start()
    b = make_llama("gpu-b", slots=4, ctx_per_slot=CTX_PER_SLOT).start()
    with AgentProcess(tmp_path, ["--backend", f"gpu-a={a.address}", "--backend", f"gpu-b={b.address}",
                                 "--interval", "200ms"]) as agent:
        page = Page(agent.management_url + "/")

        # 1. One row per backend, in fleet order, with the slots each server really has.
        view = page.until(lambda v: v.cell("gpu-a", "total") == "2" and v.cell("gpu-b", "total") == "4",
                          what="both backends to show up ready")
        assert list(view.rows) == ["gpu-a", "gpu-b"]
        for name, server, slots in (("gpu-a", a, "2"), ("gpu-b", b, "4")):
            row = view.rows[name]
            assert (row["idle"], row["processing"], row["total"]) == (slots, "0", slots), row
            assert (row["address"], row["model"]) == (server.address, name), row
            assert row["state"] == "none" and row["updated"].endswith("s ago"), row
            assert "row-ready" in view.row_classes[name]
        assert [view.ids[i] for i in TOTALS] == ["6", "0", "6", "unknown"]  # no balancer reports its buffer
        assert view.ids["status"].startswith("updated "), view.ids["status"]
        assert view.polls >= 2, f"the page polled {view.polls} time(s) in {DUMP_WAIT_MS} virtual ms"

        # 2. Two long completions on gpu-b: the page shows its slots busy while they run.
        with ThreadPoolExecutor(2) as pool:
            load = [pool.submit(clients.completion, b.url, N_PREDICT) for _ in range(2)]
            view = page.until(lambda v: v.cell("gpu-b", "processing") == "2",
                              what="gpu-b's processing cell to show 2 busy slots")
            assert (view.cell("gpu-b", "idle"), view.cell("gpu-b", "total")) == ("2", "4")
            assert view.ids["total-processing"] == "2" and view.ids["total-idle"] == "4"

            # 3. gpu-a dies: its row is flagged unreachable, its slots leave the totals.
            a.kill()
            view = page.until(lambda v: "unreachable" in v.cell("gpu-a", "state"),
                              what="gpu-a's row to show it unreachable")
            assert "row-problem" in view.row_classes["gpu-a"]
            assert view.cell("gpu-a", "idle") == view.cell("gpu-a", "total") == "–"
            assert view.cell("gpu-b", "total") == "4" and view.ids["total-slots"] == "4"

            shot_started = time.monotonic()
            browser.screenshot(page.url, SCREENSHOT, wait_ms=SCREENSHOT_WAIT_MS)
            shot_seconds = time.monotonic() - shot_started
            answers = [f.result(timeout=120) for f in load]
        assert [answer.status for answer in answers] == [200, 200]

    png = SCREENSHOT.read_bytes()
    assert png[:8] == PNG_SIGNATURE, f"{SCREENSHOT} is not a PNG"
    assert len(png) > 10_000, f"{SCREENSHOT} is only {len(png)} bytes: probably a blank page"
    print(f"{page.visits} page visits, screenshot {shot_seconds:.1f}s, "
          f"test {time.monotonic() - started:.1f}s -> {SCREENSHOT}")
