"""Debian's headless Chromium as a subprocess: the DOM a page ends up with, and a screenshot of it.

Used to test the agent's dashboard the way an operator sees it: real browser, real JavaScript,
real fetches against the real management server. No driver, no DevTools protocol, no Python
browser package: one ``chromium`` run per call, with a fresh profile in a temporary directory.

About ``wait_ms`` (``--virtual-time-budget``): Chromium runs the page on a *virtual* clock
and exits when ``wait_ms`` of virtual time have passed. Timers are fast-forwarded, but the
clock is paused while a network request is pending, so a page that polls with
``fetch`` + ``setTimeout(…, 1000)`` really does complete one fetch per virtual second
(checked: ``wait_ms=10000`` ran 10 polls against a live aiohttp server). Two consequences:

- it is *not* a real-time wait: 10 virtual seconds of 1-second polling take about half a
  second of wall time, so tests that need the page to see a later state must re-run
  ``dump_dom`` (with ``wait_until``), not raise ``wait_ms``;
- the page's ``Date.now()`` runs ahead of the wall clock by up to ``wait_ms`` (the dashboard
  corrects its ages with the server's ``Date`` header for this reason, and for clock skew).

A fetch that never answers pauses virtual time forever, so every run is bounded by a real
subprocess timeout, and the whole process group (browser, zygote, renderer, GPU process) is
killed when it expires.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

# --headless is Chromium's "new" headless mode (the only one in Debian's chromium >= 132).
FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    # Debian's /etc/chromium.d/dev-shm adds this only when /dev/shm is small, and its check breaks
    # ("[: unexpected operator") when findmnt prints two lines; containers often have a 64 MB /dev/shm.
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]

SETTLE_SECONDS = 30.0  # real-time allowance on top of wait_ms: start-up, fetches, rendering


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not finish in time; the message says which."""


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise BrowserError("the 'chromium' binary is not on PATH (shutil.which('chromium') found nothing): "
                           "apt-get install chromium")
    return path


def _run(url: str, wait_ms: int, extra: list[str], timeout: float | None) -> str:
    """Run one headless Chromium on ``url``; its stdout. Raises BrowserError on failure or timeout."""
    binary = chromium_binary()
    limit = timeout if timeout is not None else SETTLE_SECONDS + wait_ms / 1000
    with tempfile.TemporaryDirectory(prefix="paddler-chromium-", ignore_cleanup_errors=True) as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={int(wait_ms)}",
                   *extra, url]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=profile)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise BrowserError(f"{binary} did not finish within {limit:.0f}s on {url}:\n{_tail(stderr)}") from None
        finally:
            _kill_group(proc)  # renderer/GPU helpers that outlive the browser process
    if proc.returncode != 0:
        raise BrowserError(f"{binary} exited with status {proc.returncode} on {url}:\n{_tail(stderr)}")
    return stdout.decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group we started (start_new_session: its id is the browser's pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(stderr: bytes, lines: int = 20) -> str:
    return "\n".join(stderr.decode("utf-8", errors="replace").splitlines()[-lines:]) or "(no output)"


def dump_dom(url: str, wait_ms: int = 2000, timeout: float | None = None) -> str:
    """The page's serialized DOM after ``wait_ms`` of (virtual) time: what its scripts made of it."""
    dom = _run(url, wait_ms, ["--dump-dom"], timeout)
    if "<html" not in dom.lower():
        raise BrowserError(f"chromium printed no DOM for {url}: {dom[:200]!r}")
    return dom


def screenshot(url: str, path: str | Path, wait_ms: int = 2000, size: tuple[int, int] = (1280, 800),
               timeout: float | None = None) -> Path:
    """A PNG of the page after ``wait_ms`` of (virtual) time, ``size`` = viewport width, height."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # so a stale file can never pass for a new screenshot
    width, height = size
    _run(url, wait_ms, [f"--screenshot={path}", f"--window-size={width},{height}"], timeout)
    if not path.is_file():
        raise BrowserError(f"chromium exited without writing {path}")
    return path
