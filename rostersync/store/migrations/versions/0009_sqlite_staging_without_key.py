"""SQLite: the staging tables lose their primary key; the apply builds the key index itself

A run's fetch writes every record into staging, a million enrollments for a large district.
With the ``(sourced_id, run_id)`` primary key each row went into a B-tree at the place of its
sourcedId, and real feeds' sourcedIds are GUIDs in no order: every insert landed on a random
page of a million-row tree (11.9 s for a million enrollments, against 2.8 s appended to a
table without a key). Now the fetch appends, and the apply, first thing in its transaction,
settles ids a source repeated within a run (the last row staged wins, as the upsert did) and
builds a unique ``(run_id, sourced_id)`` index in one sort (``prepare_staging``). Clearing a
table empties it and drops that index again.

Rows already staged (a held run awaiting approval) are copied over. PostgreSQL keeps its
keys: its ``COPY`` into staging relies on them to find a repeated id.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _text(length: int, nullable: bool = False) -> tuple[Any, bool]:
    return AutoString(length=length), nullable


def _when() -> tuple[Any, bool]:
    return sa.DateTime(timezone=True), True


def _flag() -> tuple[Any, bool]:
    return sa.Boolean(), False


#: The staging tables' columns as of revision 0008 (0001 created them), key columns first.
COLUMNS: dict[str, dict[str, tuple[Any, bool]]] = {
    "staging_org": {
        "sourced_id": _text(256),
        "name": _text(512),
        "type": _text(40),
        "identifier": _text(256, True),
        "parent_id": _text(256, True),
        "status": _text(12),
        "date_last_modified": _when(),
        "row_hash": _text(16),
    },
    "staging_person": {
        "sourced_id": _text(256),
        "role": _text(40),
        "given_name": _text(256),
        "family_name": _text(256),
        "email": _text(256, True),
        "username": _text(256, True),
        "enabled": _flag(),
        "org_ids": _text(2048),
        "status": _text(12),
        "date_last_modified": _when(),
        "row_hash": _text(16),
    },
    "staging_class": {
        "sourced_id": _text(256),
        "title": _text(512),
        "class_code": _text(256, True),
        "school_id": _text(256, True),
        "status": _text(12),
        "date_last_modified": _when(),
        "row_hash": _text(16),
    },
    "staging_enrollment": {
        "sourced_id": _text(256),
        "class_id": _text(256),
        "user_id": _text(256),
        "role": _text(40),
        "status": _text(12),
        "primary": _flag(),
        "date_last_modified": _when(),
        "row_hash": _text(16),
    },
}


def _rebuild(table: str, *, keyed: bool) -> None:
    """Recreate ``table`` with or without its primary key, keeping its rows (the last row
    staged of a repeated key, when the key comes back)."""
    old = f"{table}_before_0009"
    columns = COLUMNS[table]
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    op.create_table(
        table,
        *(sa.Column(name, kind, nullable=nullable) for name, (kind, nullable) in columns.items()),
        sa.Column("run_id", sa.Integer(), nullable=False),
        *([sa.PrimaryKeyConstraint("sourced_id", "run_id")] if keyed else []),
    )
    names = ", ".join(f'"{c}"' for c in (*columns, "run_id"))
    latest = (
        f" WHERE rowid IN (SELECT max(rowid) FROM {old} GROUP BY run_id, sourced_id)"
        if keyed
        else ""
    )
    op.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {old}{latest}")
    op.execute(f"DROP TABLE {old}")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in COLUMNS:
        _rebuild(table, keyed=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in COLUMNS:
        op.execute(f"DROP INDEX IF EXISTS ux_{table}_key")
        _rebuild(table, keyed=True)
