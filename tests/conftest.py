"""Shared fixtures: the real llama-server binary, the tiny model, and per-test work dirs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    """Built once per cache (minutes), then reused; PADDLER_LLAMA_SERVER points at another binary."""
    return llama_server_binary()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def haproxy_available() -> None:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        pytest.fail("haproxy is not installed (scripts/test.sh installs it with apt-get)")
