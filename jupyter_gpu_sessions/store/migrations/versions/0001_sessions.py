"""Sessions, their status history, live device allocations, the queue sequence.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("kernel_id", sa.String(64), nullable=True),
        sa.Column("image", sa.String(512), nullable=False),
        sa.Column("runtime", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("devices", sa.JSON, nullable=False),
        sa.Column("depends_on", sa.JSON, nullable=False),
        sa.Column("scheduler", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("oom_killed", sa.Boolean, nullable=False),
        sa.Column("container_id", sa.String(128), nullable=True),
        sa.Column("process_host", sa.String(255), nullable=False),
        sa.Column("process_pid", sa.Integer, nullable=False),
        sa.Column("process_started", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
    )
    op.create_index("ix_sessions_owner", "sessions", ["owner"])
    op.create_index("ix_sessions_kernel_id", "sessions", ["kernel_id"])
    op.create_index("ix_sessions_status", "sessions", ["status"])
    op.create_index("ix_sessions_created_at", "sessions", ["created_at"])
    op.create_table(
        "session_status_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "session_id",
            sa.String(32),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_history_session", "session_status_history", ["session_id", "id"])
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "session_id",
            sa.String(32),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("gpu_uuid", sa.String(128), nullable=False),
        sa.Column("device_uuid", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("fraction", sa.Float, nullable=False),
    )
    op.create_index("ix_allocations_session", "allocations", ["session_id"])
    op.create_index(
        "ux_allocations_exclusive_device",
        "allocations",
        ["device_uuid"],
        unique=True,
        sqlite_where=sa.text("kind != 'share'"),
        postgresql_where=sa.text("kind != 'share'"),
    )

    queue_state = op.create_table(
        "queue_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
    )
    op.bulk_insert(queue_state, [{"id": 1, "seq": 0}])


def downgrade() -> None:
    op.drop_table("queue_state")
    op.drop_table("allocations")
    op.drop_table("session_status_history")
    op.drop_table("sessions")
