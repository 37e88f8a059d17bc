"""Debian's headless Chromium as a subprocess, kept open on one page and driven over a pipe.

Used to test the agent's dashboard the way an operator sees it: real browser, real JavaScript,
real fetches against the real management server, real CSS. No driver and no Python browser
package: Chromium's own DevTools protocol over ``--remote-debugging-pipe`` (JSON messages,
each ended by a NUL byte; the browser reads commands on its fd 3 and writes answers on fd 4).

``LivePage`` opens the URL once and leaves the page running on the real clock, so its own
polling goes on as it would for a person looking at it. A test reads what the page shows with
``evaluate`` (a JavaScript expression: text of cells, ``getComputedStyle`` colours) as often
as it likes, and takes ``screenshot`` of exactly the state it asserted.

Every read is bounded by a real timeout; ``close`` kills the whole process group (browser,
zygote, renderer, GPU process), and so does leaving the ``with`` block.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    "--remote-debugging-pipe",
]

# Copies both ends above fd 9 first, so neither can be overwritten by the other's dup2.
_TRAMPOLINE = ("import fcntl, os, sys; r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]); "
               "os.dup2(r, 3); os.dup2(w, 4); os.execv(sys.argv[3], sys.argv[3:])")
COMMAND_TIMEOUT = 30.0  # real seconds for one protocol command (start-up, navigation, a screenshot)


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not answer in time; the message says which."""


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise BrowserError("the 'chromium' binary is not on PATH (shutil.which('chromium') found nothing): "
                           "apt-get install chromium")
    return path


class LivePage:
    """One headless Chromium showing ``url`` in a ``size`` (width, height) viewport until ``close()``."""

    def __init__(self, url: str, size: tuple[int, int] = (1280, 800)) -> None:
        self.url = url
        self.size = size
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._to_browser = -1
        self._from_browser = -1
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        self._log: Path | None = None

    def __enter__(self) -> LivePage:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        binary = chromium_binary()
        self._profile = tempfile.TemporaryDirectory(prefix="paddler-chromium-", ignore_cleanup_errors=True)
        command_r, command_w = os.pipe()  # we write commands, the browser reads them on fd 3
        answer_r, answer_w = os.pipe()  # the browser writes answers on fd 4, we read them
        width, height = self.size
        # A tiny Python trampoline puts the pipe ends on fds 3 and 4 (inheritable after dup2) and execs
        # Chromium; /usr/bin/chromium is a shell wrapper that execs the real binary, keeping both.
        command = [sys.executable, "-c", _TRAMPOLINE, str(command_r), str(answer_w), binary, *FLAGS,
                   f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"]
        self._log = Path(self._profile.name) / "chromium.log"  # a file, not a pipe: nothing to drain
        try:
            with self._log.open("wb") as log:
                self._proc = subprocess.Popen(command, pass_fds=(command_r, answer_w), stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=log, start_new_session=True,
                                              cwd=self._profile.name)
        finally:
            os.close(command_r)
            os.close(answer_w)
        self._to_browser, self._from_browser = command_w, answer_r
        try:
            target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self._send("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            self._send("Page.enable")
            navigation = self._send("Page.navigate", {"url": self.url})
            if navigation.get("errorText"):
                raise BrowserError(f"chromium could not open {self.url}: {navigation['errorText']}")
            deadline = time.monotonic() + COMMAND_TIMEOUT
            while self.evaluate("document.readyState") != "complete":
                if time.monotonic() > deadline:
                    raise BrowserError(f"{self.url} did not finish loading within {COMMAND_TIMEOUT:.0f}s")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page (JSON-serialisable; promises awaited)."""
        answer = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            message = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"the page threw while evaluating {expression[:80]!r}: {message}")
        return answer["result"].get("value")

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the viewport as it is now."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # so a stale file can never pass for a new screenshot
        data = self._send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                os.close(fd)
        self._to_browser = self._from_browser = -1
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # start_new_session: its id is the browser's pid
            except (ProcessLookupError, PermissionError):
                pass
            self._proc.wait()
            self._proc = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def _send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command (to the page's session once attached) and return its ``result``."""
        if self._to_browser < 0:
            raise BrowserError(f"{method}: the browser is closed")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") != self._next_id:
                continue  # an event, or the answer to a command that already timed out
            if "error" in reply:
                raise BrowserError(f"{method}: {reply['error'].get('message')}")
            return reply.get("result", {})

    def _read(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([self._from_browser], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise BrowserError(f"chromium did not answer {method} within {COMMAND_TIMEOUT:.0f}s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited during {method}: {self._stderr_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _stderr_tail(self, lines: int = 20) -> str:
        if self._log is None or not self._log.is_file():
            return "(no output)"
        text = self._log.read_bytes().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"
