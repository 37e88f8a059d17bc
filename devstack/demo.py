"""The main job on its embedded default: a working local stack, stopped cleanly by Ctrl-C.

Everything runs on the embedded default fleet (one llama-server on 127.0.0.1:8080):
a real llama-server there (the tiny generated model, or ``--model``), ``paddler-agent``
with no arguments, and HAProxy with the config ``paddler-gen haproxy`` renders with no
arguments (only ``--lua-dir`` points at this checkout's paddler.lua). Then it prints where
to send requests and, every few seconds, the balancer's own aggregated ``/health``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import AgentProcess, HAProxy, LlamaServer, http_get
from fleet import default_fleet
from generator.haproxy import packaged_lua_path


def main(argv: list[str] | None = None) -> int:
    fleet = default_fleet()
    backend = fleet.backends[0]
    parser = argparse.ArgumentParser(prog="scripts/run.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF model (default: a tiny generated one)")
    parser.add_argument("--slots", type=int, default=4, help="llama-server parallel slots (default 4)")
    parser.add_argument("--status-every", type=float, default=5.0, help="seconds between status lines")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    config = subprocess.run([sys.executable, "-m", "generator.main", "haproxy", "--check",
                             "--lua-dir", str(packaged_lua_path().parent)],
                            check=True, capture_output=True, text=True).stdout
    balancer = f"http://{fleet.balancer.listen}"
    with tempfile.TemporaryDirectory(prefix="paddler-demo-") as tmp:
        workdir = Path(tmp)
        model = args.model or write_tiny_model(workdir / "tiny.gguf")
        llama = LlamaServer(llama_server_binary(), model, workdir, slots=args.slots,
                            port=backend.address.port, name=backend.name)
        agent = AgentProcess(workdir, [], port=fleet.agent.listen.port, management_port=fleet.agent.management.port)
        haproxy = HAProxy(config, workdir, ready_url=f"{balancer}/health")
        with llama, agent, haproxy:
            print(f"llama-server   http://{llama.address}  ({args.slots} slots, model {model.name})")
            print(f"paddler-agent  {fleet.agent.listen} (agent-check, embedded default fleet)")
            print(f"dashboard      http://{fleet.agent.management}/  (also /api/v1/agents, /metrics)")
            print(f"HAProxy        {balancer}  <- send requests here (config: `paddler-gen haproxy`)")
            chat = '{"messages":[{"role":"user","content":"Hi"}]}'
            print(f"  curl {balancer}/v1/chat/completions -d '{chat}'")
            print(f"  curl {balancer}/health")
            print("Ctrl-C stops everything.", flush=True)
            while not stop.wait(args.status_every):
                status, body = http_get(f"{balancer}/health")
                print(f"/health -> {status} {json.loads(body) if body else ''}", flush=True)
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
