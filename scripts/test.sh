#!/usr/bin/env bash
# The one test command: sets up everything the suite needs on a fresh machine (Docker
# engine, mmdebstrap, the virtualenv, the kernel image) and runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k interrupt
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_system_packages
ensure_docker || die "the test suite needs a Docker engine (CI=${CI:-}); see the messages above"
ensure_venv "test"
ensure_image

say "Lint (ruff)"
"$VENV/bin/ruff" check "$REPO_DIR"
"$VENV/bin/ruff" format --check "$REPO_DIR"

say "Test suite"
cd "$REPO_DIR"
# Two workers (this kind of machine has two cores); a file's tests stay on one worker so
# its shared kernel does too.
# A temp root of this run's own: pytest prunes old numbered dirs under the shared default
# root, which would delete a concurrent run's stores and working directories.
exec "$VENV/bin/python" -m pytest -n "${JGS_TEST_WORKERS:-2}" --dist loadfile \
  --basetemp "$(mktemp -d "${TMPDIR:-/tmp}/jgs-tests.XXXXXX")" "$@"
