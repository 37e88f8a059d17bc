"""The README's run command: the demo stack on the embedded default serves a request and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.processes import wait_until
from fleet import default_fleet
from tests.integration import clients

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def test_demo_serves_through_haproxy_and_stops_cleanly(llama_binary: Path, tmp_path: Path) -> None:
    fleet = default_fleet()
    addresses = [fleet.backends[0].address, fleet.agent.listen, fleet.agent.management, fleet.balancer.listen]
    busy = [str(a) for a in addresses if port_in_use(a.host, a.port)]
    assert not busy, f"the demo needs the embedded default ports, in use here: {busy}"
    with (tmp_path / "demo.log").open("w") as log:
        demo = subprocess.Popen([sys.executable, "-m", "devstack.demo", "--status-every", "0.5"], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PADDLER_LLAMA_SERVER": str(llama_binary)})
    base = "http://127.0.0.1:8000"  # the README's address for the demo's HAProxy
    try:
        wait_until(lambda: "/health -> 200" in (tmp_path / "demo.log").read_text(), timeout=60,
                   what="the demo to report a healthy balancer")
        answer = clients.chat(base)
        assert answer.status == 200
        assert answer.json()["model"] == "llama1"  # the embedded default backend's name
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert (tmp_path / "demo.log").read_text().rstrip().endswith("stopped")
    assert not any(port_in_use(a.host, a.port) for a in addresses), "the demo left something listening"
