"""Shared fixtures: the real llama-server binary, the tiny model, and per-test work dirs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LlamaServer
from generator.haproxy import haproxy_binary


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    """Built once per cache (minutes), then reused; PADDLER_LLAMA_SERVER points at another binary."""
    return llama_server_binary()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def haproxy_available() -> None:
    if haproxy_binary() is None:
        pytest.fail("haproxy is not installed (scripts/test.sh installs it with apt-get)")


@pytest.fixture
def make_llama(llama_binary: Path, tiny_model: Path, tmp_path: Path) -> Iterator[Callable[..., LlamaServer]]:
    """Build real llama-servers (not started); every one is stopped when the test ends."""
    made: list[LlamaServer] = []

    def make(name: str, slots: int = 1, ctx_per_slot: int = 2048, port: int | None = None,
             alias: str | None = None) -> LlamaServer:
        server = LlamaServer(llama_binary, tiny_model, tmp_path, slots=slots, name=name, port=port,
                             ctx_per_slot=ctx_per_slot, alias=alias)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
