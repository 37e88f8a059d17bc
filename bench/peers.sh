#!/usr/bin/env bash
# Installs the peer routers the routing benchmark compares against (bench/routing/strategies.py) into their
# OWN virtualenv, never the project's: PADDLER_PEERS_VENV (default /work/peers-venv, i.e. ../peers-venv
# beside the checkout). The benchmark finds them there and skips any that is missing.
#   sglang-router: SGLang's model gateway (Rust), `--backend openai` fronts OpenAI-compatible servers.
#   vllm-router:   vLLM's router (a fork of the same gateway).
# Versions are pinned so a report names what it measured; override with SGLANG_ROUTER_VERSION / VLLM_ROUTER_VERSION.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PADDLER_PEERS_VENV:-$(dirname "$ROOT")/peers-venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
for spec in "sglang-router==${SGLANG_ROUTER_VERSION:-0.3.2}" "vllm-router==${VLLM_ROUTER_VERSION:-0.1.17}"; do
    # One failing peer (no wheel for this platform) must not stop the other.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$spec" || echo "peers.sh: $spec did not install" >&2
done
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -i -E '^(sglang-router|vllm-router) ' || true
echo "peers in $VENV"
