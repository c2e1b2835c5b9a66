"""Turn record batches into staging rows and write them in bulk.

Staging is the hot path of a large sync (a million enrollments), so rows are plain tuples in
column order, written with the driver's ``executemany`` through one prepared statement per
table: no ORM objects, and no per-row parameter processing by SQLAlchemy (that alone cost more
than the inserts). A sourcedId seen twice in one run keeps its last version (sources repeat
people across pages and courses); each row is its own execution, so PostgreSQL's "cannot
affect a row twice" rule does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, delete

from rostersync.rows import (
    COLUMNS,
    Row,
    StagedBatch,
    class_row,
    enrollment_row,
    person_row,
    sort_batch,
)
from rostersync.store.db import sqlite_timestamp
from rostersync.store.tables import StagingClass, StagingEnrollment, StagingOrg, StagingPerson

STAGING: dict[str, Table] = {
    "org": StagingOrg.__table__,  # type: ignore[attr-defined]
    "person": StagingPerson.__table__,  # type: ignore[attr-defined]
    "class": StagingClass.__table__,  # type: ignore[attr-defined]
    "enrollment": StagingEnrollment.__table__,  # type: ignore[attr-defined]
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
    "sort_batch",
    "stage",
    "upsert_rows",
]


def _upsert_sql(table: str, cols: Sequence[str], keys: Sequence[str], marker: str) -> str:
    quoted = [f'"{c}"' for c in cols]
    updates = ", ".join(
        f"{q} = excluded.{q}" for c, q in zip(cols, quoted, strict=True) if c not in keys
    )
    return (
        f"INSERT INTO {table} ({', '.join(quoted)}) VALUES ({', '.join([marker] * len(cols))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )


def stage(conn: Connection, run_id: int, batch: StagedBatch) -> None:
    if conn.dialect.name == "postgresql":
        for kind, rows in batch.rows.items():
            if rows:
                _copy_rows(conn, run_id, kind, rows)
        return
    for kind, rows in batch.rows.items():
        if not rows:
            continue
        cols = ("run_id", *COLUMNS[kind])
        assert cols[-2] == "date_last_modified"  # it sits just before row_hash
        params = [
            (run_id, *r[:-2], sqlite_timestamp(r[-2]) if r[-2] is not None else None, r[-1])
            for r in rows
        ]
        sql = _upsert_sql(STAGING[kind].name, cols, ("run_id", "sourced_id"), "?")
        conn.exec_driver_sql(sql, params)


def _copy_rows(conn: Connection, run_id: int, kind: str, rows: Sequence[Row]) -> None:
    """PostgreSQL: COPY into a temporary table, then one upsert into staging.

    psycopg's executemany sent a million rows as a million statements (30 microseconds
    each); COPY streams them. COPY cannot resolve conflicts, so a repeated sourcedId is
    settled here first (its last version wins) and the upsert settles those of earlier
    batches.
    """
    table = STAGING[kind].name
    temp = f"copy_{table}"
    cols = ", ".join(f'"{c}"' for c in ("run_id", *COLUMNS[kind]))
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {temp} "
        f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    latest = {r[0]: r for r in rows}  # sourced_id first; later rows replace earlier ones
    raw: Any = conn.connection.dbapi_connection
    with raw.cursor() as cursor, cursor.copy(f"COPY {temp} ({cols}) FROM STDIN") as copy:
        for row in latest.values():
            copy.write_row((run_id, *row))
    updates = ", ".join(f'"{c}" = excluded."{c}"' for c in COLUMNS[kind] if c != "sourced_id")
    conn.exec_driver_sql(
        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {temp} "
        f"ON CONFLICT (run_id, sourced_id) DO UPDATE SET {updates}"
    )
    conn.exec_driver_sql(f"TRUNCATE {temp}")


def upsert_rows(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: list[str]
) -> None:
    """INSERT ... ON CONFLICT DO UPDATE (last one wins) for small row sets (live resync)."""
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    ins_mod: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = ins_mod.insert(table)
    update = {c: stmt.excluded[c] for c in rows[0] if c not in keys}
    stmt = stmt.on_conflict_do_update(index_elements=keys, set_=update)
    conn.execute(stmt, list(rows))


def clear_staging(conn: Connection, run_id: int) -> None:
    for table in STAGING.values():
        conn.execute(delete(table).where(table.c.run_id == run_id))
