"""HAProxy's agent-check conversation: read an optional ``agent-send`` line, answer one line, close.

``parse_request`` is pure; ``AgentCheckProtocol`` is the thin asyncio adapter around it.
HAProxy connects every ``agent-inter``, writes ``agent-send`` verbatim (or nothing),
reads one ``\\n``-terminated line and closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from fleet.schema import MODEL_NAME_PATTERN, NAME_PATTERN

MAX_REQUEST_BYTES = 256


@dataclass(frozen=True)
class Request:
    """What HAProxy asked: a backend name, nothing (single-backend mode), or garbage. With model-aware routing
    each model's pool asks for its own server line: ``<name> model=<model>``."""

    name: str | None = None
    problem: str | None = None
    model: str | None = None


def parse_request(data: bytes, complete: bool) -> Request:
    """Interpret what arrived before the newline (or EOF/timeout).

    ``complete`` is False when the sender stopped without a newline before the deadline:
    a half-written name is refused rather than guessed at.
    """
    if len(data) > MAX_REQUEST_BYTES:
        return Request(problem=f"agent-send longer than {MAX_REQUEST_BYTES} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return Request(problem="agent-send is not ASCII text")
    text = text.strip(" \t\r\n")
    if not text:
        return Request()
    if not complete:
        return Request(problem="agent-send line not terminated in time")
    name, model_key, pool = text.partition(" model=")
    # The charset of fleet names, which also covers HAProxy's spare servers (paddler-spare-K), no fleet name.
    if not NAME_PATTERN.fullmatch(name):
        return Request(problem="agent-send is not a valid backend name")
    if not model_key:
        return Request(name=name)
    if not MODEL_NAME_PATTERN.fullmatch(pool):
        return Request(problem="agent-send names no valid model after model=")
    return Request(name=name, model=pool)


class AgentCheckProtocol(asyncio.Protocol):
    """One agent-check connection: collect at most one bounded line, answer it once, close.

    A plain ``asyncio.Protocol`` rather than streams: no task per connection, which matters
    at thousands of checks per second. The reply is sent on the first of: a newline, EOF,
    too many bytes, or ``wait`` seconds without a newline.
    """

    def __init__(self, answer: Callable[[Request], str], wait: float,
                 on_close: Callable[[AgentCheckProtocol], None] | None = None) -> None:
        self._answer = answer
        self._wait = wait
        self._on_close = on_close
        self._buffer = bytearray()
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a TCP server always hands us a Transport
        self._timer = asyncio.get_running_loop().call_later(self._wait, self._respond, False)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        if b"\n" in self._buffer or len(self._buffer) > MAX_REQUEST_BYTES:
            self._respond(True)

    def eof_received(self) -> bool:
        self._respond(True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
        if self._on_close is not None:
            self._on_close(self)

    def _respond(self, complete: bool) -> None:
        if self._answered or self._transport is None:
            return
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
        line = bytes(self._buffer).split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST_BYTES:
            complete = True
        self._transport.write(self._answer(parse_request(line, complete)).encode("ascii"))
        self._transport.close()  # flushes the reply first
