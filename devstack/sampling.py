"""Watch state while load runs: background samplers, and llama.cpp's own queue in particular.

``BackgroundSampler`` calls each probe in its own thread until stopped: llama-server answers
``/metrics`` and ``/slots`` from its busy main loop, so one slow server must not thin out the
samples of the others. ``DeferralWatch`` asks: did any request wait inside a llama-server? It
records the highest ``llamacpp:requests_deferred`` seen per server and its integral over time
(deferred-request-seconds, since llama.cpp keeps no cumulative counter), and optionally the
highest number of busy slots from ``/slots``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol, Self


class LlamaProbe(Protocol):
    """What the watch needs from a llama-server, whether a local process or a container."""

    def metric(self, name: str) -> float | None: ...

    def busy_slots(self) -> int | None: ...


class BackgroundSampler:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: dict[str, int] = {}
        self._probes: dict[str, Callable[[], bool]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, key: str, probe: Callable[[], bool]) -> None:
        """``probe`` takes one sample and says whether it got one; ``samples[key]`` counts those."""
        self._probes[key] = probe
        self.samples[key] = 0

    def _run(self, key: str) -> None:
        probe = self._probes[key]
        while not self._stop.is_set():
            if probe():
                self.samples[key] += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._threads = [threading.Thread(target=self._run, args=(key,), daemon=True) for key in self._probes]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


class DeferralWatch(BackgroundSampler):
    def __init__(self, servers: Mapping[str, LlamaProbe], interval: float = 0.02, track_busy: bool = False) -> None:
        super().__init__(interval)
        self.servers = dict(servers)
        self.track_busy = track_busy
        self.max_deferred = {name: 0.0 for name in self.servers}
        self.max_busy = {name: 0 for name in self.servers}
        self.deferred_seconds_by_server = {name: 0.0 for name in self.servers}
        self._last = {name: time.monotonic() for name in self.servers}
        for name in self.servers:
            self.add(name, lambda name=name: self._sample(name))  # type: ignore[misc]

    @property
    def deferred_seconds(self) -> float:
        return sum(self.deferred_seconds_by_server.values())

    def _sample(self, name: str) -> bool:
        server = self.servers[name]
        deferred = server.metric("llamacpp:requests_deferred")
        busy = server.busy_slots() if self.track_busy else 0
        now = time.monotonic()
        if deferred is None or busy is None:
            return False
        self.max_deferred[name] = max(self.max_deferred[name], deferred)
        self.max_busy[name] = max(self.max_busy[name], busy)
        self.deferred_seconds_by_server[name] += deferred * (now - self._last[name])
        self._last[name] = now
        return True
