"""Fixtures for the full-stack container tests: a Docker engine, the project's images, and stacks.

Without a usable Docker engine these tests are skipped, with the reason; with
``PADDLER_REQUIRE_DOCKER=1`` (CI sets it) they fail instead, so CI cannot go green by
silently running none of them. Images are built once per session and only when their
content-hash tag is absent (devstack/docker_env.py), so a warm run starts containers at once.
"""

from __future__ import annotations

import os

# testcontainers reads this at import: its reaper (Ryuk) image cannot be pulled here, and
# every container is removed by the fixtures that start it.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from collections.abc import Iterator
from typing import NoReturn

import pytest

from devstack import docker_env
from tests.containers.services import Containers


def docker_required() -> bool:
    return os.environ.get("PADDLER_REQUIRE_DOCKER", "") not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    message = f"Docker unavailable: {reason}"
    if docker_required():
        pytest.fail(f"{message} (PADDLER_REQUIRE_DOCKER is set)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker_env.Engine]:
    """A running engine; one started here (not by scripts/test.sh or the system) is stopped at the end."""
    try:
        engine = docker_env.ensure_engine()
    except docker_env.DockerUnavailable as exc:
        unavailable(str(exc))
    yield engine
    if engine.started_pid is not None:
        docker_env.stop_engine(engine.started_pid)


@pytest.fixture(scope="session")
def images(docker_engine: docker_env.Engine) -> dict[str, str]:
    """key (agent, haproxy, envoy, llama-server) → image tag; built concurrently when absent."""
    try:
        return docker_env.ensure_images()
    except docker_env.DockerUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def containers(images: dict[str, str]) -> Iterator[Containers]:
    made = Containers(images)
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture
def fresh_containers(images: dict[str, str]) -> Iterator[Containers]:
    made = Containers(images)
    try:
        yield made
    finally:
        made.stop_all()

