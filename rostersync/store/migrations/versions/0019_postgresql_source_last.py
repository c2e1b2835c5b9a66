"""PostgreSQL: the mirror's secondary indexes end with the source instead of leading with it

Each of them led with ``source``, a text column equal on every row of an installation with
one source. PostgreSQL compares index keys column by column, so every comparison of a sort or
a descent went through that text first: a first load's index builds and the new groups'
member reads took several times as long as with the source last (figures in
tests/benchmarks/README.md). The reads filter on the source all the same, from the index's
last column. SQLite keeps its indexes: its member reads are planned without statistics and
need the source first.

Rebuilding the indexes reads each mirror table once; on a large district's database allow
a minute. Nothing changes on SQLite.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

#: (index, table, its columns before the source)
INDEXES = (
    ("ix_roster_org_fp", "roster_org", ("fp", "sourced_id")),
    ("ix_roster_person_fp", "roster_person", ("fp", "sourced_id")),
    ("ix_roster_class_fp", "roster_class", ("fp", "sourced_id")),
    ("ix_roster_enrollment_fp", "roster_enrollment", ("fp", "sourced_id")),
    ("ix_roster_person_email", "roster_person", ("email",)),
    ("ix_roster_enr_class", "roster_enrollment", ("class_id", "role", "user_id")),
    ("ix_roster_enr_user", "roster_enrollment", ("user_id", "role")),
)


def _rebuild(source_first: bool) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table, columns in INDEXES:
        op.drop_index(name, table_name=table)
        ordered = ["source", *columns] if source_first else [*columns, "source"]
        op.create_index(name, table, ordered)


def upgrade() -> None:
    _rebuild(source_first=False)


def downgrade() -> None:
    _rebuild(source_first=True)
