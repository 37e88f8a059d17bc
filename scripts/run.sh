#!/usr/bin/env bash
# The main job on its embedded default: llama-server (tiny model) + paddler-agent + HAProxy
# on loopback. Ctrl-C stops everything. Arguments go to the demo (--model FILE.gguf, --slots N).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec "$PY" -m devstack.demo "$@"
