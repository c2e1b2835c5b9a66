"""Turn record batches into staging rows and write them in bulk.

Staging is the hot path of a large sync (a million enrollments), so rows are plain tuples in
column order, written with the driver's ``executemany`` through one prepared statement per
table (PostgreSQL: ``COPY``): no ORM objects, and no per-row parameter processing by
SQLAlchemy (that alone cost more than the inserts). A sourcedId seen twice in one run keeps
its last version (sources repeat people across pages and courses); the repeats found where
they are settled go to the run (rostersync.sync.repeats).

On SQLite the staging tables have no key while a run fetches (migration 0009): rows are
appended, and ``prepare_staging``, first thing in the apply, settles repeated ids (the last
row staged wins) and builds the ``(run_id, sourced_id)`` index the apply's joins need, in one
sort. Real feeds' sourcedIds are GUIDs, in no order: inserting them one by one into a keyed
table puts each row on a random page of a large B-tree, where appending is sequential.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

from sqlalchemy import Connection, Table, delete, or_, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from rostersync.source.rows import (
    COLUMNS,
    Row,
    StagedBatch,
    class_row,
    enrollment_row,
    person_row,
    sort_batch,
)
from rostersync.store.db import copy_rows, dialect_insert, index_build
from rostersync.store.tables import staging_class, staging_enrollment, staging_org, staging_person
from rostersync.sync.repeats import NAMES, Repeats, in_rows

#: PostgreSQL's SQLSTATE for a duplicate key.
UNIQUE_VIOLATION = "23505"
#: PostgreSQL's SQLSTATE for a lock that NOWAIT could not take.
LOCK_NOT_AVAILABLE = "55P03"

STAGING: dict[str, Table] = {
    "org": staging_org,
    "person": staging_person,
    "class": staging_class,
    "enrollment": staging_enrollment,
}

__all__ = [
    "COLUMNS",
    "STAGING",
    "Row",
    "StagedBatch",
    "class_row",
    "clear_staging",
    "enrollment_row",
    "person_row",
    "prepare_staging",
    "run_scan",
    "sort_batch",
    "stage",
    "staging_lost",
    "upsert_rows",
]


def staging_key_index(table: str) -> str:
    """SQLite: the name of ``table``'s ``(run_id, sourced_id)`` index (see prepare_staging)."""
    return f"ux_{table}_key"


def run_scan(conn: Connection, table: str, alias: str = "s") -> str:
    """``table alias`` for a FROM clause that reads all of a run's staged rows.

    SQLite: NOT INDEXED, so that it scans the table in the order the rows arrived rather than
    walking the key index in sourcedId order with a row lookup each. Sources send
    enrollments class by class, and the mirror, filled in that order, keeps a class's
    enrollments together; filled in GUID order, it would scatter them.
    """
    hint = " NOT INDEXED" if conn.dialect.name == "sqlite" else ""
    return f"{table} {alias}{hint}"


#: Bound values per SQLite INSERT: below the 32,766 that SQLite's builds allow by default.
SQLITE_MAX_VALUES = 30_000


def _staging_insert(table: str, run_id: int, cols: Sequence[str], rows: int) -> str:
    """SQLite: INSERT ``rows`` rows of ``cols`` (``?`` markers) for ``run_id``, one VALUES
    list for them all.

    Many rows to a statement: the driver lets go of the interpreter lock for each step of a
    statement, one per row with ``executemany``, and while the event loop was busy each
    step waited up to the switch interval (5 ms) to take it back: the staging of 10,006
    classes took 1.55 s of a first load, of 3,225 changed rows 2.3 s of a steady-state run.
    The run id is written into the statement rather than bound: the rows go to the driver
    as they came, and this process does no per-row work but flattening them.
    OR REPLACE: should the table have its key index (prepare_staging built it in a
    transaction that did not clear staging), a repeated id replaces the earlier row, as
    ``prepare_staging`` would; without the index the row is appended, and there the later
    row (the higher rowid) wins; a VALUES list inserts its rows in order.
    """
    quoted = ", ".join(f'"{c}"' for c in cols)
    one = f"({int(run_id)}, {', '.join('?' * len(cols))})"
    return f'INSERT OR REPLACE INTO {table} ("run_id", {quoted}) VALUES {", ".join([one] * rows)}'


def _sqlite_insert(
    conn: Connection, table: str, run_id: int, cols: Sequence[str], rows: Sequence[Row]
) -> None:
    """Insert ``rows`` in statements of a power of two rows each, the largest that
    ``SQLITE_MAX_VALUES`` allows first: a dozen statement texts a table, each prepared once
    and kept in the driver's statement cache (one per batch size would fill the cache with
    large statements)."""
    most = 1 << ((SQLITE_MAX_VALUES // len(cols)).bit_length() - 1)
    start = 0
    while start < len(rows):
        size = most
        while size > len(rows) - start:
            size >>= 1
        part = rows[start : start + size]
        conn.exec_driver_sql(
            _staging_insert(table, run_id, cols, size), tuple(chain.from_iterable(part))
        )
        start += size


def stage(conn: Connection, run_id: int, batch: StagedBatch) -> Repeats:
    """Write ``batch`` to staging; returns the sourcedIds it found repeated (PostgreSQL,
    which settles repeats as it writes; SQLite settles them in :func:`prepare_staging`)."""
    repeats = Repeats()
    if conn.dialect.name == "postgresql":
        # Row dates are UTC text without an offset (rows.utc_text); read them as UTC.
        conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
        for kind, rows in batch.rows.items():
            if rows:
                repeats.update(_copy_rows(conn, run_id, kind, rows))
        return repeats
    for kind, rows in batch.rows.items():
        if rows:
            _sqlite_insert(conn, STAGING[kind].name, run_id, COLUMNS[kind], rows)
    return repeats


def prepare_staging(conn: Connection, run_id: int | None = None) -> Repeats:
    """SQLite, first thing in an apply: one row per ``(run_id, sourced_id)`` in staging, and
    the unique index on that key that the apply's joins and sweeps go through. Returns the
    ids of ``run_id`` found repeated (rostersync.sync.repeats).

    Building the index sorts the keys once, where keeping it during the fetch costs a
    random B-tree insert per row. It fails only if a source repeated
    an id within a run; then the earlier rows are deleted (the last one staged, the highest
    rowid, wins, as upserting did) and it is built again. Inside the apply's transaction: a
    held or failed apply leaves staging as the fetch wrote it, and the next apply prepares it
    again. PostgreSQL's staging keeps its primary key (COPY resolves conflicts against it).
    """
    repeats = Repeats()
    if conn.dialect.name != "sqlite":
        return repeats
    for kind, table in STAGING.items():
        create = (
            f"CREATE UNIQUE INDEX IF NOT EXISTS {staging_key_index(table.name)} "
            f"ON {table.name} (run_id, sourced_id)"
        )
        try:
            with conn.begin_nested(), index_build(conn, table.name):
                conn.exec_driver_sql(create)
            continue
        except IntegrityError:
            pass
        if run_id is not None:
            found = conn.execute(
                text(
                    f"SELECT sourced_id, count(DISTINCT row_hash), count(*) FROM {table.name} "
                    "WHERE run_id = :run GROUP BY sourced_id HAVING count(*) > 1"
                ),
                {"run": run_id},
            ).all()
            repeats.add(
                kind,
                [sid for sid, _, _ in found],
                [sid for sid, n, _ in found if n > 1],
                copies=sum(sent - 1 for _, _, sent in found),
            )
        conn.exec_driver_sql(
            f"DELETE FROM {table.name} WHERE rowid NOT IN "
            f"(SELECT max(rowid) FROM {table.name} GROUP BY run_id, sourced_id)"
        )
        with index_build(conn, table.name):
            conn.exec_driver_sql(create)
    return repeats


def _copy_rows(conn: Connection, run_id: int, kind: str, rows: Sequence[Row]) -> Repeats:
    """PostgreSQL: COPY straight into staging; through a temporary table and an upsert when a
    sourcedId of this batch was staged by an earlier one.

    psycopg's executemany sends one statement per row; COPY streams them. COPY cannot
    resolve conflicts, so a sourcedId repeated within
    the batch is settled here first (its last version wins). One already staged by an earlier
    batch (rare: a source repeating a record across pages) makes the COPY fail on the key;
    it is then undone (a savepoint) and the batch goes through the temporary table and one
    upsert, where the later version wins. Going straight in is the common, fast case.
    Returns the ids repeated.
    """
    latest = list({r[0]: r for r in rows}.values())  # sourced_id first; later rows win
    repeats = in_rows(kind, rows) if len(latest) < len(rows) else Repeats()
    table = STAGING[kind].name
    cols = ", ".join(f'"{c}"' for c in ("run_id", *COLUMNS[kind]))
    staged = [(run_id, *row) for row in latest]
    try:
        with conn.begin_nested():
            copy_rows(conn, f"COPY {table} ({cols}) FROM STDIN", staged)
        return repeats
    except Exception as exc:  # psycopg's own error: the COPY ran on the driver's connection
        if _sqlstate(exc) != UNIQUE_VIOLATION:
            raise
    temp = f"copy_{table}"
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {temp} "
        f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    copy_rows(conn, f"COPY {temp} ({cols}) FROM STDIN", staged)
    again = conn.exec_driver_sql(
        f"SELECT t.sourced_id, s.row_hash IS DISTINCT FROM t.row_hash FROM {temp} t "
        f"JOIN {table} s ON s.run_id = t.run_id AND s.sourced_id = t.sourced_id"
    ).all()
    repeats.add(kind, [sid for sid, _ in again], [sid for sid, differs in again if differs])
    updates = ", ".join(f'"{c}" = excluded."{c}"' for c in COLUMNS[kind] if c != "sourced_id")
    conn.exec_driver_sql(
        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {temp} "
        f"ON CONFLICT (run_id, sourced_id) DO UPDATE SET {updates}"
    )
    conn.exec_driver_sql(f"TRUNCATE {temp}")
    return repeats


def _sqlstate(exc: BaseException) -> str | None:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    state = getattr(orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def upsert_rows(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: list[str]
) -> None:
    """INSERT ... ON CONFLICT DO UPDATE (last one wins) for small row sets (live resync)."""
    if not rows:
        return
    stmt = dialect_insert(conn.dialect.name)(table)
    update = {c: stmt.excluded[c] for c in rows[0] if c not in keys}
    stmt = stmt.on_conflict_do_update(index_elements=keys, set_=update)
    conn.execute(stmt, list(rows))


def staging_lost(conn: Connection, run_id: int, fetched: Mapping[str, int]) -> list[str]:
    """The collections a run fetched records of (``fetched``, as its report counts them) of
    which staging now holds none: its staged data was cleared, or, on PostgreSQL, emptied
    with the unlogged staging tables by a server crash. Empty when all are there."""
    lost = []
    for kind, table in STAGING.items():
        key = NAMES[kind]
        # Records the scope step left out (schools, see sync/scope.py) were never to be
        # staged; a record sent more than once is staged once (``_repeated``: the copies).
        left_out = int(fetched.get(f"{key}_ignored", 0)) + int(fetched.get(f"{key}_repeated", 0))
        if int(fetched.get(key, 0)) - left_out > 0:
            row = conn.execute(select(table.c.run_id).where(table.c.run_id == run_id).limit(1))
            if row.first() is None:
                lost.append(key)
    return lost


def clear_staging(conn: Connection, run_id: int) -> None:
    """Delete this run's staged rows (on PostgreSQL TRUNCATE the tables when nothing else is
    staged: see _truncate_alone). On SQLite also drop the key index prepare_staging built:
    an apply clears its staging in its own transaction, so outside an apply the tables have
    no key and a fetch only appends (rows of a held run left behind would otherwise keep the
    index, and every later fetch would pay for it)."""
    sqlite = conn.dialect.name == "sqlite"
    if not sqlite and _truncate_alone(conn, run_id):
        return
    for table in STAGING.values():
        # Another run's rows, asked as two ranges: through the key index two probes, where
        # ``!=`` read all of its entries (a million at district L).
        others = or_(table.c.run_id < run_id, table.c.run_id > run_id)
        if sqlite and conn.execute(select(table.c.run_id).where(others).limit(1)).first() is None:
            # Only this run's rows are here (the write lock keeps it so): a DELETE without
            # WHERE lets SQLite drop the table's pages at once instead of a row at a time,
            # a second for a district's million enrollments.
            conn.execute(delete(table))
        else:
            conn.execute(delete(table).where(table.c.run_id == run_id))
    drop_staging_keys(conn)


def drop_staging_keys(conn: Connection) -> None:
    """SQLite: drop the key indexes :func:`prepare_staging` built. A fetch into a keyed table
    replaces a repeated id's row without anyone counting it (``INSERT OR REPLACE``), so no
    key may outlive the transaction that needed it."""
    if conn.dialect.name == "sqlite":
        for table in STAGING.values():
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {staging_key_index(table.name)}")


def _truncate_alone(conn: Connection, run_id: int) -> bool:
    """PostgreSQL: when this run's rows are all the staging tables hold, TRUNCATE them and
    say so. A DELETE leaves every row behind as a dead tuple until autovacuum comes by, and
    the next run's scans of staging would read all of them again.

    TRUNCATE takes the tables' ACCESS EXCLUSIVE lock until the transaction ends. Asked with
    NOWAIT, it is given up at once (and the rows deleted as before) when anyone else is using
    staging, say another source's fetch writing its batches; held, it keeps everyone else out
    while the tables are checked, so no other run's rows can arrive in between."""
    names = ", ".join(table.name for table in STAGING.values())
    try:
        with conn.begin_nested() as savepoint:
            conn.exec_driver_sql(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE NOWAIT")
            for table in STAGING.values():
                # The key leads with sourced_id, so this reads the table (as min/max of
                # run_id did), stopping at the first row of another run.
                other = conn.execute(
                    select(table.c.run_id).where(table.c.run_id != run_id).limit(1)
                ).first()
                if other is not None:
                    savepoint.rollback()  # releases the locks: another run's rows stay
                    return False
            conn.exec_driver_sql(f"TRUNCATE {names}")
    except DBAPIError as exc:
        if _sqlstate(exc) != LOCK_NOT_AVAILABLE:
            raise
        return False
    return True
