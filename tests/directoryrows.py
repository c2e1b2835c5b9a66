"""Directory rows written straight into a store, for tests of the tables around them."""

from __future__ import annotations

from sqlalchemy import text

from rostersync.store.db import Store


def add_user(store: Store, email: str) -> int:
    """An active console user with this email; returns its id."""
    with store.write() as conn:
        return int(
            conn.execute(
                text(
                    'INSERT INTO "user" (email, display_name, status, archived_by_sync, delegated) '
                    "VALUES (:e, 'X', 'active', false, false) RETURNING id"
                ),
                {"e": email},
            ).scalar_one()
        )
