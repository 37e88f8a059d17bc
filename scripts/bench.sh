#!/usr/bin/env bash
# Reproduces the routing-quality report (bench/results/latest.json and .png): every strategy against the
# ideal queue on a simulated heterogeneous fleet, Poisson and conversation scenarios; the peers (SGLang's
# and vLLM's routers) only when bench/peers.sh has installed them. It prints its progress as it goes.
# Arguments go to the benchmark (e.g. --fleet a:2:6,b:8:12 --loads 0.8 --seed 7).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
"$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,bench]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
exec "$PY" -m bench.routing.run "$@"
