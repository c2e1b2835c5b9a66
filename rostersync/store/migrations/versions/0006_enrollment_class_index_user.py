"""ix_roster_enr_class also holds user_id: a (class, person) pair is one index probe

A sync that re-reads single members (a renamed student, an enrollment that ended) looks up
each (class, person) pair; with the index on (source, class_id, role) it read the person's
enrollments one table row at a time to find the class. Every query that used the old index
uses its leading columns still.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_roster_enr_class", table_name="roster_enrollment")
    op.create_index(
        "ix_roster_enr_class", "roster_enrollment", ["source", "class_id", "role", "user_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_roster_enr_class", table_name="roster_enrollment")
    op.create_index("ix_roster_enr_class", "roster_enrollment", ["source", "class_id", "role"])
