"""A small HTTP/1.1 GET client on keep-alive connections, for polling many backends cheaply.

Why not aiohttp: the agent polls every backend once per interval, 1,000 backends means
1,000 ``GET /slots`` a second, and aiohttp's per-request machinery (URL objects, request
and response objects, stream readers, timers, connector bookkeeping) cost about a third
of a core for that alone (profile in docs/agent.md, "The agent's cost"). Polling needs
very little of HTTP: GET, a few headers, a bounded body, and connection reuse.

What it does:

- one ``asyncio.Protocol`` per connection, reused for the next request to the same
  host and port while the server keeps it alive (at most ``MAX_IDLE_PER_HOST`` idle);
- bodies framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the
  connection, refused once larger than ``max_body`` bytes;
- ``Connection: close`` (or HTTP/1.0 without keep-alive) closes after the response;
- a request sent on a reused connection that the server had already closed (keep-alive
  timeout crossing our request) is retried once on a new connection: GET is idempotent;
- ``timeout`` bounds connecting plus the whole response; cancellation closes the connection,
  since its state is then unknown.

Never raises for anything the server does: every outcome is a ``Response`` or an ``HttpError``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

MAX_HEAD_BYTES = 64 * 1024
MAX_IDLE_PER_HOST = 2


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


@dataclass(frozen=True)
class HttpError:
    """No usable answer. ``connect`` is True when no connection could be opened at all."""

    reason: str
    connect: bool = False


class _ProtocolError(Exception):
    """The server's bytes are not HTTP/1.1 as we understand it."""


class _TooLarge(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One TCP connection: parses the response to the one request in flight."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False  # the server closed, or we did
        self.used = False  # has carried a request before: a failure may be a stale keep-alive
        self._waiter: asyncio.Future[Response] | None = None
        self._received_any = False
        self._buffer = bytearray()
        self._status = 0
        self._keep_alive = True
        self._mode = "head"  # head, length, chunk-size, chunk-data, chunk-end, trailers, close
        self._remaining = 0
        self._body = bytearray()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._received_any = True
        self._buffer += data
        try:
            self._parse()
        except _TooLarge:
            self._fail(HttpError(f"response larger than {self._max_body} bytes"))
        except _ProtocolError as exc:
            self._fail(HttpError(f"invalid HTTP response ({exc})"))

    def eof_received(self) -> bool:
        self._connection_ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection_ended()

    # requests

    def send(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._received_any = False
        self.transport.write(request)
        return self._waiter

    def finished_cleanly(self) -> bool:
        """After a response: may the connection carry another request?"""
        return self._keep_alive and not self.closed and not self._buffer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _connection_ended(self) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._mode == "close":  # body delimited by the end of the connection
            self._finish()
        elif not self._received_any and self.used:
            waiter, self._waiter = self._waiter, None
            waiter.set_exception(_StaleConnection())
        else:
            self._fail(HttpError("connection closed mid-response"))

    def _fail(self, error: HttpError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Failed(error))
        self._abort()

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        response = Response(self._status, bytes(self._body))
        self._mode, self._body = "head", bytearray()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # parsing

    def _parse(self) -> None:
        while True:
            mode = self._mode
            if mode == "head":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD_BYTES:
                        raise _ProtocolError("header section too large")
                    return
                head = bytes(self._buffer[:end])
                del self._buffer[:end + 4]
                if self._head(head):
                    return  # informational (1xx) head skipped, or response complete
            elif mode == "length":
                take = min(self._remaining, len(self._buffer))
                self._append(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._finish()
                return
            elif mode == "close":
                self._append(self._buffer)
                self._buffer.clear()
                return
            elif mode == "chunk-size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        raise _ProtocolError("chunk size line too long")
                    return
                size_text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
                del self._buffer[:end + 2]
                if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise _ProtocolError("bad chunk size")
                self._remaining = int(size_text, 16)
                if len(self._body) + self._remaining > self._max_body:
                    raise _TooLarge
                self._mode = "chunk-data" if self._remaining else "trailers"
            elif mode == "chunk-data":
                take = min(self._remaining, len(self._buffer))
                self._append(self._buffer[:take])
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return
                self._mode = "chunk-end"
            elif mode == "chunk-end":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise _ProtocolError("chunk not followed by CRLF")
                del self._buffer[:2]
                self._mode = "chunk-size"
            else:  # trailers: lines up to an empty one
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD_BYTES:
                        raise _ProtocolError("trailer section too large")
                    return
                del self._buffer[:end + 2]
                if end == 0:
                    self._finish()
                    return

    def _append(self, data: bytes | bytearray) -> None:
        if len(self._body) + len(data) > self._max_body:
            raise _TooLarge
        self._body += data

    def _head(self, head: bytes) -> bool:
        """Take a status line and headers; True when the caller should stop parsing for now."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 \
                or not parts[1].isdigit():
            raise _ProtocolError("bad status line")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise _ProtocolError("bad header line")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                declared = _content_length(value)
                if length is not None and declared != length:
                    raise _ProtocolError("bad Content-Length")
                length = declared
            elif name == b"transfer-encoding":
                chunked = value.lower().split(b",")[-1].strip() == b"chunked"
                if not chunked:
                    raise _ProtocolError("unsupported Transfer-Encoding")
            elif name == b"connection":
                connection = value.lower()
        if 100 <= status < 200:
            if status == 101:
                raise _ProtocolError("unexpected protocol switch")
            return False  # 100 Continue and friends: the real response follows
        self._status = status
        self._keep_alive = b"close" not in connection and (
            parts[0] == b"HTTP/1.1" or b"keep-alive" in connection)
        if status in (204, 304):
            self._finish()
            return True
        if chunked:
            self._mode = "chunk-size"
            self._keep_alive = self._keep_alive and length is None
        elif length is not None:
            if length > self._max_body:
                raise _TooLarge
            self._mode, self._remaining = "length", length
            if length == 0:
                self._finish()
                return True
        else:
            self._mode, self._keep_alive = "close", False
        return False


def _content_length(value: bytes) -> int:
    """A Content-Length as a number; past 18 digits it is too large (and past 4,300, int() refuses it)."""
    if not value.isdigit():
        raise _ProtocolError("bad Content-Length")
    digits = value.lstrip(b"0")
    if len(digits) > 18:
        raise _TooLarge
    return int(digits or b"0")


class _StaleConnection(Exception):
    """A reused connection was closed by the server before any byte of the response."""


class _Failed(Exception):
    def __init__(self, error: HttpError) -> None:
        super().__init__(error.reason)
        self.error = error


class HttpClient:
    """GET requests to many hosts over reused connections. ``close()`` when done."""

    def __init__(self, timeout: float = 10.0, max_body: int = 4 * 1024 * 1024,
                 user_agent: str = "paddler-agent") -> None:
        self._timeout = timeout
        self._max_body = max_body
        self._user_agent = user_agent
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()

    async def get(self, host: str, port: int, path: str, headers: dict[str, str] | None = None) -> Response | HttpError:
        try:
            request = self._request(host, port, path, headers or {})
        except ValueError as exc:
            return HttpError(str(exc))
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(2):  # the second try only after a stale keep-alive connection
                    try:
                        return await self._exchange(host, port, request)
                    except _StaleConnection:
                        continue
                return HttpError("connection closed mid-response")
        except TimeoutError:
            return HttpError(f"no answer within {self._timeout:g}s")

    async def _exchange(self, host: str, port: int, request: bytes) -> Response | HttpError:
        key = (host, port)
        idle = self._idle.get(key)
        connection = None
        while idle:
            candidate = idle.pop()
            if not candidate.closed:
                connection = candidate
                break
        if connection is None:
            try:
                _, connection = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(self._max_body), host, port)
            except OSError as exc:
                return HttpError(f"connection failed ({exc.strerror or exc})", connect=True)
        self._busy.add(connection)
        try:
            response = await connection.send(request)
        except _Failed as exc:
            return exc.error
        except BaseException:  # cancelled, timed out or stale: the connection's state is unknown
            connection.close()
            raise
        finally:
            self._busy.discard(connection)
        connection.used = True
        if connection.finished_cleanly():
            pool = self._idle.setdefault(key, [])
            if len(pool) < MAX_IDLE_PER_HOST:
                pool.append(connection)
                return response
        connection.close()
        return response

    def _request(self, host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
        if not path.startswith("/") or any(c.isspace() or c == "\0" for c in path):
            raise ValueError(f"invalid request path {path!r}")
        host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        fields = {"Host": host_header, "User-Agent": self._user_agent, "Accept": "*/*", **headers}
        for name, value in fields.items():
            if any(c in "\r\n\0" for c in name + value):
                raise ValueError(f"header {name} contains a line break")
        text = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        return f"GET {path} HTTP/1.1\r\n{text}\r\n".encode("latin-1")

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()
        self._busy.clear()
