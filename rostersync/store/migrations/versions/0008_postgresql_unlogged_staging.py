"""PostgreSQL: the staging tables are unlogged

Staging holds a run's fetched rows between the fetch and the apply, then they are deleted: a
million enrollments written, read once and deleted, all of it through the write-ahead log.
Unlogged tables skip the log. What they give up is their content after a server crash (the
server empties them) and on a standby; neither matters for staging, which no standby reads
and which a crash mid-run throws away anyway (the run fails). The one run whose staged rows
outlive it, a held run awaiting approval, is checked before it is applied: if its rows are
gone, approval refuses and asks for a new sync.

SQLite has no unlogged tables: nothing changes there.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("staging_org", "staging_person", "staging_class", "staging_enrollment")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET UNLOGGED")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET LOGGED")
