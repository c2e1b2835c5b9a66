"""roster_person .member_email, .member_name: a person's values as a group member, stored

Every group member row holds its student's email, lower-cased and trimmed, and name. The
resyncs computed both in SQL for each membership: at district L a first load's million member
rows spent a third of their fill on the expressions (a student is in several classes). Stored
generated columns compute them once per person write, with the same expressions, so the
values are those the resyncs computed before, on each database.

SQLite adds a stored generated column only by rebuilding the table (``ALTER TABLE ADD COLUMN``
takes virtual ones alone); the rebuild computes the values with the connection's Unicode
``LOWER`` (rostersync.store.db). PostgreSQL adds them in place, rewriting the table.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# The expressions as rostersync.store.tables declares them at this revision.
MEMBER_EMAIL_SQL = "NULLIF(LOWER(TRIM(COALESCE(email, ''))), '')"
MEMBER_NAME_SQL = "TRIM(COALESCE(given_name, '') || ' ' || COALESCE(family_name, ''))"


def _columns() -> list[sa.Column[str]]:
    return [
        sa.Column("member_email", sa.Text(), sa.Computed(MEMBER_EMAIL_SQL, persisted=True)),
        sa.Column("member_name", sa.Text(), sa.Computed(MEMBER_NAME_SQL, persisted=True)),
    ]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("roster_person", recreate="always") as batch:
            for column in _columns():
                batch.add_column(column)
        return
    for column in _columns():
        op.add_column("roster_person", column)


def downgrade() -> None:
    with op.batch_alter_table("roster_person") as batch:
        batch.drop_column("member_name")
        batch.drop_column("member_email")
