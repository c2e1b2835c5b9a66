"""Turn record batches into staging rows and write them in bulk.

Staging is the hot path of a large sync (a million enrollments), so rows are plain tuples in
column order, written with the driver's ``executemany`` through one prepared statement per
table: no ORM objects, and no per-row parameter processing by SQLAlchemy (that alone cost more
than the inserts). A sourcedId seen twice in one run keeps its last version (sources repeat
people across pages and courses); each row is its own execution, so PostgreSQL's "cannot
affect a row twice" rule does not apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete

from rostersync.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
)
from rostersync.store.db import sqlite_timestamp
from rostersync.store.tables import StagingClass, StagingEnrollment, StagingOrg, StagingPerson

STAGING: dict[str, Table] = {
    "org": StagingOrg.__table__,  # type: ignore[attr-defined]
    "person": StagingPerson.__table__,  # type: ignore[attr-defined]
    "class": StagingClass.__table__,  # type: ignore[attr-defined]
    "enrollment": StagingEnrollment.__table__,  # type: ignore[attr-defined]
}

#: Column order of the row tuples (``run_id`` is prepended when staging).
COLUMNS: dict[str, tuple[str, ...]] = {
    "org": ("sourced_id", "name", "type", "identifier", "parent_id", "status", "date_last_modified", "row_hash"),
    "person": (
        "sourced_id", "role", "given_name", "family_name", "email", "username", "enabled",
        "org_ids", "status", "date_last_modified", "row_hash",
    ),
    "class": ("sourced_id", "title", "class_code", "school_id", "status", "date_last_modified", "row_hash"),
    "enrollment": (
        "sourced_id", "class_id", "user_id", "role", "status", "primary", "date_last_modified", "row_hash",
    ),
}  # fmt: skip

Row = tuple[Any, ...]


def org_tuple(r: RosterOrg) -> Row:
    return (
        r.sourced_id,
        r.name,
        r.type,
        r.identifier,
        r.parent_id,
        r.status,
        r.date_last_modified,
        r.content_hash(),
    )


def person_tuple(r: RosterPerson) -> Row:
    email = r.email.strip() if r.email else None
    return (
        r.sourced_id, r.role, r.given_name, r.family_name, email, r.username, r.enabled,
        ",".join(r.org_ids), r.status, r.date_last_modified, r.content_hash(),
    )  # fmt: skip


def class_tuple(r: RosterClass) -> Row:
    return (
        r.sourced_id,
        r.title,
        r.class_code,
        r.school_id,
        r.status,
        r.date_last_modified,
        r.content_hash(),
    )


def enrollment_tuple(r: RosterEnrollment) -> Row:
    return (
        r.sourced_id, r.class_id, r.user_id, r.role, r.status, r.primary, r.date_last_modified,
        r.content_hash(),
    )  # fmt: skip


def org_row(r: RosterOrg) -> dict[str, Any]:
    return dict(zip(COLUMNS["org"], org_tuple(r), strict=True))


def person_row(r: RosterPerson) -> dict[str, Any]:
    return dict(zip(COLUMNS["person"], person_tuple(r), strict=True))


def class_row(r: RosterClass) -> dict[str, Any]:
    return dict(zip(COLUMNS["class"], class_tuple(r), strict=True))


def enrollment_row(r: RosterEnrollment) -> dict[str, Any]:
    return dict(zip(COLUMNS["enrollment"], enrollment_tuple(r), strict=True))


@dataclass
class StagedBatch:
    """One batch sorted by table, with the rejections and the newest dateLastModified."""

    rows: dict[str, list[Row]] = field(
        default_factory=lambda: {"org": [], "person": [], "class": [], "enrollment": []}
    )
    rejected: list[Rejected] = field(default_factory=list)
    newest: datetime | None = None


def sort_batch(records: Iterable[RosterRecord]) -> StagedBatch:
    out = StagedBatch()
    rows = out.rows
    newest: datetime | None = None
    for r in records:
        if isinstance(r, RosterEnrollment):  # the most frequent record first
            rows["enrollment"].append(enrollment_tuple(r))
        elif isinstance(r, RosterPerson):
            rows["person"].append(person_tuple(r))
        elif isinstance(r, RosterClass):
            rows["class"].append(class_tuple(r))
        elif isinstance(r, RosterOrg):
            rows["org"].append(org_tuple(r))
        else:
            out.rejected.append(r)
            continue
        dlm = r.date_last_modified
        if dlm is not None and (newest is None or dlm > newest):
            newest = dlm
    out.newest = newest
    return out


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
    sqlite = conn.dialect.name == "sqlite"
    marker = "?" if sqlite else "%s"
    for kind, rows in batch.rows.items():
        if not rows:
            continue
        cols = ("run_id", *COLUMNS[kind])
        dlm = len(cols) - 2  # date_last_modified sits just before row_hash
        if sqlite:
            params = [
                (run_id, *r[:-2], sqlite_timestamp(r[-2]) if r[-2] is not None else None, r[-1])
                for r in rows
            ]
        else:
            params = [(run_id, *r) for r in rows]
        assert cols[dlm] == "date_last_modified"
        sql = _upsert_sql(STAGING[kind].name, cols, ("run_id", "sourced_id"), marker)
        conn.exec_driver_sql(sql, params)


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
