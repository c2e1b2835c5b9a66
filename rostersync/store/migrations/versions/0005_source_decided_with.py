"""source_state.decided_with: the provisioning settings a source's last run decided with

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows stay NULL: the next delta run of each source re-decides every teacher once.
    with op.batch_alter_table("source_state") as batch:
        batch.add_column(
            sa.Column("decided_with", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("source_state") as batch:
        batch.drop_column("decided_with")
