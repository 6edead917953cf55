#!/usr/bin/env bash
# Runs the demo: the gateway and one local agent (backendai-jupyter up), then JupyterLab.
# Ctrl-C stops both; kernels started by the demo are shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${BACKENDAI_GATEWAY_PORT:-8470}
LAB_PORT=${LAB_PORT:-8888}
LOG=$(mktemp -t backendai-up.XXXXXX.log)

"$VENV/bin/backendai-jupyter" up --port "$PORT" >"$LOG" 2>&1 &
UP_PID=$!
cleanup() {
    kill -INT "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for _ in $(seq 1 60); do
    if grep -q "backendai-jupyter is up" "$LOG"; then break; fi
    if ! kill -0 "$UP_PID" 2>/dev/null; then cat "$LOG"; echo "backendai-jupyter up failed (log above)" >&2; exit 1; fi
    sleep 0.5
done
grep -E "is up|client config" "$LOG"
echo "gateway log: $LOG"
echo "Open JupyterLab and pick \"Python 3 (Backend.AI)\" in the launcher."
LAB_ARGS=(--no-browser --port "$LAB_PORT" --ServerApp.ip=127.0.0.1)
if [[ $(id -u) -eq 0 ]]; then LAB_ARGS+=(--allow-root); fi
"$VENV/bin/jupyter" lab "${LAB_ARGS[@]}"
