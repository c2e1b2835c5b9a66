"""roster_* and staging_* .fp: the fingerprint of each record as the source sent it

A full run of a large district normalized every record only for the filter of known rows to
find nearly all of them unchanged. With each mirror row's fingerprint of the record's bytes,
the decode workers recognise an unchanged record before parsing it and send back its
fingerprint alone (rostersync.sync.known). NULL (every row before this revision, and the
rows of connectors that give none) means unknown: such a row is compared by its hash, as
before, and the next run that stages its record fills the column in.

A nullable column without a default: on SQLite and PostgreSQL adding it rewrites no row.
The index ``(source, fp, sourced_id)`` on each mirror table lets a run read a source's
fingerprints and ids without reading its rows.

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

KINDS = ("org", "person", "class", "enrollment")
TABLES = [f"{prefix}_{kind}" for prefix in ("roster", "staging") for kind in KINDS]


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("fp", sa.BigInteger(), nullable=True))
    for kind in KINDS:
        op.create_index(f"ix_roster_{kind}_fp", f"roster_{kind}", ["source", "fp", "sourced_id"])


def downgrade() -> None:
    for kind in KINDS:
        op.drop_index(f"ix_roster_{kind}_fp", f"roster_{kind}")
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("fp")
