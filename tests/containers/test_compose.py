"""docker/compose.yaml as a user runs it: Debian's docker-compose 1.29, host networking,
docker/fleet.yaml's fixed loopback ports, the Envoy profile on; a request through HAProxy and
one through Envoy; then ``down``. Images are the session's (compose is told their tags), so
nothing is built here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devstack import docker_env
from devstack.processes import LOOPBACK, http_get, wait_until
from tests.integration.clients import request

pytestmark = pytest.mark.real

DOCKER_DIR = Path(docker_env.ROOT) / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
PROJECT = "paddler-compose-test"


def fleet_ports(path: Path) -> dict[str, int]:
    fleet = yaml.safe_load(path.read_text())
    addresses = {f"{path.name} balancer.{key}": fleet["balancer"][key] for key in ("listen", "metrics_listen")}
    addresses |= {f"{path.name} agent.{key}": fleet["agent"][key] for key in ("listen", "management")}
    addresses |= {f"{path.name} {backend['name']}": backend["address"] for backend in fleet["backends"]}
    return {what: int(address.rpartition(":")[2]) for what, address in addresses.items()}


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


class Compose:
    def __init__(self, binary: str, images: dict[str, str]) -> None:
        self.binary = binary
        self.env = {**os.environ,
                    "PADDLER_LLAMA_SERVER_IMAGE": images["llama-server"], "PADDLER_AGENT_IMAGE": images["agent"],
                    "PADDLER_HAPROXY_IMAGE": images["haproxy"], "PADDLER_ENVOY_IMAGE": images["envoy"]}

    def __call__(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, "-f", str(COMPOSE_FILE), "-p", PROJECT, "--profile", "envoy", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        result = self("logs", "--no-color", "--tail", "30", timeout=60)
        return result.stdout[-6000:] + result.stderr[-2000:]


@pytest.fixture
def compose(images: dict[str, str]) -> Iterator[Compose]:
    try:
        binary = docker_env.ensure_compose()
    except docker_env.DockerUnavailable as exc:
        if os.environ.get("PADDLER_REQUIRE_DOCKER", "") not in ("", "0"):
            pytest.fail(f"docker-compose unavailable: {exc}", pytrace=False)
        pytest.skip(f"docker-compose unavailable: {exc}")
    busy = {what: port for path in (DOCKER_DIR / "fleet.yaml", DOCKER_DIR / "fleet.envoy.yaml")
            for what, port in fleet_ports(path).items() if port_in_use(port)}
    if busy:
        pytest.fail(f"the compose stack's fixed ports are taken on this machine: {busy}", pytrace=False)
    runner = Compose(binary, images)
    try:
        yield runner
    finally:
        down = runner("down", "--timeout", "5")
        assert down.returncode == 0, down.stderr


def test_compose_file_validates(compose: Compose) -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_stack_serves_through_haproxy_and_envoy(compose: Compose) -> None:
    up = compose("up", "-d")
    assert up.returncode == 0, f"docker-compose up failed:\n{up.stderr}"
    haproxy, envoy = "http://127.0.0.1:18000", "http://127.0.0.1:18001"
    expected = {"status": "ok", "slots_idle": 4, "slots_processing": 0, "requests_buffered": 0}

    def health(base: str) -> dict[str, object]:
        status, body = http_get(base + "/health")
        return json.loads(body) if status == 200 else {"http": status}

    try:
        wait_until(lambda: health(haproxy) == expected, timeout=60,
                   what=f"HAProxy's /health to count both llama-servers (last: {health(haproxy)})")
        wait_until(lambda: health(envoy).get("slots_idle") == 4, timeout=60,
                   what=f"Envoy's /health to count both llama-servers (last: {health(envoy)})")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{compose.logs()}") from None

    for base in (haproxy, envoy):
        answer = request(f"{base}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}, timeout=30)
        assert answer.status == 200, (base, answer.body)
        assert answer.json()["model"] in ("llama1", "llama2")
        assert answer.json()["usage"]["completion_tokens"] >= 1

    ps = compose("ps")
    assert ps.returncode == 0 and ps.stdout.count(" Up") >= 5, ps.stdout
