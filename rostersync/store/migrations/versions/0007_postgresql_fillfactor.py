"""PostgreSQL: leave a tenth of each new page free in the tables that delta runs update

A delta run updates rows in place all over the mirror and the groups: an enrollment that
ends, a renamed student's member rows, every changed group's ``updated_at``. A bulk-loaded
table has full pages, so each such update had to put the new row version on another page
and add an entry to every index of the table. With room on the page and no indexed column
changed, PostgreSQL keeps the new version on the same page and leaves the indexes alone (a
"heap-only tuple" update). On district L a 1% delta took 4.6 s instead of 5.7-7.7 s.

The setting applies to pages written from now on; rows already stored keep their pages
until the table is rewritten (``VACUUM FULL``, in a maintenance window, if wanted). SQLite
has no such setting: nothing changes there.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: Tables a delta run updates in place, and how full PostgreSQL fills their new pages.
TABLES = ("roster_person", "roster_class", "roster_enrollment", "groups", "group_member")
FILLFACTOR = 90


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
