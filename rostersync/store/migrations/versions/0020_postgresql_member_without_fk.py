"""PostgreSQL: group_member without its foreign key to groups

A group's members went in with a trigger per row that checked the group: about half of a
first load's member fill on PostgreSQL (all 10,002 groups of district M in one statement:
2.75 s with the key, 1.44 s without; figures in tests/benchmarks/README.md). The one place
that removes groups (rostersync.resync.groups) removes their members first, in the same
transaction, which is what the key's ``ON DELETE CASCADE`` did. SQLite keeps its key: its
check is an index probe in the same statement, and dropping it would rebuild the table.

Nothing is rewritten: dropping the key is a catalog change (a brief exclusive lock on both
tables); adding it back on downgrade checks every member row once.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

#: The key's name as PostgreSQL named it when the table was made, and as downgrade makes it.
NAME = "group_member_group_id_fkey"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    names = (
        bind.execute(
            text(
                "SELECT conname FROM pg_constraint WHERE contype = 'f' "
                "AND conrelid = CAST('group_member' AS regclass) "
                "AND confrelid = CAST('groups' AS regclass)"
            )
        )
        .scalars()
        .all()
    )
    for name in names:  # one, unless an admin added another
        op.drop_constraint(name, "group_member", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_foreign_key(
            NAME, "group_member", "groups", ["group_id"], ["id"], ondelete="CASCADE"
        )
