"""Plain HTTP clients for llama.cpp's API, as an application would call it through the balancer."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]  # names lower-cased
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stream:
    status: int
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw "data: [DONE]"
    error_body: bytes = b""  # the body of a non-200 answer

    @property
    def finish_reason(self) -> str | None:
        for event in reversed(self.events):
            for choice in event.get("choices", []):
                if choice.get("finish_reason"):
                    return choice["finish_reason"]
        return None


def request(url: str, body: dict[str, Any] | None = None, method: str | None = None, timeout: float = 120.0,
            headers: dict[str, str] | None = None) -> Answer:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Answer(response.status, response.read(), _lower(response.headers), time.monotonic() - started)
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read(), _lower(exc.headers), time.monotonic() - started)


def completion(base: str, n_predict: int, timeout: float = 120.0) -> Answer:
    return request(f"{base}/completion", {"prompt": "Tell me a story", "n_predict": n_predict, "ignore_eos": True},
                   timeout=timeout)


def chat(base: str, max_tokens: int = 16, timeout: float = 120.0) -> Answer:
    return request(f"{base}/v1/chat/completions",
                   {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
                    "ignore_eos": True}, timeout=timeout)


def chat_stream(base: str, max_tokens: int, timeout: float = 120.0) -> Stream:
    """A streaming (SSE) chat completion, read event by event until the server ends it."""
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            stream = Stream(response.status)
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    stream.done = True
                else:
                    stream.events.append(json.loads(payload))
            return stream
    except urllib.error.HTTPError as exc:
        return Stream(exc.code, error_body=exc.read())


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}
