"""Encodings of /slots and the admin endpoints, replayed through real HAProxy and real Envoy in front
of a real llama-server, counting what reaches it.

Between the proxy and llama-server sits a relay that forwards bytes unchanged and records the
request line of every request carrying the corpus' marker header (the agent's own polls of
/slots go through it too, and are not counted). What reaches llama-server must be on the
allow-list as llama-server itself decodes the path (fleet/contract.py); what is not on it must
be answered by the balancer (403 or 404 with its own body, or a 400 from the proxy's parser)
and never reach llama-server.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.processes import LOOPBACK, LlamaServer, free_port
from devstack.stack import BalancerStack
from fleet.contract import FORWARD, SLOT_ID_PATH, decide, route_key

pytestmark = pytest.mark.real

MARKER = "X-Paddler-Corpus"

# Endpoints that must not be reachable by default, as (method, path, query).
REFUSED = [("GET", "/slots", ""), ("POST", "/slots/0", "?action=erase"), ("GET", "/metrics", ""),
           ("POST", "/props", ""), ("POST", "/lora-adapters", ""), ("GET", "/lora-adapters", ""),
           ("POST", "/models/load", ""), ("GET", "/tools", ""), ("GET", "/cors-proxy", "?url=http://127.0.0.1/")]
# A fast endpoint that must stay reachable however it is spelled: the control group.
ALLOWED = [("POST", "/tokenize", "")]
# Every route of the pinned llama-server (tools/server/server.cpp), whether or not it is forwarded.
LLAMA_SERVER_ROUTES = {
    "/health", "/v1/health", "/metrics", "/props", "/models", "/v1/models", "/models/load", "/models/unload",
    "/models/sse", "/completion", "/completions", "/v1/completions", "/chat/completions", "/v1/chat/completions",
    "/v1/chat/completions/control", "/v1/responses", "/responses", "/v1/audio/transcriptions",
    "/audio/transcriptions", "/v1/messages", "/infill", "/embedding", "/embeddings", "/v1/embeddings", "/rerank",
    "/reranking", "/v1/rerank", "/v1/reranking", "/tokenize", "/detokenize", "/apply-template",
    "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens", "/responses/input_tokens",
    "/v1/responses/input_tokens", "/v1/messages/count_tokens", "/lora-adapters", "/slots", SLOT_ID_PATH,
    "/v1/stream", "/v1/streams/lookup", "/cors-proxy", "/tools", "/",
}


def spellings(path: str) -> list[str]:
    """The ways a client can write one path that some HTTP stack may decode back to it."""
    first = path.index("/", 1) if "/" in path[1:] else len(path)
    head, tail = path[1:first], path[first:]
    letter = head[0]
    return sorted({
        path,
        f"/%{ord(letter):02x}{head[1:]}{tail}",  # one %XX
        f"/%{ord(letter):02X}{head[1:]}{tail}",  # upper-case hex
        "/" + "".join(f"%{ord(c):02x}" for c in head) + tail,  # every letter %XX
        f"/%25{ord(letter):02x}{head[1:]}{tail}",  # double percent
        f"/%u{ord(letter):04x}{head[1:]}{tail}",  # %uXXXX
        f"/%u{ord(letter):04X}{head[1:]}{tail}",  # %uXXXX, upper-case hex
        "/" + "".join(f"%u{ord(c):04x}" for c in head) + tail,  # every letter %uXXXX
        f"/{head[:-1]}%u{ord(head[-1]):04x}{tail}",  # the last letter %uXXXX
        f"/%uD800{head}{tail}",  # a lone surrogate, which llama-server drops
        f"/x/..{path}", f"/.{path}", f"/{path}", f"//{path}",  # dot segments, repeated slashes
        f"{path};a=b", f"/{head};x{tail}",  # ; parameters
        f"/%2F{head}{tail}",  # an encoded slash
    })


def corpus(port: int, endpoints: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(method, target, HTTP version): every spelling, in origin form and absolute form, 1.1 and 1.0."""
    requests = []
    for method, path, query in endpoints:
        for spelled in spellings(path):
            for target in (spelled + query, f"http://{LOOPBACK}:{port}{spelled}{query}"):
                for version in ("HTTP/1.1", "HTTP/1.0"):
                    requests.append((method, target, version))
    return requests


def routed_by_llama_server(method: str, target: str) -> bool:
    """Whether llama-server would run one of its handlers for this request line."""
    return route_key(method, target).split(":", 1)[1] in LLAMA_SERVER_ROUTES


class RecordingRelay:
    """Forwards each connection to llama-server unchanged; records (method, target) of marked requests."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.seen: list[tuple[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> RecordingRelay:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, LOOPBACK, self.port), self._loop)
        self._server = future.result(timeout=5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        if any(line.lower().startswith(MARKER.lower() + ":") for line in lines[1:]):
            method, target, _ = ([*lines[0].split(" "), "", ""])[:3]
            self.seen.append((method, target))
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        try:
            up_writer.write(head)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()


def send(port: int, method: str, target: str, version: str) -> tuple[int, bytes]:
    """One raw request (the target exactly as given); the status and body of the answer."""
    body = b'{"content": "hi"}' if method == "POST" else b""
    request = (f"{method} {target} {version}\r\nHost: {LOOPBACK}:{port}\r\n{MARKER}: 1\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((LOOPBACK, port), timeout=10) as connection:
        connection.sendall(request.encode("latin-1") + body)
        answer = b""
        # Read to the end of the body, not to the close: Envoy holds a connection it answered itself
        # open for a second (delayed_close_timeout) in case the client closes first.
        while (chunk := connection.recv(65536)) and not _complete(answer := answer + chunk):
            pass
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


def _complete(answer: bytes) -> bool:
    head, separator, payload = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return bool(separator) and length is not None and len(payload) >= int(length.group(1))


@pytest.fixture(params=["haproxy", "envoy"])
def relayed_stack(request: pytest.FixtureRequest, make_llama: Callable[..., LlamaServer],
                  tmp_path: Path) -> Iterator[tuple[BalancerStack, RecordingRelay]]:
    llama = make_llama("a", slots=2).start()
    with RecordingRelay(llama.port) as relay, \
            BalancerStack(tmp_path / "lb", {"a": relay.address}, kind=request.param) as stack:
        stack.wait_slots({"a": 2})
        yield stack, relay


def test_only_allow_listed_requests_reach_llama_server_however_they_are_spelled(
        relayed_stack: tuple[BalancerStack, RecordingRelay]) -> None:
    stack, relay = relayed_stack
    refused = corpus(stack.port, REFUSED)
    allowed = corpus(stack.port, ALLOWED)
    refused_answers = [send(stack.port, *request) for request in refused]
    refused_reached = list(relay.seen)
    allowed_answers = [send(stack.port, *request) for request in allowed]

    # What reached llama-server and would run one of its handlers is on the allow-list, as
    # llama-server decodes the path. (HAProxy passes an absolute-form target on as it came: llama-server
    # routes no such path, and answers 404.)
    handled = [(m, t) for m, t in relay.seen if routed_by_llama_server(m, t)]
    assert [(m, t) for m, t in handled if decide(m, t) != FORWARD] == []
    # Nothing refused reached a handler of llama-server; the balancer answered every one itself.
    assert [(m, t) for m, t in refused_reached if routed_by_llama_server(m, t)] == []
    assert [(request, status) for request, (status, _) in zip(refused, refused_answers, strict=True)
            if status < 400] == []
    # The control group: /tokenize, in every spelling llama-server decodes to it, was served (in
    # HTTP/1.1: Envoy answers HTTP/1.0 with 426 unless told to accept it).
    served = [status for (method, target, version), (status, _) in zip(allowed, allowed_answers, strict=True)
              if decide(method, target) == FORWARD and target.startswith("/") and version == "HTTP/1.1"]
    assert served and set(served) == {200}
    print(f"\n{stack.kind}: {len(refused)} refused-endpoint requests: "
          f"{sum(1 for s, _ in refused_answers if s == 403)} x 403, {sum(1 for s, _ in refused_answers if s == 404)}"
          f" x 404, {sum(1 for s, _ in refused_answers if s == 400)} x 400, {len(refused_reached)} reached "
          f"llama-server ({len([1 for m, t in refused_reached if routed_by_llama_server(m, t)])} to a handler); "
          f"{len(served)} control requests served")
