"""roster_* and staging_* raw_hash: the fingerprint of the source's record as it came

A full run of a OneRoster source reads every record; on a typical night almost all of them
are byte for byte what the mirror was built from. With the fingerprint of each mirror row's
record stored, a decode worker recognises those without normalizing them (rostersync.sync
.known). NULL for rows from before this revision and from connectors that give none: those
are normalized and compared as before.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

TABLES = [f"{family}_{kind}" for family in ("roster", "staging") for kind in ("org", "person", "class", "enrollment")]  # fmt: skip


def upgrade() -> None:
    # A plain ADD COLUMN, not a batch copy: SQLite adds a nullable column without rewriting
    # the table, and the mirror of a large district is millions of rows.
    for table in TABLES:
        op.add_column(table, sa.Column("raw_hash", sa.String(length=32), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("raw_hash")
