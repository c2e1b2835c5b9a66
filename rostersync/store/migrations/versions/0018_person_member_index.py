"""roster_person: ix_roster_person_member, on SQLite

A member read (a new group's fill, a marked member's re-read, "has this class a student")
takes a person's key, status and member values. SQLite found the person through the key's
index and then read the row, a random visit to a table several times wider than those
columns, once per member: at district L two thirds of a first load's member fill. This
index holds just them, and the reads name it (``INDEXED BY``; SQLite keeps no statistics
here, and without them its planner takes the key's index). PostgreSQL gets none.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

NAME = "ix_roster_person_member"
COLUMNS = ["source", "sourced_id", "status", "member_email", "member_name"]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.create_index(NAME, "roster_person", COLUMNS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index(NAME, table_name="roster_person")
