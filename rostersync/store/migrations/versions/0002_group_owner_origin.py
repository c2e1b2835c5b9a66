"""group_owner.origin: owners added by import survive resyncs

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("group_owner", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "origin",
                sqlmodel.sql.sqltypes.AutoString(length=10),
                server_default="roster",
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("group_owner", schema=None) as batch_op:
        batch_op.drop_column("origin")
