# Shared set-up steps for scripts/test.sh and scripts/run-lab.sh (sourced, not run).
# Each step is idempotent: it does nothing when its piece is already there.

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JGS_VENV:-$REPO_DIR/.venv}"
DOCKERD_LOG="${JGS_DOCKERD_LOG:-/var/log/jupyter-gpu-sessions-dockerd.log}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_install() {
  # apt_install PACKAGE... — only as root; otherwise say what to run.
  if [ "$(id -u)" != 0 ]; then
    die "missing packages: $*. Install them with: sudo apt-get install -y $*"
  fi
  say "Installing $* (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_system_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  # Node.js builds the JupyterLab extension (pip's build hook runs jlpm); users never need it.
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  # docker.io brings tini as docker-init, used for init=True.
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

ensure_browser() {
  # Debian's chromium, for the browser tests (driven by Playwright with
  # executable_path=/usr/bin/chromium; Playwright's own browser download is never used).
  [ -x /usr/bin/chromium ] || apt_install chromium
}

ensure_docker() {
  # A reachable Docker engine; start dockerd in the background when none runs.
  if docker info >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "error: the Docker engine is not reachable and only root can start it here: run \`sudo systemctl start docker\` (or \`sudo dockerd &\`), or run this script as root" >&2
    return 1
  fi
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  say "Starting dockerd (log: $DOCKERD_LOG)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  # A session of its own: ending the job that started it (a killed test run, a
  # terminal closed) must not take the engine and every running kernel with it.
  setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  tail -n 20 "$DOCKERD_LOG" >&2 || true
  echo "error: dockerd did not come up within 60 s (see $DOCKERD_LOG)" >&2
  return 1
}

ensure_venv() {
  # ensure_venv EXTRAS — the project installed (editable) with those extras.
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    say "Creating the virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  say "Installing jupyter-gpu-sessions[$extras] into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO_DIR[$extras]"
}

ensure_labextension() {
  # ensure_labextension EXTRAS — the JupyterLab extension's npm dependencies, exactly as
  # yarn.lock pins them (for its lint and unit tests), and its build. The editable install
  # builds it (pip's build hook) when it is missing or older than labextension/src; when
  # that hook was skipped (HATCH_JUPYTER_BUILDER_SKIP_NPM), build it here and install again
  # so the virtualenv's share/jupyter/labextensions gets it.
  (cd "$REPO_DIR/labextension" && "$VENV/bin/jlpm" install --immutable)
  if [ ! -f "$REPO_DIR/jupyter_gpu_sessions/labextension/static/style.js" ]; then
    say "Building the JupyterLab extension"
    (cd "$REPO_DIR/labextension" && PATH="$VENV/bin:$PATH" "$VENV/bin/jlpm" build:prod)
    ensure_venv "$1"
  fi
}

ensure_hub_proxy() {
  # configurable-http-proxy for JupyterHub (the example deployment and its tests), from
  # npm, exactly as examples/jupyterhub/package-lock.json pins it.
  local dir="$REPO_DIR/examples/jupyterhub"
  if [ ! -x "$dir/node_modules/.bin/configurable-http-proxy" ]; then
    say "Installing configurable-http-proxy (npm ci in examples/jupyterhub)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
}

open_python_to_users() {
  # The Hub (its tests, scripts/run-hub.sh) starts each user's server as that OS user, with
  # this virtualenv's jupyterhub-singleuser: its interpreter and libraries must be reachable
  # by other users. Gives traversal only (o+x: no listing) to each directory above the
  # virtualenv and its base interpreter that lacks it (e.g. /root, 0700, when the base
  # Python lives in /root/.pyenv), and says which.
  [ "$(id -u)" = 0 ] || return 0
  local place dir perms opened=()
  for place in "$VENV" "$("$VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys.executable))')" \
    "$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')"; do
    dir="$place"
    while [ "$dir" != / ]; do
      [ -d "$dir" ] || { dir="$(dirname "$dir")"; continue; }
      perms="$(stat -c %A "$dir")"
      if [ "${perms:9:1}" != x ] && [ "${perms:9:1}" != t ]; then
        chmod o+x "$dir"
        opened+=("$dir")
      fi
      dir="$(dirname "$dir")"
    done
  done
  if [ ${#opened[@]} -gt 0 ]; then
    echo "note: made ${opened[*]} traversable by other users (o+x, no listing), so that the Hub's users' servers can run $VENV" >&2
  fi
}

ensure_image() {
  # The default kernel image; built only when its tag (a hash of its recipe) is missing.
  "$VENV/bin/jupyter" gpu-sessions image build
}

postgres_bindir() {
  # The newest installed PostgreSQL server's bin directory (Debian keeps initdb and pg_ctl
  # off PATH, in /usr/lib/postgresql/VERSION/bin).
  local initdb
  initdb="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$initdb" ] && dirname "$initdb"
}

ensure_postgres() {
  # Debian's PostgreSQL server, for the store tests' throwaway cluster (no service needed).
  postgres_bindir >/dev/null || apt_install postgresql
}

_as_postgres() {
  # initdb and the server refuse root: as root, run them as the postgres user.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_test_postgres() {
  # start_test_postgres DIR — a throwaway cluster in DIR (an empty directory, or one this
  # function set up before: then it is reused), reachable only through a Unix socket in
  # DIR, with a database "jgs". Prints its SQLAlchemy URL. Durability is off: it is thrown
  # away with DIR by stop_test_postgres.
  local dir="$1" bin port=5432
  bin="$(postgres_bindir)" || { echo "error: PostgreSQL is not installed" >&2; return 1; }
  [ "$(id -u)" != 0 ] || chown postgres: "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    _as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync \
      --no-locale -E UTF8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  fi
  if ! _as_postgres "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    _as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
      -o "-k '$dir' -p $port -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >/dev/null || { tail -n 20 "$dir/postgres.log" >&2; return 1; }
  fi
  if [ -z "$(_as_postgres "$bin/psql" -h "$dir" -p $port -U postgres -d postgres -Atq \
    -c "SELECT 1 FROM pg_database WHERE datname = 'jgs'")" ]; then
    _as_postgres "$bin/createdb" -h "$dir" -p $port -U postgres jgs
  fi
  echo "postgresql+psycopg://postgres@/jgs?host=$dir&port=$port"
}

stop_test_postgres() {
  # stop_test_postgres DIR — stop the cluster start_test_postgres made in DIR; remove DIR.
  local dir="$1" bin
  bin="$(postgres_bindir)" || return 0
  if [ -f "$dir/data/postmaster.pid" ]; then
    _as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
}
