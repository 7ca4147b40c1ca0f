"""Batch sessions' launch, sessions by name, per-session API tokens.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("launch", sa.JSON, nullable=True))
    op.create_index("ix_sessions_owner_name", "sessions", ["owner", "name", "created_at"])
    op.create_table(
        "session_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column(
            "session_id",
            sa.String(32),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_session_tokens_session", "session_tokens", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_session_tokens_session", table_name="session_tokens")
    op.drop_table("session_tokens")
    op.drop_index("ix_sessions_owner_name", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("launch")
