"""Persistence: tables (SQLAlchemy Core), the database handle and schema migrations."""

from rostersync.store.db import Store, as_utc, utcnow

__all__ = ["Store", "as_utc", "utcnow"]
