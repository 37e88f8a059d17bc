"""SIMULATOR, not llama.cpp: many fake llama-servers answering /health, /slots, /props and an
instant canned /completion.

For the agent benchmark only, where the cost under test is the agent's, not llama.cpp's:
one process listens on N loopback ports and answers each with canned llama.cpp-shaped
JSON over HTTP/1.1 keep-alive, using a bare asyncio protocol so the simulator itself
stays cheap. Busy slots vary per request so the agent sees changing state.

    python -m bench.slots_sim --count 1000 --slots 4 --ports-file ports.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource

HEALTH = json.dumps({"status": "ok"}).encode()


def _response(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Keep-Alive: timeout=60\r\n\r\n").encode() + body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or 0)
    return 0


class FakeLlamaServer(asyncio.Protocol):
    def __init__(self, slots: int, rng: random.Random, random_busy: bool) -> None:
        self.slots, self.rng, self.random_busy = slots, rng, random_busy
        self.buffer = b""
        # An instant canned answer: benchmarks that use it measure the proxy path, not generation.
        self.completion = _response(json.dumps({"content": "ok", "model": "sim", "tokens_predicted": 1}).encode())
        self.props = _response(json.dumps({"total_slots": slots, "model_path": "/sim/model.gguf",
                                           "is_sleeping": False}).encode())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = _content_length(head)
            if len(rest) < length:
                return  # wait for the rest of the body
            self.buffer = rest[length:]
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            self.transport.write(self.answer(path))  # type: ignore[attr-defined]

    def answer(self, path: bytes) -> bytes:
        if path in (b"/completion", b"/v1/chat/completions"):
            return self.completion
        if path == b"/slots":
            busy = self.rng.randint(0, self.slots) if self.random_busy else 0
            slots = [{"id": i, "n_ctx": 1024, "is_processing": i < busy} for i in range(self.slots)]
            return _response(json.dumps(slots).encode())
        if path == b"/health":
            return _response(HEALTH)
        if path == b"/props":
            return self.props
        return _response(b'{"error":"not found"}', "404 Not Found")


async def serve(count: int, slots: int, ports_file: str, random_busy: bool) -> None:
    """Listen on ``count`` free loopback ports; write their numbers to ``ports_file`` when ready."""
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    servers = [await loop.create_server(lambda: FakeLlamaServer(slots, rng, random_busy), "127.0.0.1", 0)
               for _ in range(count)]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    with open(ports_file + ".tmp", "w") as handle:
        json.dump(ports, handle)
    os.replace(ports_file + ".tmp", ports_file)
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ports-file", required=True)
    parser.add_argument("--idle", action="store_true", help="always report every slot idle (default: random)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.count, args.slots, args.ports_file, random_busy=not args.idle))


if __name__ == "__main__":
    main()
