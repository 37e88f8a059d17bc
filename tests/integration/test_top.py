"""``paddler-agent top`` in a real terminal: tmux runs it against the real agent watching real llama-servers,
and every look reads the screen back (``capture-pane``) the way a person would read it.

The tmux server has a socket of its own, so nothing here touches anyone else's tmux; it is killed at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.processes import AgentProcess, LlamaServer, wait_until

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
SESSION = "top"
PROMPT = "$ "  # capture-pane drops trailing blanks: on screen it reads "$"
WAIT = 20.0  # real seconds any one thing may take to reach the screen (top refreshes every 200ms here)
SGR = re.compile(r"\x1b\[[0-9;]*m")  # the colour and attribute escapes capture-pane -e writes
GREEN, RED = "\x1b[32m", "\x1b[31m"  # tmux writes only changes: a row's colour shows where it differs from above


class Terminal:
    """A 120x30 tmux pane running a plain bash, on a private tmux server."""

    def __init__(self, socket: str) -> None:
        binary = shutil.which("tmux")
        if binary is None:
            pytest.fail("tmux is not installed (apt-get install tmux)")
        self.base = [binary, "-L", socket]

    def tmux(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True, timeout=10).stdout

    def start(self) -> None:
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "30", "-s", SESSION, "-c", str(ROOT),
                  "-e", f"PS1={PROMPT}", "bash", "--norc", "--noprofile")

    def type(self, text: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", SESSION, "-l", text)
        if keys:
            self.tmux("send-keys", "-t", SESSION, *keys)

    def screen(self) -> list[str]:
        """What the pane shows now, one string per line, trailing blanks dropped."""
        return self.tmux("capture-pane", "-p", "-t", SESSION).rstrip("\n").split("\n")

    def colours(self, name: str) -> list[str]:
        """The colour and attribute escapes at the start of a backend's row, as the pane holds them."""
        for line in self.tmux("capture-pane", "-p", "-e", "-t", SESSION).split("\n"):
            if SGR.sub("", line).startswith(name + " "):
                return SGR.findall(line.partition(name)[0])
        return []

    def until(self, seen: Callable[[list[str]], bool], what: str) -> list[str]:
        """The first screen that shows ``what``; the last one seen goes into the failure otherwise."""
        def look() -> list[str] | None:
            lines = self.screen()
            return lines if seen(lines) else None

        try:
            return wait_until(look, WAIT, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the screen:\n" + "\n".join(self.screen())) from None

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal(f"paddler-top-test-{os.getpid()}")
    try:
        term.start()
        yield term
    finally:
        term.kill()


def row(lines: list[str], name: str) -> list[str]:
    """A backend's row as words (name, state, address, idle, processing, total, model, age...); [] if absent."""
    return next((line.split() for line in lines if line.startswith(name + " ")), [])


def line_after(lines: list[str], name: str) -> str:
    """The line below a backend's row: where its reason is."""
    for index, line in enumerate(lines[:-1]):
        if line.startswith(name + " "):
            return lines[index + 1]
    return ""


def test_top_shows_the_fleet_follows_a_server_going_down_and_quits_on_q(
        make_llama: Callable[..., LlamaServer], tmp_path: Path, terminal: Terminal) -> None:
    a = make_llama("llama-a", slots=2).start()
    b = make_llama("llama-b", slots=3).start()
    with AgentProcess(tmp_path, ["--backend", f"llama-a={a.address}", "--backend", f"llama-b={b.address}",
                                 "--interval", "200ms"]) as agent:
        terminal.type(f"{sys.executable} -m agentcheck top --agent {agent.management_url} --interval 200ms; "
                      "echo top exited $?", "Enter")

        # 1. Both rows, ready, with the slots each server really has, all idle; the totals add them up.
        lines = terminal.until(lambda lines: row(lines, "llama-a")[:7] == ["llama-a", "ready", a.address, "2", "0",
                                                                            "2", "llama-a"]
                               and row(lines, "llama-b")[:7] == ["llama-b", "ready", b.address, "3", "0", "3",
                                                                 "llama-b"],
                               what="both backends ready with all their slots idle")
        assert lines[0].startswith(f"paddler-agent top - {agent.management_url} - ")
        assert lines[1] == "slots idle 5  processing 0  total 5   requests buffered unknown   fleet usable"
        assert lines[3].split() == ["NAME", "STATE", "ADDRESS", "IDLE", "PROC", "TOTAL", "MODEL", "UPDATED"]
        assert GREEN in terminal.colours("llama-a")
        print("\n".join(lines))  # one frame for whoever reads the test log

        # 2. llama-b stops: its row turns unreachable, with the agent's reason under it; llama-a carries on.
        b.stop()
        lines = terminal.until(lambda lines: row(lines, "llama-b")[:6] == ["llama-b", "unreachable", b.address,
                                                                            "-", "-", "-"]
                               and line_after(lines, "llama-b") == "  reason: connection failed (Connection refused)",
                               what="llama-b shown down with the reason")
        assert row(lines, "llama-a")[:6] == ["llama-a", "ready", a.address, "2", "0", "2"]
        assert RED in terminal.colours("llama-b")
        assert lines[1] == "slots idle 2  processing 0  total 2   requests buffered unknown   fleet usable"
        print("\n".join(lines))

        # 3. q quits with status 0 and gives the shell its screen back: no table left, a prompt waiting.
        terminal.type("q")
        lines = terminal.until(lambda lines: lines[-2:] == ["top exited 0", "$"],
                               what="top to exit and the shell to prompt again")
        assert not any(line.startswith(("NAME ", "llama-a ", "llama-b ")) for line in lines), lines
