"""Store back ends for the tests (a pytest plugin loaded by conftest.py): every test that
takes ``db_url`` runs on SQLite and on a real PostgreSQL, each PostgreSQL test in a fresh
database of its own.

The PostgreSQL server is the one ``JGS_TEST_POSTGRES_URL`` names (scripts/test.sh starts a
throwaway cluster and sets it). Without it, a run outside CI starts a throwaway cluster of
its own (Debian's ``postgresql`` installed is enough), and a run in CI fails: there the
test command must have provided one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

URL_VARIABLE = "JGS_TEST_POSTGRES_URL"
LIB_SH = Path(__file__).resolve().parent.parent / "scripts" / "lib.sh"
STORE_BACKENDS = ("sqlite", "postgresql")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _lib(function: str, directory: str) -> str:
    done = subprocess.run(
        ["bash", "-c", f'source "{LIB_SH}" && {function} "$1"', "lib.sh", directory],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        pytest.fail(f"{function} failed:\n{done.stderr[-3000:]}", pytrace=False)
    return done.stdout.strip()


@pytest.fixture(scope="session")
def postgres_server():
    """The SQLAlchemy URL of a PostgreSQL server whose database may create others."""
    url = os.environ.get(URL_VARIABLE)
    if url:
        yield url
        return
    if _in_ci():
        pytest.fail(
            f"No PostgreSQL for the store tests: {URL_VARIABLE} is unset. The test command "
            "(scripts/test.sh) starts a throwaway cluster and sets it.",
            pytrace=False,
        )
    # A run by hand (e.g. `pytest tests/test_store.py`): a cluster of this process's own.
    directory = tempfile.mkdtemp(prefix="jgs-postgres.")
    try:
        yield _lib("start_test_postgres", directory)
    finally:
        _lib("stop_test_postgres", directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the test server; dropped afterwards."""
    import sqlalchemy as sa

    server = sa.make_url(postgres_server)
    name = f"jgs_test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(store_backend, request, tmp_path) -> str:
    """A new, empty store database: a SQLite file, or a fresh PostgreSQL database."""
    if store_backend == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path}/store.sqlite"
