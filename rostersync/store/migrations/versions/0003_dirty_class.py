"""dirty_class: classes whose group members the next resync must re-read

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dirty_class",
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("class_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.PrimaryKeyConstraint("source", "class_id"),
    )
    # Existing deployments: every group was materialised by a full read, so nothing is dirty.


def downgrade() -> None:
    op.drop_table("dirty_class")
