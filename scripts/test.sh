#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what it needs, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k agent).
set -euo pipefail
PADDLER_SETUP_FOR_TESTS=1
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
mkdir -p artifacts

# The container tests (tests/containers) need a Docker engine and the local base images
# (debootstrap, no registry here). Start dockerd when no engine answers, and stop it on exit;
# build the bases when absent (the images themselves are built, or found by their content
# hash, by the tests). If Docker cannot run, those tests skip and say why; under CI
# (CI=true) PADDLER_REQUIRE_DOCKER=1 makes them fail instead. Logs: artifacts/docker/.
if [ "${CI:-}" = true ]; then export PADDLER_REQUIRE_DOCKER="${PADDLER_REQUIRE_DOCKER:-1}"; fi
DOCKERD_PID=""
stop_dockerd() {
    if [ -n "$DOCKERD_PID" ]; then
        echo "test: stopping the dockerd this run started (pid $DOCKERD_PID)" >&2
        "$PY" -m devstack.docker_env stop "$DOCKERD_PID" || true
    fi
}
trap stop_dockerd EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if engine="$("$PY" -m devstack.docker_env engine)"; then
    if [ "${engine#started }" != "$engine" ]; then
        DOCKERD_PID="${engine#started }"
        echo "test: started dockerd (pid $DOCKERD_PID)" >&2
    fi
    "$PY" -m devstack.docker_env bases >/dev/null \
        || echo "test: building the base images failed; the container tests will say why" >&2
else
    echo "test: no Docker engine; the container tests will skip (fail under CI)" >&2
fi

# Lint and types first (strict on fleet/, agentcheck/, generator/; settings in pyproject.toml).
# A finding fails the run, but pytest still runs so one pass shows everything that is wrong.
status=0
echo "test: ruff check" >&2
"$PY" -m ruff check . || status=$?
echo "test: mypy (strict: fleet agentcheck generator)" >&2
"$PY" -m mypy || status=$?

# Not exec: the EXIT trap must run after pytest.
"$PY" -m pytest -ra --junitxml=artifacts/junit.xml "$@" || status=$?
exit "$status"
