"""The tables. Schema changes go through an Alembic migration in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False, default=""),
    Column("owner", String(128), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # interactive | batch
    Column("kernel_id", String(64), nullable=True, index=True),
    Column("image", String(512), nullable=False),
    Column("runtime", String(16), nullable=False),
    Column("request", JSON, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("reason", Text, nullable=False, default=""),
    # What the session held (kept after release, for history and the API).
    Column("devices", JSON, nullable=False, default=list),
    Column("depends_on", JSON, nullable=False, default=list),
    # Scheduler data: checks that failed with their messages, attempts, queue position.
    Column("scheduler", JSON, nullable=False, default=dict),
    Column("attempts", Integer, nullable=False, default=0),  # scheduling passes it failed
    Column("exit_code", Integer, nullable=True),
    Column("oom_killed", Boolean, nullable=False, default=False),
    Column("container_id", String(128), nullable=True),
    # The process that started the session: its kernels end when it is gone.
    Column("process_host", String(255), nullable=False),
    Column("process_pid", Integer, nullable=False),
    Column("process_started", Float, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float, nullable=True),
    Column("ended_at", Float, nullable=True),
)

status_history = Table(
    "session_status_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(32), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("at", Float, nullable=False),
    Index("ix_history_session", "session_id", "id"),
)

# Live allocations only: a row exists while a session holds the slot. Whole GPUs and MIG
# instances are unique per device (the partial unique index is the database's own guard
# against handing one device to two sessions); shares are summed per GPU by the scheduler.
allocations = Table(
    "allocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(32), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("gpu_uuid", String(128), nullable=False),
    Column("device_uuid", String(128), nullable=False),
    Column("kind", String(8), nullable=False),  # gpu | mig | share
    Column("fraction", Float, nullable=False),
    Index("ix_allocations_session", "session_id"),
    Index(
        "ux_allocations_exclusive_device",
        "device_uuid",
        unique=True,
        sqlite_where=Column("kind") != "share",
        postgresql_where=Column("kind") != "share",
    ),
)

# One row: a sequence a scheduling pass bumps when it changes what other processes keep in
# their in-memory queues (attempts), so a process can tell whether it may update its queue
# from the history alone or must read it again.
queue_state = Table(
    "queue_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", Integer, nullable=False, default=0),
)
