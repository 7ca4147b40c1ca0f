"""Storage folders (vfolders) and their shares.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vfolders",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("group_name", sa.String(128), nullable=True),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("quota", sa.BigInteger, nullable=True),
        sa.Column("cloneable", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("group_permission", sa.String(2), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("trashed_at", sa.Float, nullable=True),
    )
    op.create_index("ix_vfolders_owner", "vfolders", ["owner"])
    op.create_index("ix_vfolders_status", "vfolders", ["status"])
    # The database's own guard against two vfolders of one name (trash included).
    op.create_index(
        "ux_vfolders_user_name",
        "vfolders",
        ["owner", "name"],
        unique=True,
        sqlite_where=sa.text("type = 'user'"),
        postgresql_where=sa.text("type = 'user'"),
    )
    op.create_index(
        "ux_vfolders_project_name",
        "vfolders",
        ["group_name", "name"],
        unique=True,
        sqlite_where=sa.text("type = 'project'"),
        postgresql_where=sa.text("type = 'project'"),
    )
    op.create_table(
        "vfolder_shares",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "vfolder_id",
            sa.String(32),
            sa.ForeignKey("vfolders.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("permission", sa.String(2), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("invited_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_vfolder_shares_user", "vfolder_shares", ["user"])
    op.create_index("ux_vfolder_shares_user", "vfolder_shares", ["vfolder_id", "user"], unique=True)


def downgrade() -> None:
    op.drop_table("vfolder_shares")
    op.drop_table("vfolders")
