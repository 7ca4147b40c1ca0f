"""Engine set-up: SQLite in WAL mode with serialized write transactions; migrations at open."""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, String, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
WRITE = {"jgs_write": True}


def dump_json(value) -> str:
    """Deterministic JSON, so a pass can compare stored text instead of parsing it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class json_text(FunctionElement):
    """A JSON column as the text stored: the column itself on SQLite, which keeps JSON as
    text; a cast to text on PostgreSQL, whose driver would decode a ``json`` value (and
    which has no ``=`` for ``json``). Its ``json`` type keeps the text as written."""

    type = String()
    name = "json_text"
    inherit_cache = True


@compiles(json_text)
def _json_text(element, compiler, **kw) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(json_text, "postgresql")
def _json_text_postgresql(element, compiler, **kw) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS TEXT)"


def make_engine(url: str) -> Engine:
    """An engine for ``url``. On SQLite: WAL, foreign keys, a generous busy timeout, and
    ``BEGIN IMMEDIATE`` for write transactions, so two processes never interleave an
    allocation (DESIGN.md decision 1)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, json_serializer=dump_json)
    if parsed.database and parsed.database != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": 60, "check_same_thread": False},
        json_serializer=dump_json,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("jgs_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One serialized write transaction: ``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped
    advisory lock on PostgreSQL."""
    with engine.connect() as conn:
        conn = conn.execution_options(**WRITE)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7311520914)"))
            yield conn


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic), once across processes. A store
    already at the newest migration (every open but the first) is seen with one query,
    without loading Alembic (a fresh process, e.g. papermill's, saves its import)."""
    if _at_head(engine):
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(engine), engine.connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        conn.commit()


def _at_head(engine: Engine) -> bool:
    """Whether the database records exactly the newest migration of this package."""
    head = head_revision()
    if head is None:
        return False
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except SQLAlchemyError:
        return False  # a new database (no version table yet): Alembic's to handle
    return stored == [head]


@functools.cache
def head_revision() -> str | None:
    """The newest migration's revision, read from the migration files themselves (no
    Alembic import); None unless they name exactly one head (then Alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            values = {
                target.id: ast.literal_eval(node.value)
                for node in tree.body
                if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name) and target.id in ("revision", "down_revision")
            }
        except (OSError, SyntaxError, ValueError):
            return None
        revision, down = values.get("revision"), values.get("down_revision")
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, tuple | list):
            parents.update(down)
        elif down is not None:
            return None
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        # A session-level advisory lock on a connection of its own: processes that open a
        # new database at once migrate it one after the other.
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("SELECT pg_advisory_lock(7311520915)")
            )
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7311520915)"))
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(os.path.abspath(database) + ".migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
