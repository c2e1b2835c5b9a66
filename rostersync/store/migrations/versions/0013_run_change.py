"""run_change: the exact change set of a held run (or of a dry run asked for it)

``runs show ID --changes`` lists every user a held run would create, link, archive or
restore and every group it would create, rename, remove or update; the held run's apply is
rolled back, so its findings are stored here, one row per run.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_change",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("users", sa.JSON(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=False),
        sa.Column("members_listed", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["sync_run.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id"),
    )


def downgrade() -> None:
    op.drop_table("run_change")
