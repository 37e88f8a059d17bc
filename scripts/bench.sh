#!/usr/bin/env bash
# Reproduces the routing-quality report (bench/results/latest.json and .png) in under 10 minutes on
# 2 cores: every strategy against the ideal queue on a simulated heterogeneous fleet.
# Arguments go to the benchmark (e.g. --fleet a:2:6,b:8:12 --loads 0.8 --seed 7).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
"$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,bench]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
exec "$PY" -m bench.routing.run "$@"
