#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what it needs, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k agent).
set -euo pipefail
PADDLER_SETUP_FOR_TESTS=1
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
mkdir -p artifacts
exec "$PY" -m pytest -ra --junitxml=artifacts/junit.xml "$@"
