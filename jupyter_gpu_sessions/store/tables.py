"""The tables. Schema changes go through an Alembic migration in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
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
    # The kernel's last log lines, kept when its container is removed (migration 0003).
    Column("log_tail", Text, nullable=True),
    # An owner's sessions newest first, as the API lists them, without a sort (0003).
    Index("ix_sessions_owner_created", "owner", "created_at", "id"),
    # A batch session's launch (migration 0004): {"command": [...], "vfolders": [...],
    # "env": {...}, "cwd": "..."}. A kernel's (their provisioner holds the launch): what a
    # restarted server re-attaches it with, {"attachment": {...}, "connection": {...}}.
    Column("launch", JSON, nullable=True),
    # A session found by its name: the owner's newest of that name (0004).
    Index("ix_sessions_owner_name", "owner", "name", "created_at"),
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
    # Bumped by writes to sessions that add no history row (a pass's waiting data, history
    # clearing): with the newest history id, it tells a reader whether any listed session
    # changed (migration 0003).
    Column("changes", Integer, nullable=False, default=0),
)

# Storage folders (migration 0002). A row lives until the vfolder is purged; the trash is
# status "trashed". Names are unique per owner among user vfolders (trash included, so a
# restore never clashes) and per group among project vfolders.
vfolders = Table(
    "vfolders",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("type", String(8), nullable=False),  # user | project
    Column("owner", String(128), nullable=False, index=True),
    Column("group_name", String(128), nullable=True),  # project vfolders only
    Column("backend", String(16), nullable=False),  # directory | loopback
    Column("quota", BigInteger, nullable=True),  # bytes; None: unlimited (directory only)
    Column("cloneable", Boolean, nullable=False, default=False),
    # creating | ready | trashed | purging (creating/purging: storage work in progress)
    Column("status", String(10), nullable=False, index=True),
    Column("group_permission", String(2), nullable=True),  # project: what members get
    Column("created_at", Float, nullable=False),
    Column("trashed_at", Float, nullable=True),
    Index(
        "ux_vfolders_user_name",
        "owner",
        "name",
        unique=True,
        sqlite_where=Column("type") == "user",
        postgresql_where=Column("type") == "user",
    ),
    Index(
        "ux_vfolders_project_name",
        "group_name",
        "name",
        unique=True,
        sqlite_where=Column("type") == "project",
        postgresql_where=Column("type") == "project",
    ),
)

# Who else may use a vfolder: invitations (state invited → accepted | declined) and, for
# project vfolders, per-user overrides of the group's permission (stored accepted).
vfolder_shares = Table(
    "vfolder_shares",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("vfolder_id", String(32), ForeignKey("vfolders.id", ondelete="CASCADE"), nullable=False),
    Column("user", String(128), nullable=False, index=True),
    Column("permission", String(2), nullable=False),  # ro | rw | wd
    Column("state", String(10), nullable=False),  # invited | accepted | declined
    Column("invited_by", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ux_vfolder_shares_user", "vfolder_id", "user", unique=True),
)

# Policies set through the API (migration 0003); they override the configured ones per
# scope ("default", "group:NAME", "user:NAME") and apply from the next scheduling pass.
policies = Table(
    "policies",
    metadata,
    Column("scope", String(200), primary_key=True),
    Column("limits", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(128), nullable=False),
)

# People the API has seen (so a share names someone real), with their groups as last seen.
users = Table(
    "users",
    metadata,
    Column("username", String(128), primary_key=True),
    Column("groups", JSON, nullable=False, default=list),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

# One row per manager process: when its scheduling and reconcile passes last ran.
managers = Table(
    "managers",
    metadata,
    Column("id", String(300), primary_key=True),  # host:pid:start
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
    Column("passes", JSON, nullable=False, default=dict),
)

# Per-session API tokens (migration 0004): what a kernel or batch job presents to the API.
# Only the SHA-256 of a token is stored; a token acts for its session's owner (never as an
# admin) and dies when its session ends (a terminal status), whatever its row says.
session_tokens = Table(
    "session_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("session_id", String(32), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_session_tokens_session", "session_id"),
)
