"""Watch llama.cpp's own queue while load runs: did any request wait inside a llama-server?

One thread per server samples ``llamacpp:requests_deferred`` from ``/metrics`` (llama-server
answers it from its busy main loop, so one slow server must not thin out the others'
samples). Records the highest value seen per server and the integral over time
(deferred-request-seconds), since llama.cpp keeps no cumulative counter.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from devstack.processes import LlamaServer


class DeferralWatch:
    def __init__(self, servers: Iterable[LlamaServer], interval: float = 0.02) -> None:
        self.servers = {server.name: server for server in servers}
        self.interval = interval
        self.max_deferred = {name: 0.0 for name in self.servers}
        self.deferred_seconds_by_server = {name: 0.0 for name in self.servers}
        self.samples = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(name,), daemon=True) for name in self.servers]

    @property
    def deferred_seconds(self) -> float:
        return sum(self.deferred_seconds_by_server.values())

    def _watch(self, name: str) -> None:
        server = self.servers[name]
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            value = server.metric("llamacpp:requests_deferred") or 0.0
            now = time.monotonic()
            self.max_deferred[name] = max(self.max_deferred[name], value)
            self.deferred_seconds_by_server[name] += value * (now - last)
            last = now
            self.samples += 1

    def __enter__(self) -> "DeferralWatch":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
