"""source_state.license_waiting: a teacher of the source waits for a license seat

A delta run decides only for the teachers its changes touch. A teacher skipped for want of a
seat (``license_limit``) is not touched when a seat frees up elsewhere; this flag makes the
source's next run, delta or not, decide for everyone once seats are free.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("source_state") as batch:
        batch.add_column(
            sa.Column("license_waiting", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("source_state") as batch:
        batch.drop_column("license_waiting")
