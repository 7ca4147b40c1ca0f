#!/usr/bin/env bash
# The one test command: sets up everything the suite needs on a fresh machine (Docker
# engine, mmdebstrap, chromium for the browser tests, the virtualenv, the kernel image)
# and runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k interrupt
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_system_packages
ensure_browser
ensure_postgres
ensure_docker || die "the test suite needs a Docker engine (CI=${CI:-}); see the messages above"
ensure_venv "test"
ensure_labextension "test"
ensure_hub_proxy
open_python_to_users
ensure_image

say "Lint (ruff)"
"$VENV/bin/ruff" check "$REPO_DIR"
"$VENV/bin/ruff" format --check "$REPO_DIR"

say "JupyterLab extension: lint (eslint, prettier) and unit tests (jest)"
# The package's scripts call jlpm themselves: the virtualenv's bin first on PATH.
(cd "$REPO_DIR/labextension" && export PATH="$VENV/bin:$PATH" && jlpm lint:check && jlpm test --ci)

say "Layer contracts (import-linter)"
(cd "$REPO_DIR" && "$VENV/bin/lint-imports")

if [ -z "${JGS_TEST_POSTGRES_URL:-}" ]; then
  # The store tests run on SQLite and on PostgreSQL: a throwaway cluster of this run's own,
  # reachable only through a socket in its directory, stopped and removed on exit.
  say "Starting a throwaway PostgreSQL cluster"
  POSTGRES_DIR="$(mktemp -d "${TMPDIR:-/tmp}/jgs-postgres.XXXXXX")"
  trap 'stop_test_postgres "$POSTGRES_DIR"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  JGS_TEST_POSTGRES_URL="$(start_test_postgres "$POSTGRES_DIR")"
  export JGS_TEST_POSTGRES_URL
fi

say "Test suite"
cd "$REPO_DIR"
# Two workers (this kind of machine has two cores); a file's tests stay on one worker so
# its shared kernel does too.
# A temp root of this run's own: pytest prunes old numbered dirs under the shared default
# root, which would delete a concurrent run's stores and working directories.
# Not exec'd: the cluster above is stopped after pytest, whose exit code this keeps (and
# whose summary stays the last line: stopping prints nothing).
status=0
"$VENV/bin/python" -m pytest -n "${JGS_TEST_WORKERS:-2}" --dist loadfile \
  --basetemp "$(mktemp -d "${TMPDIR:-/tmp}/jgs-tests.XXXXXX")" "$@" || status=$?
exit "$status"
