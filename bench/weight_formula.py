"""Which agent weight formula serves best? Measured on real HAProxy and real llama-servers.

Two llama-servers (2 and 4 slots, tiny model), the real agent with each ``--weight``
formula in turn, HAProxy with the minimal config, and a closed loop of clients sending
completions of varied length (fixed seed). Scenario "haproxy-only": all load goes through
HAProxy. Scenario "bypass": in addition, clients call the 4-slot server directly, as
other tools in a real deployment do. Prints latency, where requests went, and how much
llama.cpp had to queue internally (deferred-request-seconds), per formula.

    python -m bench.weight_formula --requests 100 --clients 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devstack.haproxy_minimal import minimal_haproxy_config
from devstack.llamacpp_build import llama_server_binary
from devstack.model import write_tiny_model
from devstack.processes import AgentProcess, HAProxy, LlamaServer, free_port, wait_until
from devstack.sampling import DeferralWatch

FORMULAS = ("capacity", "equal", "idle")


def completion(url: str, n_predict: int) -> float:
    body = json.dumps({"prompt": "Once upon a time", "n_predict": n_predict, "ignore_eos": True}).encode()
    started = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(url + "/completion", data=body), timeout=300) as response:
        response.read()
    return time.monotonic() - started


def run_once(servers: dict[str, LlamaServer], workdir: Path, formula: str, bypass: bool,
             requests: int, clients: int, seed: int) -> dict[str, object]:
    run_dir = workdir / f"{'bypass' if bypass else 'haproxy-only'}-{formula}"
    agent = AgentProcess(run_dir, [a for n, s in servers.items() for a in ("--backend", f"{n}={s.address}")]
                         + ["--weight", formula, "--log-level", "warning"])
    port = free_port()
    with agent:
        config = minimal_haproxy_config({n: s.address for n, s in servers.items()}, f"127.0.0.1:{port}",
                                        "127.0.0.1", agent.port, run_dir / "haproxy.sock")
        with HAProxy(config, run_dir) as haproxy:
            for name, server in servers.items():
                wait_until(lambda name=name, slots=server.slots: haproxy.server("llama", name)["slim"] == str(slots),
                           timeout=10, what="agent maxconn")
            rng = random.Random(seed)
            lengths = [rng.choice([100, 200, 400, 800, 1600]) for _ in range(requests)]
            stop_bypass = threading.Event()

            def bypass_client() -> None:
                while not stop_bypass.is_set():
                    completion(servers["large"].url, 800)

            with DeferralWatch(servers) as meter, ThreadPoolExecutor(clients + 2) as pool:
                bypassers = [pool.submit(bypass_client) for _ in range(2 if bypass else 0)]
                latencies = list(pool.map(lambda n: completion(f"http://127.0.0.1:{port}", n), lengths))
                stop_bypass.set()
                for future in bypassers:
                    future.result()
            placed = {name: int(haproxy.server("llama", name)["stot"]) for name in servers}
    ordered = sorted(latencies)
    return {"formula": formula, "scenario": "bypass" if bypass else "haproxy-only",
            "mean_s": statistics.mean(latencies), "p90_s": ordered[int(0.9 * (len(ordered) - 1))],
            "placed": placed, "deferred_s": meter.deferred_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="requests through HAProxy per run")
    parser.add_argument("--clients", type=int, default=5, help="concurrent clients (6 slots in all)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    binary = llama_server_binary()
    with tempfile.TemporaryDirectory(prefix="weight-bench-") as tmp:
        workdir = Path(tmp)
        model = write_tiny_model(workdir / "tiny.gguf")
        servers = {"small": LlamaServer(binary, model, workdir, slots=2, name="small", ctx_per_slot=2048),
                   "large": LlamaServer(binary, model, workdir, slots=4, name="large", ctx_per_slot=2048)}
        with servers["small"], servers["large"]:
            print(f"{'scenario':13} {'formula':9} {'mean':>7} {'p90':>7} {'small/large':>12} {'deferred':>9}")
            for bypass in (False, True):
                for formula in FORMULAS:
                    row = run_once(servers, workdir, formula, bypass, args.requests, args.clients, args.seed)
                    placed = row["placed"]
                    print(f"{row['scenario']:13} {formula:9} {row['mean_s']:6.2f}s {row['p90_s']:6.2f}s "
                          f"{placed['small']:>5}/{placed['large']:<6} {row['deferred_s']:8.2f}s", flush=True)


if __name__ == "__main__":
    main()
