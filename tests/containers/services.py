"""One small testcontainers class per service of docker/: llama-server, paddler-agent, HAProxy, Envoy.

Every container runs with host networking (no bridge exists: dockerd runs with
``--bridge=none``) and is reached on 127.0.0.1 at a port the test chose. Each class knows how
to ask its service whether it is ready *in its own protocol* (llama.cpp's /health, the
agent-check port plus the management API, the balancer's aggregated /health, Envoy's admin
/ready). ``start`` waits for that, fails at once if the container exits, and puts the
container's log in the error; a container that failed to start is removed.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any

import yaml
from testcontainers.core.container import DockerContainer

from devstack.processes import (
    LOOPBACK,
    LlamaEndpoint,
    StartError,
    free_port,
    http_get,
    llama_busy_slots,
    llama_metric,
)

LABEL = "org.paddler-haproxy.test"


def answers_health(url: str) -> bool:
    """A llama.cpp-style /health answer: 200 ``ok`` or 503 ``unavailable``, JSON either way."""
    status, body = http_get(url, timeout=1.0)
    if status not in (200, 503):
        return False
    try:
        return json.loads(body).get("status") in ("ok", "unavailable")
    except ValueError:
        return False


class Service:
    """A container of one of the project's images, on the host network."""

    role = "service"

    def __init__(self, image: str, env: dict[str, str], command: list[str] | None = None) -> None:
        self.name = f"paddler-test-{self.role}-{uuid.uuid4().hex[:8]}"
        self.container = (DockerContainer(image).with_name(self.name).with_envs(**env)
                          .with_kwargs(network_mode="host", labels={LABEL: self.role}))
        if command is not None:
            self.container.with_command(command)
        self.started = False

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> Service:
        self.container.start()
        self.started = True
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            wrapped = self.container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status in ("exited", "dead"):
                code = wrapped.attrs["State"]["ExitCode"]
                raise StartError(f"{self.name} exited with status {code}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} not ready after {timeout:.0f}s:\n{self.logs()}")
            time.sleep(0.1)

    def logs(self, tail: int = 60) -> str:
        try:
            return self.container.get_wrapped_container().logs(tail=tail).decode(errors="replace")
        except Exception as exc:  # the container may already be gone
            return f"(no logs: {exc})"

    def kill(self) -> None:
        """SIGKILL, like a crashed or OOM-killed server; the container stays, to be restarted."""
        self.container.get_wrapped_container().kill()
        self.container.get_wrapped_container().wait(timeout=30)

    def restart(self, timeout: float = 60.0) -> None:
        """Start the same (killed or stopped) container again and wait until it is ready."""
        self.container.get_wrapped_container().start()
        self.wait_ready(timeout)

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.container.stop()


class LlamaContainer(LlamaEndpoint, Service):
    """paddler-llama-server: Debian's llama-server with the tiny model, ``--metrics`` on."""

    role = "llama"

    def __init__(self, image: str, alias: str, port: int, slots: int, ctx_per_slot: int = 2048) -> None:
        self.alias, self.port, self.slots = alias, port, slots
        super().__init__(image, {"LLAMA_ARG_HOST": LOOPBACK, "LLAMA_ARG_PORT": str(port),
                                 "LLAMA_ARG_N_PARALLEL": str(slots), "LLAMA_ARG_CTX_SIZE": str(slots * ctx_per_slot),
                                 "LLAMA_ARG_ALIAS": alias, "LLAMA_ARG_ENDPOINT_METRICS": "1"})

    def metric(self, name: str) -> float | None:
        return llama_metric(self.url, name)

    def busy_slots(self) -> int | None:
        return llama_busy_slots(self.url)


class AgentContainer(Service):
    """paddler-agent, given the fleet file's text (PADDLER_FLEET_YAML)."""

    role = "agent"

    def __init__(self, image: str, fleet_yaml: str, listen_port: int, management_port: int) -> None:
        self.listen_port, self.management_port = listen_port, management_port
        super().__init__(image, {"PADDLER_FLEET_YAML": fleet_yaml})

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port}"

    def ready(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.listen_port), timeout=0.5):
                pass
        except OSError:
            return False
        return answers_health(self.management_url + "/health")

    def health(self) -> dict[str, Any]:
        status, body = http_get(self.management_url + "/health")
        return {"http": status, **(json.loads(body) if body else {})}


class BalancerContainer(Service):
    """A balancer image (HAProxy or Envoy) rendering its config from the fleet at start."""

    def __init__(self, image: str, fleet_yaml: str, port: int) -> None:
        self.port = port
        super().__init__(image, {"PADDLER_FLEET_YAML": fleet_yaml})

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def health(self) -> dict[str, Any]:
        """The balancer's aggregated /health, with the HTTP status as ``http``."""
        status, body = http_get(self.url + "/health")
        try:
            return {"http": status, **json.loads(body)}
        except ValueError:
            return {"http": status}


class HAProxyContainer(BalancerContainer):
    """paddler-haproxy: config from ``paddler-gen haproxy --check`` at start, HAProxy 3.x from sid."""

    role = "haproxy"

    def ready(self) -> bool:
        return answers_health(self.url + "/health")


class EnvoyContainer(BalancerContainer):
    """paddler-envoy: config from ``paddler-gen envoy --check`` at start; ready when its admin says so."""

    role = "envoy"

    def __init__(self, image: str, fleet_yaml: str, port: int, admin_port: int) -> None:
        self.admin_port = admin_port
        super().__init__(image, fleet_yaml, port)

    def ready(self) -> bool:
        return http_get(f"http://{LOOPBACK}:{self.admin_port}/ready", timeout=1.0)[0] == 200


class Fleet:
    """A fleet on free loopback ports, as YAML text for the agent and balancer containers."""

    def __init__(self, backends: dict[str, str], standby: dict[str, str] | None = None,
                 balancer: dict[str, Any] | None = None, interval: str = "500ms") -> None:
        self.port = free_port()
        self.agent_port = free_port()
        self.management_port = free_port()
        self.admin_port = free_port()
        self.data = {
            "backends": [{"name": name, "address": address} for name, address in backends.items()],
            "standby": [{"name": name, "address": address} for name, address in (standby or {}).items()],
            "agent": {"listen": f"{LOOPBACK}:{self.agent_port}", "management": f"{LOOPBACK}:{self.management_port}",
                      "interval": interval},
            "balancer": {"listen": f"{LOOPBACK}:{self.port}", "metrics_listen": f"{LOOPBACK}:{self.admin_port}",
                         **(balancer or {})},
        }

    @property
    def yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


class Containers:
    """Makes the project's containers and removes every one it made."""

    def __init__(self, images: dict[str, str]) -> None:
        self.images = images
        self.made: list[Service] = []

    def _start(self, service: Service, timeout: float = 60.0) -> Any:
        self.made.append(service)
        return service.start(timeout)

    def llama(self, alias: str, slots: int = 2, port: int | None = None, ctx_per_slot: int = 2048) -> LlamaContainer:
        return self._start(LlamaContainer(self.images["llama-server"], alias, port or free_port(), slots,
                                          ctx_per_slot))

    def agent(self, fleet: Fleet) -> AgentContainer:
        return self._start(AgentContainer(self.images["agent"], fleet.yaml, fleet.agent_port, fleet.management_port))

    def haproxy(self, fleet: Fleet) -> HAProxyContainer:
        return self._start(HAProxyContainer(self.images["haproxy"], fleet.yaml, fleet.port))

    def envoy(self, fleet: Fleet) -> EnvoyContainer:
        return self._start(EnvoyContainer(self.images["envoy"], fleet.yaml, fleet.port, fleet.admin_port))

    def stop_all(self) -> None:
        for service in reversed(self.made):
            service.stop()
        self.made.clear()
