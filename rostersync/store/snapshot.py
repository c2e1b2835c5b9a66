"""Schema snapshots: a new database set up by the statements the migrations run, replayed.

Setting up an empty database through Alembic imports it and runs every migration in turn,
SQLite's as table rebuilds after reading the table back: most of a first sync's start-up,
where replaying what they ran takes a fraction of it (figures in the benchmarks' README). A
snapshot is the list of statements that changed the database while the migrations set up an
empty one, recorded per dialect by ``python -m rostersync.store.snapshot`` and kept beside
the migrations; the reads Alembic made on the way are left out (they changed nothing and
decided nothing an empty database would not decide again). It is used only for a database
without tables and only when its revision is the migrations' head: a database an earlier
version set up, or a new migration without its snapshot recorded, goes through Alembic as
before. A test records the snapshots again and fails if they differ from the files
(tests/store/test_snapshot.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, inspect
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from rostersync.store.db import Store

#: Where the snapshots are kept, one file per dialect.
SNAPSHOTS = Path(__file__).resolve().parent / "migrations" / "snapshots"
#: Statements that only read (Alembic's look at the tables it rebuilds, the version check)
#: or that frame a transaction the replay opens itself.
_NOT_KEPT = re.compile(r"^\s*(?:SELECT\b|BEGIN\b|COMMIT\b|ROLLBACK\b|PRAGMA\s+[\w.]+\s*\()", re.I)


@dataclass(frozen=True)
class Snapshot:
    """The statements that set up an empty database at ``revision``, in order."""

    dialect: str
    revision: str
    statements: tuple[str, ...]

    def as_json(self) -> str:
        return (
            json.dumps(
                {
                    "dialect": self.dialect,
                    "revision": self.revision,
                    "statements": list(self.statements),
                },
                indent=1,
            )
            + "\n"
        )


def path_of(dialect: str) -> Path:
    return SNAPSHOTS / f"{dialect}.json"


def load(dialect: str) -> Snapshot | None:
    """The snapshot kept for ``dialect``; None when there is none or it cannot be read (the
    migrations then set the database up)."""
    try:
        data = json.loads(path_of(dialect).read_text("utf-8"))
        statements = data["statements"]
        if data["dialect"] != dialect or not all(isinstance(s, str) for s in statements):
            return None
        return Snapshot(dialect, str(data["revision"]), tuple(statements))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def replay(conn: Connection, snapshot: Snapshot) -> None:
    """Run the snapshot's statements on ``conn``, inside the caller's transaction."""
    for statement in snapshot.statements:
        conn.exec_driver_sql(statement)


#: :func:`set_up` replayed the snapshot: this process set the database up.
REPLAYED = "replayed"
#: :func:`set_up` found the database set up at the head by another process meanwhile.
FOUND = "found"


def set_up(store: Store) -> str | None:
    """Set ``store``'s empty database up by replaying the snapshot of the head's schema, in
    one transaction: :data:`REPLAYED`, or :data:`FOUND` when another process set it up
    first. None, having done nothing, when there is no such snapshot or the database holds
    other tables (the migrations then decide)."""
    from rostersync.store.db import schema_head

    kept = load(store.dialect)
    if kept is None or kept.revision != schema_head():
        return None
    try:
        # A write transaction (SQLite: the write lock first), so that two processes setting
        # one database up take turns and the second finds the tables.
        with store.write() as conn:
            found = bool(inspect(conn).get_table_names())
            if not found:
                replay(conn, kept)
    except DBAPIError:
        # Another process set it up meanwhile: its tables stand, the replay rolled back.
        if store.current_revision() == kept.revision:
            return FOUND
        raise
    if not found:
        return REPLAYED
    return FOUND if store.current_revision() == kept.revision else None


def record(url: str) -> Snapshot:
    """Set up the empty database at ``url`` through the migrations and return what they ran.
    The database must have no tables."""
    from rostersync.store.db import Store

    store = Store(url)
    statements: list[str] = []

    def keep(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool
    ) -> None:
        if _NOT_KEPT.match(statement):
            return
        if parameters:
            # A snapshot holds plain statements; a migration binding values would need more.
            raise ValueError(f"a migration statement binds values: {statement[:80]!r}")
        statements.append(statement)

    try:
        if store.has_tables():
            raise ValueError(f"{store.location} is not an empty database")
        event.listen(store.engine, "before_cursor_execute", keep)
        store.migrate()
        revision = store.current_revision()
    finally:
        store.dispose()
    if revision is None:
        raise ValueError("the migrations left no revision")
    return Snapshot(store.dialect, revision, tuple(statements))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rostersync.store.snapshot",
        description="Record the schema snapshots kept beside the migrations (after adding or "
        "changing a migration).",
    )
    parser.add_argument(
        "--postgresql",
        metavar="URL",
        help="an empty PostgreSQL database to record on (its schema is left set up); "
        "without it only SQLite's snapshot is recorded",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        snapshots = [record(f"sqlite:///{Path(tmp) / 'snapshot.db'}")]
    if args.postgresql:
        snapshots.append(record(args.postgresql))
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    for snapshot in snapshots:
        path_of(snapshot.dialect).write_text(snapshot.as_json(), encoding="utf-8")
        print(
            f"{path_of(snapshot.dialect)}: {len(snapshot.statements)} statements at "
            f"revision {snapshot.revision}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
