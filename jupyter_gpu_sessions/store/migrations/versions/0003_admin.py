"""Kernel log tails, API-set policies, known users, manager health, a change counter.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("log_tail", sa.Text, nullable=True))
    op.create_index("ix_sessions_owner_created", "sessions", ["owner", "created_at", "id"])
    with op.batch_alter_table("queue_state") as batch:
        batch.add_column(sa.Column("changes", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "policies",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("limits", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("username", sa.String(128), primary_key=True),
        sa.Column("groups", sa.JSON, nullable=False),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
    )
    op.create_table(
        "managers",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False),
        sa.Column("passes", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("managers")
    op.drop_table("users")
    op.drop_table("policies")
    with op.batch_alter_table("queue_state") as batch:
        batch.drop_column("changes")
    op.drop_index("ix_sessions_owner_created", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("log_tail")
