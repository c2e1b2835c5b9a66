"""dirty_member: single group members the next resync must re-read

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dirty_member",
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("class_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("person_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.PrimaryKeyConstraint("source", "class_id", "person_id"),
    )
    # Existing deployments: marks of earlier runs are whole classes (dirty_class), still honoured.


def downgrade() -> None:
    op.drop_table("dirty_member")
