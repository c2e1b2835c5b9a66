"""Alembic environment: run against the connection rostersync hands over (or the URL)."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine

from rostersync.store.tables import metadata

config = context.config


#: One transaction for a whole upgrade on SQLite too. Alembic takes SQLite DDL for
#: non-transactional and commits each migration, so a first set-up killed part-way left a
#: schema between two revisions, which the next command refused. SQLite runs DDL in a
#: transaction like any statement: rostersync, not the sqlite3 module, begins them.
OPTIONS: dict[str, Any] = {
    "target_metadata": metadata,
    "render_as_batch": True,
    "transactional_ddl": True,
}


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        context.configure(connection=conn, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()


run()
