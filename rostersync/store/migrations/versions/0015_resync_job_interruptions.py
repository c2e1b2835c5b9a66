"""resync_job.interruptions: how often the process running the job died before it finished

A job whose process dies goes back to the queue without counting the attempt (it did not
fail, its process did). A job that kills its process every time (memory, a crash in a
driver) was therefore retried for ever. The count lets such a job be leased on its own, so
its batch-mates are not held hostage, and fail after a few interruptions.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("resync_job") as batch:
        batch.add_column(
            sa.Column("interruptions", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("resync_job") as batch:
        batch.drop_column("interruptions")
