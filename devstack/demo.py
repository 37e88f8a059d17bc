"""The main job on its embedded default: a working local stack, stopped cleanly by Ctrl-C.

Starts a real llama-server on 127.0.0.1:8080 (the tiny generated model, or ``--model``),
``paddler-agent`` with *no arguments* (its embedded default fleet is exactly that server),
and HAProxy on 127.0.0.1:8000 with the minimal slot-aware config. Then prints where to
send requests and, every few seconds, what HAProxy currently believes about the server.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from devstack.haproxy_minimal import minimal_haproxy_config
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import AgentProcess, HAProxy, LlamaServer
from fleet import default_fleet


def main(argv: list[str] | None = None) -> int:
    fleet = default_fleet()
    backend = fleet.backends[0]
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF model (default: a tiny generated one)")
    parser.add_argument("--slots", type=int, default=4, help="llama-server parallel slots (default 4)")
    parser.add_argument("--llama-port", type=int, default=backend.address.port)
    parser.add_argument("--agent-port", type=int, default=fleet.agent.listen.port)
    parser.add_argument("--listen-port", type=int, default=fleet.balancer.listen.port)
    parser.add_argument("--status-every", type=float, default=5.0, help="seconds between status lines")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    with tempfile.TemporaryDirectory(prefix="paddler-demo-") as tmp:
        workdir = Path(tmp)
        model = args.model or write_tiny_model(workdir / "tiny.gguf")
        llama = LlamaServer(llama_server_binary(), model, workdir, slots=args.slots, port=args.llama_port,
                            name=backend.name)
        # The agent runs on its embedded default unless the demo was moved to other ports.
        agent_args = [] if args.llama_port == backend.address.port else [
            "--backend", f"{backend.name}=127.0.0.1:{args.llama_port}"]
        agent = AgentProcess(workdir, agent_args, port=args.agent_port)
        listen = f"127.0.0.1:{args.listen_port}"
        haproxy = HAProxy(minimal_haproxy_config({backend.name: llama.address}, listen=listen,
                                                 agent_host="127.0.0.1", agent_port=agent.port,
                                                 stats_socket=workdir / "haproxy.sock"), workdir)
        with llama, agent, haproxy:
            print(f"llama-server  http://{llama.address}  ({args.slots} slots, model {model.name})")
            print(f"paddler-agent 127.0.0.1:{agent.port} (agent-check)")
            print(f"HAProxy       http://{listen}  <- send requests here, e.g.")
            print(f"  curl http://{listen}/completion -d '{{\"prompt\": \"Hello\", \"n_predict\": 32}}'")
            print("Ctrl-C stops everything.", flush=True)
            while not stop.wait(args.status_every):
                row = haproxy.server("llama", backend.name)
                state = "UP" if haproxy.server_is_up("llama", backend.name) else row["status"]
                print(f"{backend.name}: {state}, {row['scur']}/{row['slim'] or '-'} in use, "
                      f"queue {row['qcur']}, agent says: {row['last_agt']}", flush=True)
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
