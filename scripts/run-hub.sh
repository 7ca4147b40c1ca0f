#!/usr/bin/env bash
# For a lab: the example JupyterHub (examples/jupyterhub/jupyterhub_config.py) with the GPU
# sessions manager as a Hub-managed service on PostgreSQL, and users' servers in remote mode.
# As root on a fresh Debian/Ubuntu machine. Creates the demo OS users jgs-ada, jgs-bob and
# jgs-cy (the Hub admin) when missing, and a PostgreSQL cluster of its own under
# examples/jupyterhub/.state (kept between runs). Extra arguments go to `jupyterhub`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || die "run this as root: the Hub starts each user's server as that OS user"
ensure_system_packages
ensure_postgres
ensure_docker || die "the manager service needs a Docker engine"
ensure_venv "hub,dev"
ensure_hub_proxy
ensure_image

EXAMPLE="$REPO_DIR/examples/jupyterhub"
STATE="${JGS_HUB_STATE:-$EXAMPLE/.state}"
# 0711: the postgres user passes through to its cluster; nobody else may list it. The
# Hub's own files (its database, cookie secret) live in $STATE/hub, root's alone.
mkdir -p "$STATE/hub"
chmod 711 "$STATE"
chmod 700 "$STATE/hub"

export JGS_HUB_USERS="${JGS_HUB_USERS:-jgs-ada,jgs-bob,jgs-cy}"
IFS=, read -r -a users <<<"$JGS_HUB_USERS"
for user in "${users[@]}"; do
  if ! id "$user" >/dev/null 2>&1; then
    say "Creating the OS user $user (a demo login)"
    useradd -m -s /bin/bash "$user"
  fi
done

# Users' servers run this virtualenv's jupyterhub-singleuser as themselves.
open_python_to_users

if [ -z "${JUPYTER_GPU_SESSIONS_DB_URL:-}" ]; then
  say "PostgreSQL for the manager's store (cluster in $STATE/postgres)"
  mkdir -p "$STATE/postgres"
  chmod 700 "$STATE/postgres" # its socket is there: the postgres user's (and root's) alone
  JUPYTER_GPU_SESSIONS_DB_URL="$(start_test_postgres "$STATE/postgres")"
  export JUPYTER_GPU_SESSIONS_DB_URL
fi
# The demo logins' passwords (SharedPasswordAuthenticator): made once, kept root's alone.
secret() { # secret FILE LENGTH — FILE's password, made (LENGTH characters) when missing
  [ -f "$1" ] || (umask 077 && head -c 64 /dev/urandom | base64 | tr -d '/+=\n' | head -c "$2" >"$1")
  cat "$1"
}
export JGS_HUB_PASSWORD="${JGS_HUB_PASSWORD:-$(secret "$STATE/password" 16)}"
export JGS_HUB_ADMIN_PASSWORD="${JGS_HUB_ADMIN_PASSWORD:-$(secret "$STATE/admin-password" 40)}"
# NVML wins when an NVIDIA driver answers; otherwise these simulated GPUs are used.
export JUPYTER_GPU_SESSIONS_SIMULATED_GPUS="${JUPYTER_GPU_SESSIONS_SIMULATED_GPUS:-4xA100-80GB}"

say "JupyterHub on http://127.0.0.1:${JGS_HUB_PORT:-8000}/ — log in as ${users[*]} with the password in $STATE/password (the admins: $STATE/admin-password)"
cd "$STATE/hub"
exec "$VENV/bin/jupyterhub" -f "$EXAMPLE/jupyterhub_config.py" "$@"
