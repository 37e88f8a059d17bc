"""Shared fixtures: the real llama-server binary, the tiny model, and per-test work dirs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import LlamaRouter, LlamaServer
from generator.haproxy import haproxy_binary


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    """Built once per cache (minutes), then reused; PADDLER_LLAMA_SERVER points at another binary."""
    return llama_server_binary()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def router_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --models-dir with two tiny models, ``alpha`` and ``beta`` (different weights)."""
    directory = tmp_path_factory.mktemp("router-models")
    write_tiny_model(directory / "alpha.gguf", seed=1)
    write_tiny_model(directory / "beta.gguf", seed=2)
    return directory


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


@pytest.fixture
def make_router(llama_binary: Path, router_models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., LlamaRouter]]:
    """Build real llama-servers in router mode serving ``alpha`` and ``beta`` (not started; none loaded once
    started); every one, with its children, is stopped when the test ends."""
    made: list[LlamaRouter] = []

    def make(name: str = "llama-router", slots: int = 2, ctx_per_slot: int = 1024,
             extra_args: list[str] | None = None) -> LlamaRouter:
        router = LlamaRouter(llama_binary, router_models_dir, tmp_path, slots=slots, ctx_per_slot=ctx_per_slot,
                             extra_args=extra_args, name=name)
        made.append(router)
        return router

    yield make
    for router in made:
        router.stop()
