#!/usr/bin/env bash
# Runs the demo: the gateway and one local agent (backendai-jupyter up), then JupyterLab.
# Ctrl-C stops both; kernels started by the demo are shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${BACKENDAI_GATEWAY_PORT:-8470}
LAB_PORT=${LAB_PORT:-8888}
LOG=$(mktemp -t backendai-up.XXXXXX.log)

UP_ARGS=(--port "$PORT")
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # No NVIDIA GPU here: the demo agent declares two mock GPUs (labelled mock everywhere), so the
    # "Python 3 · 1 GPU" kernel shows how GPU placement works.
    UP_ARGS+=(--Agent.mock_devices=2)
    echo "No NVIDIA GPU found: the demo agent offers 2 mock GPUs."
fi
"$VENV/bin/backendai-jupyter" up "${UP_ARGS[@]}" >"$LOG" 2>&1 &
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
grep -E "is up|client config|vfolder" "$LOG"
echo "gateway log: $LOG"
echo "Open JupyterLab: the file browser shows your vfolders; open one and pick \"Python 3 (Backend.AI)\" in the launcher."
# The file browser shows the user's vfolders (the files kernels see at ~/<vfolder>).
LAB_ARGS=(--no-browser --port "$LAB_PORT" --ServerApp.ip=127.0.0.1
    --ServerApp.contents_manager_class=backendai_jupyter.provisioner.contents.VFolderContentsManager)
if [[ $(id -u) -eq 0 ]]; then LAB_ARGS+=(--allow-root); fi
"$VENV/bin/jupyter" lab "${LAB_ARGS[@]}"
