"""Every role of a person, not only the primary one

OneRoster 1.2 gives a person several roles (``roles[]``, primary and secondary), and a person
counts as a teacher when any of them is one of ``provisioning.teacher_roles``. ``roles`` holds
them all, lower-cased and comma-joined (``administrator,teacher``); ``role`` stays the primary
role. Existing rows get their one role.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLES = ("roster_person", "staging_person")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table, sa.Column("roles", sa.String(length=512), nullable=False, server_default="")
        )
        op.execute(f"UPDATE {table} SET roles = lower(role)")


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("roles")
