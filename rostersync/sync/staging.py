"""Turn record batches into staging rows and write them in bulk.

Rows go straight to ``staging_*`` with one multi-row INSERT per table per batch, so memory
stays flat. A sourcedId seen twice in one run keeps its last version (sources repeat
people across pages and courses).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete
from sqlalchemy.dialects import postgresql, sqlite

from rostersync.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
)
from rostersync.store.tables import StagingClass, StagingEnrollment, StagingOrg, StagingPerson

STAGING: dict[str, Table] = {
    "org": StagingOrg.__table__,  # type: ignore[attr-defined]
    "person": StagingPerson.__table__,  # type: ignore[attr-defined]
    "class": StagingClass.__table__,  # type: ignore[attr-defined]
    "enrollment": StagingEnrollment.__table__,  # type: ignore[attr-defined]
}

# Enough rows per statement to amortize round trips, few enough to stay far below
# SQLite's bound-parameter limit (32,766) with the widest table (12 columns).
CHUNK = 2000


def org_row(r: RosterOrg) -> dict[str, Any]:
    return {
        "sourced_id": r.sourced_id,
        "name": r.name,
        "type": r.type,
        "identifier": r.identifier,
        "parent_id": r.parent_id,
        "status": r.status,
        "date_last_modified": r.date_last_modified,
        "row_hash": r.content_hash(),
    }


def person_row(r: RosterPerson) -> dict[str, Any]:
    return {
        "sourced_id": r.sourced_id,
        "role": r.role,
        "given_name": r.given_name,
        "family_name": r.family_name,
        "email": r.email.strip() if r.email else None,
        "username": r.username,
        "enabled": r.enabled,
        "org_ids": ",".join(r.org_ids),
        "status": r.status,
        "date_last_modified": r.date_last_modified,
        "row_hash": r.content_hash(),
    }


def class_row(r: RosterClass) -> dict[str, Any]:
    return {
        "sourced_id": r.sourced_id,
        "title": r.title,
        "class_code": r.class_code,
        "school_id": r.school_id,
        "status": r.status,
        "date_last_modified": r.date_last_modified,
        "row_hash": r.content_hash(),
    }


def enrollment_row(r: RosterEnrollment) -> dict[str, Any]:
    return {
        "sourced_id": r.sourced_id,
        "class_id": r.class_id,
        "user_id": r.user_id,
        "role": r.role,
        "status": r.status,
        "primary": r.primary,
        "date_last_modified": r.date_last_modified,
        "row_hash": r.content_hash(),
    }


@dataclass
class StagedBatch:
    """One batch sorted by table, with the rejections and the newest dateLastModified."""

    rows: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"org": [], "person": [], "class": [], "enrollment": []}
    )
    rejected: list[Rejected] = field(default_factory=list)
    newest: datetime | None = None

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.rows.values())


def sort_batch(records: Iterable[RosterRecord]) -> StagedBatch:
    out = StagedBatch()
    newest: datetime | None = None
    for r in records:
        if isinstance(r, Rejected):
            out.rejected.append(r)
            continue
        if isinstance(r, RosterPerson):
            out.rows["person"].append(person_row(r))
        elif isinstance(r, RosterEnrollment):
            out.rows["enrollment"].append(enrollment_row(r))
        elif isinstance(r, RosterClass):
            out.rows["class"].append(class_row(r))
        elif isinstance(r, RosterOrg):
            out.rows["org"].append(org_row(r))
        dlm = r.date_last_modified
        if dlm is not None and (newest is None or dlm > newest):
            newest = dlm
    out.newest = newest
    return out


def upsert_rows(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: list[str]
) -> None:
    """Bulk INSERT ... ON CONFLICT DO UPDATE (last one wins).

    One statement, executed with many parameter sets: the driver batches them, and
    SQLAlchemy compiles the statement once (a multi-row VALUES clause would be compiled
    afresh for every chunk, which costs more than the insert itself).
    """
    if not rows:
        return
    dialect = conn.dialect.name
    ins_mod: Any = postgresql if dialect == "postgresql" else sqlite
    unique = _dedupe(rows, keys)
    stmt = ins_mod.insert(table)
    update = {c: stmt.excluded[c] for c in unique[0] if c not in keys}
    stmt = stmt.on_conflict_do_update(index_elements=keys, set_=update)
    conn.execute(stmt, unique)


def _dedupe(rows: Sequence[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    # One statement may not touch the same row twice (PostgreSQL refuses it): keep the last.
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        seen[tuple(row[k] for k in keys)] = row
    return list(seen.values())


def stage(conn: Connection, run_id: int, batch: StagedBatch) -> None:
    for kind, rows in batch.rows.items():
        if rows:
            for row in rows:
                row["run_id"] = run_id
            upsert_rows(conn, STAGING[kind], rows, ["run_id", "sourced_id"])


def clear_staging(conn: Connection, run_id: int) -> None:
    for table in STAGING.values():
        conn.execute(delete(table).where(table.c.run_id == run_id))
