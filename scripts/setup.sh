#!/usr/bin/env bash
# Install everything the demo and the tests need, idempotently: system packages (HAProxy,
# a C++ toolchain for llama-server), a virtualenv with the project, and a cached llama-server.
# Sourced by scripts/run.sh and scripts/test.sh (which sets PADDLER_SETUP_FOR_TESTS=1 to add
# what only the tests need); leaves PY pointing at the venv's python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PADDLER_VENV:-$ROOT/.venv}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# The dashboard test drives a real headless browser; the Lua bridge's helpers run on Lua 5.3
# (HAProxy's Lua), the Envoy filter's tests on LuaJIT (Envoy's Lua).
if [ "${PADDLER_SETUP_FOR_TESTS:-0}" = 1 ]; then
    command -v chromium >/dev/null || missing+=(chromium)
    command -v lua5.3 >/dev/null || missing+=(lua5.3)
    command -v luajit >/dev/null || missing+=(luajit)
fi
# The container tests: a Docker engine (dockerd; a docker CLI alone is not one), Debian's
# docker-compose 1.29, and debootstrap for the local base images (no registry to pull from).
if [ "${PADDLER_SETUP_FOR_TESTS:-0}" = 1 ]; then
    [ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    [ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 - <<'PYCHECK'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: Python >= 3.11 is required, found {sys.version.split()[0]}")
PYCHECK

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV" >&2
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
echo "setup: installing the project and test dependencies into $VENV" >&2
"$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$PY" -c 'import agentcheck, gguf, pytest' || { echo "setup: pip install failed" >&2; exit 1; }

# Builds llama-server from the pinned llama.cpp source the first time (minutes), then cached.
LLAMA_SERVER="$(cd "$ROOT" && "$PY" -m devstack.llamacpp_build)"
export PADDLER_LLAMA_SERVER="$LLAMA_SERVER"
echo "setup: llama-server at $LLAMA_SERVER" >&2
