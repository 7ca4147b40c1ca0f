#!/usr/bin/env bash
# The main job: JupyterLab whose "Python 3 (container)" and "Python 3 (1 GPU)" kernels run
# as GPU sessions. Uses local Docker when it can be had (installing and starting it as
# root), simulated GPUs when there is no NVIDIA driver. Extra arguments go to `jupyter lab`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [ "$(id -u)" = 0 ]; then
  ensure_system_packages
fi
docker_ok=1
ensure_docker || docker_ok=0
ensure_venv "dev"
if [ "$docker_ok" = 1 ]; then
  ensure_image
else
  echo "warning: no Docker engine: container kernels will fail to start; kernels with runtime=local still work" >&2
fi

# NVML wins when an NVIDIA driver answers; otherwise these simulated GPUs are used.
export JUPYTER_GPU_SESSIONS_SIMULATED_GPUS="${JUPYTER_GPU_SESSIONS_SIMULATED_GPUS:-4xA100-80GB}"

notebooks="${JGS_NOTEBOOK_DIR:-$REPO_DIR/notebooks}"
mkdir -p "$notebooks"
args=(--ServerApp.root_dir="$notebooks" --ServerApp.ip=127.0.0.1)
if [ "$(id -u)" = 0 ]; then
  # Kernels never run as root: give the notebooks to the uid they run as.
  chown 1000:1000 "$notebooks"
  args+=(--allow-root)
fi
"$VENV/bin/jupyter" gpu-sessions doctor || true
say "Starting JupyterLab in $notebooks"
exec "$VENV/bin/jupyter" lab "${args[@]}" "$@"
