"""Added latency of routing by model on the HAProxy path, side by side with the one-model config.

Two real HAProxies run at once from configs ``paddler-gen haproxy`` renders for the same backends: one for
the fleet as one model (HAProxy streams the body through), one for the fleet with ``models:`` declared
(HAProxy waits for the body, paddler.lua reads its "model" and picks that model's backend). One real agent
answers both. Backends are the SIMULATOR (bench/slots_sim.py: instant canned answers, every slot idle), so
the difference is the proxy path itself. The request is a chat completion of ``--body-bytes`` (its messages
padded), the same bytes on both paths; requests alternate between them, open loop, at ``--rate`` each.

    python -m bench.model_routing_overhead --rate 200 --seconds 20 --body-bytes 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import yaml

from bench.side_by_side import measure, report, simulated_backends
from devstack.processes import AgentProcess, HAProxy, free_port, wait_until
from fleet import parse_fleet
from generator.haproxy import packaged_lua_path, render_haproxy

MODELS = ("alpha", "beta")
SLOTS = 8


def chat_body(size: int) -> str:
    """A chat completion naming alpha, its user message padded to about ``size`` bytes in all."""
    base = {"model": "alpha", "messages": [{"role": "system", "content": "You are brief."},
                                           {"role": "user", "content": ""}], "max_tokens": 1}
    padding = max(0, size - len(json.dumps(base)))
    base["messages"][1]["content"] = ("Tell me about load balancers. " * (padding // 30 + 1))[:padding]
    return json.dumps(base)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second on each path")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--body-bytes", type=int, default=2000)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--max-request-body", type=int, default=None,
                        help="balancer.max_request_body of the by-model fleet (default: the schema's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-bench-") as tmp:
        workdir = Path(tmp)
        with simulated_backends(workdir, args.backends, SLOTS) as ports:
            agent_port, management = free_port(), free_port()
            listens = {"one-model": free_port(), "by-model": free_port()}

            def fleet(kind: str) -> dict[str, object]:
                backends = [{"name": f"sim{i}", "address": f"127.0.0.1:{port}",
                             **({"models": [MODELS[i % 2]]} if kind == "by-model" else {})}
                            for i, port in enumerate(ports)]
                balancer: dict[str, object] = {"listen": f"127.0.0.1:{listens[kind]}",
                                               "stats_socket": str(workdir / kind / "haproxy.sock")}
                if args.max_request_body is not None:
                    balancer["max_request_body"] = args.max_request_body
                return {"backends": backends, "balancer": balancer,
                        "agent": {"listen": f"127.0.0.1:{agent_port}", "management": f"127.0.0.1:{management}",
                                  "interval": "1s"}}

            (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet("by-model")))
            lua_dir = str(packaged_lua_path().parent)
            agent = AgentProcess(workdir, ["--fleet", str(workdir / "fleet.yaml"), "--log-level", "warning"],
                                 port=agent_port, management_port=management)
            proxies = {kind: HAProxy(render_haproxy(parse_fleet(fleet(kind)), lua_dir=lua_dir), workdir / kind,
                                     ready_url=f"http://127.0.0.1:{listens[kind]}/health")
                       for kind in listens}
            with agent, proxies["one-model"], proxies["by-model"]:
                urls = {kind: f"http://127.0.0.1:{port}" for kind, port in listens.items()}
                placements = [(proxies["one-model"], "llama", f"sim{i}") for i in range(len(ports))]
                placements += [(proxies["by-model"], f"llama.{MODELS[i % 2]}", f"sim{i}") for i in range(len(ports))]
                wait_until(lambda: all(proxy.server_takes_requests(backend, server)
                                       and proxy.server(backend, server)["slim"] == str(SLOTS)
                                       for proxy, backend, server in placements),
                           timeout=30, what="both HAProxies to place on every server, as the agent said")
                body = chat_body(args.body_bytes)
                asyncio.run(measure(urls, args.rate, 2.0, "/v1/chat/completions", body))  # warm-up
                latencies = asyncio.run(measure(urls, args.rate, args.seconds, "/v1/chat/completions", body))
    report(latencies, "one-model", "by-model", f"{args.rate:g} requests/s on each path for {args.seconds:g}s, "
           f"{len(body)}-byte chat bodies, simulated backends (instant answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
