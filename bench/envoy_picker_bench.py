"""Added latency of the picker on the Envoy path, measured side by side with Envoy's least_request alone.

Two real Envoys run at once from the same generated config: one as rendered by
``paddler-gen envoy`` (Lua filter → agent picker → override_host), one with the Lua filter
removed (plain least_request). Backends are the SIMULATOR (bench/slots_sim.py, instant canned
answers, every slot idle), so the difference is the proxy path itself. Requests alternate
between the two Envoys, open loop, at ``--rate`` per second for each.

    python -m bench.envoy_picker_bench --rate 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import yaml

from bench.side_by_side import measure, report, simulated_backends
from devstack.processes import AgentProcess, EnvoyProcess, free_port
from fleet import parse_fleet
from generator.envoy import packaged_lua_path, render_envoy


def without_lua(config_text: str, listen_port: int, admin_port: int) -> str:
    """The same bootstrap minus the Lua filter, on other ports: Envoy's own least_request only."""
    config = yaml.safe_load(config_text)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.lua"]
    return yaml.safe_dump(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second on each path")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backends", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="envoy-bench-") as tmp:
        workdir = Path(tmp)
        with simulated_backends(workdir, args.backends, 8) as ports:
            listen, admin, management = free_port(), free_port(), free_port()
            fleet_data = {"backends": [{"name": f"sim{i}", "address": f"127.0.0.1:{p}"} for i, p in enumerate(ports)],
                          "agent": {"management": f"127.0.0.1:{management}", "interval": "1s"},
                          "balancer": {"listen": f"127.0.0.1:{listen}", "metrics_listen": f"127.0.0.1:{admin}"}}
            (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet_data))
            picker_config = render_envoy(parse_fleet(fleet_data), lua_dir=str(packaged_lua_path().parent))
            plain_listen, plain_admin = free_port(), free_port()
            agent = AgentProcess(workdir, ["--fleet", str(workdir / "fleet.yaml"), "--log-level", "warning"],
                                 management_port=management)
            picker = EnvoyProcess(picker_config, workdir / "picker", f"http://127.0.0.1:{admin}")
            plain = EnvoyProcess(without_lua(picker_config, plain_listen, plain_admin), workdir / "plain",
                                 f"http://127.0.0.1:{plain_admin}")
            with agent, picker, plain:
                urls = {"least_request": f"http://127.0.0.1:{plain_listen}", "picker": f"http://127.0.0.1:{listen}"}
                asyncio.run(measure(urls, args.rate, 2.0))  # warm-up: connections, health checks
                latencies = asyncio.run(measure(urls, args.rate, args.seconds))
    report(latencies, "least_request", "picker",
           f"{args.rate:g} requests/s on each path for {args.seconds:g}s, simulated backends (instant answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
