"""The agent's dashboard in a real headless Chromium, against real llama-servers and the real agent.

One browser stays open on the page (devstack/browser.py) while its own JavaScript polls
/api/v1/agents on the real clock. Every look reads what is *rendered*: the table as a person
reads it (column headings and cell text as displayed, ``innerText``, so CSS upper-casing
included), the total tiles by their labels, and the colours the browser computed for a row in
trouble, compared with the literal colours the page's CSS defines. Nothing here reads the API.
Chromium is required: a missing binary fails the test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack import browser
from devstack.processes import AgentProcess, LlamaServer, wait_until
from tests.integration import clients

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

N_PREDICT = 3000  # two of these on one llama-server keep 2 slots busy for ~4-5 s
CTX_PER_SLOT = 4096  # room for N_PREDICT tokens without hitting the context limit
NO_NUMBER = "\u2013"  # the en dash the page shows instead of a slot count it does not trust
WAIT = 20.0  # real seconds any one thing may take to appear on the page (it polls every second)

# The colours dashboard.html's CSS gives these, as getComputedStyle reports them.
BAD = "rgb(198, 40, 40)"  # --bad: #c62828 (problem badge, reason text, the row's left bar)
BAD_BG = "rgb(253, 236, 236)"  # --bad-bg: #fdecec (every cell of a row in trouble)
MUTED = "rgb(107, 114, 128)"  # --muted: #6b7280 ("none" issues, the dashes of a row in trouble)
WHITE = "rgb(255, 255, 255)"  # .badge.bad text
INK = "rgb(29, 35, 48)"  # --ink: #1d2330 (numbers of a ready row)
TRANSPARENT = "rgba(0, 0, 0, 0)"  # cells of a ready row: no background of their own, the white card shows

# What the page shows, read from the rendered DOM. Rows are keyed by the name a person reads in
# the first column; cells by the column heading above them.
LOOK = r"""
(() => {
  const seen = (node) => node.innerText.replace(/\s+/g, " ").trim();
  const shown = (node) => node.getClientRects().length > 0 && getComputedStyle(node).visibility === "visible";
  const headings = [...document.querySelectorAll("#backends thead th")].map(seen);
  const rows = [...document.querySelectorAll("#backends tbody tr")].filter(shown).map((tr) => {
    const tds = [...tr.children];
    const cells = Object.fromEntries(tds.map((td, i) => [headings[i] ?? String(i), seen(td)]));
    const colours = Object.fromEntries(tds.map((td, i) => [headings[i] ?? String(i), {
      color: getComputedStyle(td).color, background: getComputedStyle(td).backgroundColor}]));
    const issues = tds[headings.indexOf("ISSUES")];
    const badge = issues && issues.querySelector(".badge");
    const reason = issues && issues.querySelector(".reason");
    const none = issues && issues.querySelector(".none");
    return {
      cells, colours,
      bar: getComputedStyle(tds[0]).boxShadow,
      badge: badge && {text: seen(badge), color: getComputedStyle(badge).color,
                       background: getComputedStyle(badge).backgroundColor},
      reason: reason && {text: seen(reason), color: getComputedStyle(reason).color},
      none: none && {text: seen(none), color: getComputedStyle(none).color},
    };
  });
  const totals = Object.fromEntries([...document.querySelectorAll("#totals .tile")].filter(shown)
    .map((tile) => [seen(tile.querySelector(".label")), seen(tile.querySelector(".value"))]));
  return {headings, rows, totals, status: seen(document.getElementById("status"))};
})()
"""


@dataclass
class View:
    """One look at the rendered page."""

    headings: list[str]
    rows: list[dict[str, Any]]
    totals: dict[str, str]
    status: str

    @property
    def names(self) -> list[str]:
        return [row["cells"].get("NAME", "") for row in self.rows]

    def row(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["cells"].get("NAME") == name:
                return row
        raise AssertionError(f"no row named {name!r} on the page; it shows {self.names}")

    def cell(self, name: str, heading: str) -> str:
        for row in self.rows:
            if row["cells"].get("NAME") == name:
                return row["cells"].get(heading, "")
        return ""

    def numbers(self, name: str) -> tuple[str, str, str]:
        return (self.cell(name, "IDLE"), self.cell(name, "PROCESSING"), self.cell(name, "TOTAL"))


class Dashboard:
    """The open page; ``look()`` reads it now, ``until(pred)`` re-reads it until ``pred`` holds (bounded)."""

    def __init__(self, page: browser.LivePage) -> None:
        self.page = page
        self.looks = 0
        self.last: View | None = None

    def look(self) -> View:
        self.looks += 1
        self.last = View(**self.page.evaluate(LOOK))
        return self.last

    def until(self, predicate: Callable[[View], bool], what: str, timeout: float = WAIT) -> View:
        def check() -> View | None:
            view = self.look()
            return view if predicate(view) else None
        try:
            return wait_until(check, timeout=timeout, interval=0.1, what=what)
        except TimeoutError as exc:
            last = self.last
            raise AssertionError(f"{exc}; the page last showed rows={last and [r['cells'] for r in last.rows]} "
                                 f"totals={last and last.totals} status={last and last.status!r}") from None


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
                                 "--interval", "200ms"]) as agent, \
            browser.LivePage(agent.management_url + "/") as page:
        dashboard = Dashboard(page)

        # 1. One row per backend, in fleet order, each with the slots its server really has, all idle.
        view = dashboard.until(lambda v: v.numbers("gpu-a") == ("2", "0", "2")
                               and v.numbers("gpu-b") == ("4", "0", "4"),
                               what="both backends to show up ready with all their slots idle")
        assert view.headings == ["NAME", "ISSUES", "ADDRESS", "LAST UPDATE", "IDLE", "PROCESSING", "TOTAL",
                                 "MODEL"]
        assert view.names == ["gpu-a", "gpu-b"]
        for name, server in (("gpu-a", a), ("gpu-b", b)):
            row = view.row(name)
            assert row["cells"]["ADDRESS"] == server.address, row["cells"]
            assert row["cells"]["MODEL"] == name, row["cells"]  # LlamaServer serves the model under its name
            assert row["cells"]["ISSUES"] == "none", row["cells"]
            assert row["none"] == {"text": "none", "color": MUTED}, row
            assert row["cells"]["LAST UPDATE"].endswith(" s ago"), row["cells"]
            assert row["badge"] is None and row["reason"] is None, row
            assert {c["background"] for c in row["colours"].values()} == {TRANSPARENT}, row["colours"]
            assert row["colours"]["IDLE"]["color"] == INK, row["colours"]
            assert row["bar"] == "none", row
        assert view.totals == {"IDLE SLOTS": "6", "PROCESSING SLOTS": "0", "TOTAL SLOTS": "6",
                               "REQUESTS BUFFERED": "unknown"}  # no balancer reports its buffer
        assert view.status.startswith("updated "), view.status

        # 2. gpu-a dies: its row says unreachable, in the problem colours, and its slots leave the totals.
        a.kill()
        view = dashboard.until(lambda v: v.row("gpu-a")["badge"] is not None
                               and v.row("gpu-a")["badge"]["text"] == "UNREACHABLE",
                               what="gpu-a's row to show an UNREACHABLE badge")
        down = view.row("gpu-a")
        assert down["badge"] == {"text": "UNREACHABLE", "color": WHITE, "background": BAD}, down
        assert down["reason"] is not None and "Connection refused" in down["reason"]["text"], down
        assert down["reason"]["color"] == BAD, down
        assert down["cells"]["ISSUES"].startswith("UNREACHABLE"), down["cells"]
        assert down["none"] is None, down
        assert view.numbers("gpu-a") == (NO_NUMBER, NO_NUMBER, NO_NUMBER)  # no slot numbers for a server that is down
        assert down["colours"]["IDLE"]["color"] == MUTED, down["colours"]
        assert {c["background"] for c in down["colours"].values()} == {BAD_BG}, down["colours"]
        assert down["bar"] == f"{BAD} 4px 0px 0px 0px inset", down["bar"]
        assert down["cells"]["ADDRESS"] == a.address, down["cells"]
        # gpu-b is untouched, and now the only slots in the totals (one poll renders table and totals).
        assert view.numbers("gpu-b") == ("4", "0", "4")
        assert view.row("gpu-b")["badge"] is None
        assert {c["background"] for c in view.row("gpu-b")["colours"].values()} == {TRANSPARENT}
        assert view.totals == {"IDLE SLOTS": "4", "PROCESSING SLOTS": "0", "TOTAL SLOTS": "4",
                               "REQUESTS BUFFERED": "unknown"}

        # 3. Two long completions on gpu-b: the page shows two of its slots processing, as the
        #    server's own /slots does, and the totals move with them; gpu-a stays down.
        with ThreadPoolExecutor(2) as pool:
            load = [pool.submit(clients.completion, b.url, N_PREDICT) for _ in range(2)]
            view = dashboard.until(lambda v: v.numbers("gpu-b") == ("2", "2", "4"),
                                   what="gpu-b's row to show 2 idle, 2 processing, 4 total")
            assert b.busy_slots() == 2, "the page shows 2 processing but the server's /slots disagrees"
            assert view.totals == {"IDLE SLOTS": "2", "PROCESSING SLOTS": "2", "TOTAL SLOTS": "4",
                                   "REQUESTS BUFFERED": "unknown"}
            assert view.row("gpu-a")["badge"]["text"] == "UNREACHABLE"
            assert view.numbers("gpu-a") == (NO_NUMBER, NO_NUMBER, NO_NUMBER)
            page.screenshot(SCREENSHOT)  # exactly the state just asserted: gpu-a down, gpu-b busy
            answers = [f.result(timeout=120) for f in load]
        assert [answer.status for answer in answers] == [200, 200]

        # 4. The load is over: gpu-b's slots are all idle again on the page.
        view = dashboard.until(lambda v: v.numbers("gpu-b") == ("4", "0", "4"),
                               what="gpu-b's row to show its slots idle again")
        assert view.totals == {"IDLE SLOTS": "4", "PROCESSING SLOTS": "0", "TOTAL SLOTS": "4",
                               "REQUESTS BUFFERED": "unknown"}

    png = SCREENSHOT.read_bytes()
    assert png[:8] == PNG_SIGNATURE, f"{SCREENSHOT} is not a PNG"
    print(f"{dashboard.looks} looks at the page, test {time.monotonic() - started:.1f}s -> {SCREENSHOT}")
