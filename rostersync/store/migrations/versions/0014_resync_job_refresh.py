"""resync_job.refresh: the job re-reads every member of the user's groups

A manual, import or live resync re-reads every member; a sync's job reads only what the run
marked. That used to be said by ``run_id`` being NULL, so a sync's job merging into a queued
manual job lost its run, and the groups it changed were missing from the run's report. The
flag says it on its own, and the merged job keeps both the run and the full re-read.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("resync_job") as batch:
        batch.add_column(
            sa.Column("refresh", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute("UPDATE resync_job SET refresh = true WHERE run_id IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("resync_job") as batch:
        batch.drop_column("refresh")
