"""Roster records as staging rows: plain tuples in the staging tables' column order.

This module imports nothing heavy (no SQLAlchemy), so a connector's decode worker process can
turn a page into rows without loading the store: the engine stages what arrives as-is.

A row's ``date_last_modified`` is already text, :func:`utc_text`: the form SQLite stores, which
PostgreSQL reads as UTC (its staging session says so). Formatting a million dates is seconds
of CPU; done here, a decode worker does it instead of the process that writes the rows.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rostersync.source.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
)

#: Column order of the row tuples (``run_id`` is prepended when staging). ``fp`` is the
#: fingerprint of the record's bytes where the connector gives one (rows built from record
#: values have none: None), see rostersync.sync.known.
COLUMNS: dict[str, tuple[str, ...]] = {
    "org": ("sourced_id", "name", "type", "identifier", "parent_id", "status", "date_last_modified", "row_hash", "fp"),
    "person": (
        "sourced_id", "role", "roles", "given_name", "family_name", "email", "username", "enabled",
        "org_ids", "status", "date_last_modified", "row_hash", "fp",
    ),
    "class": ("sourced_id", "title", "class_code", "school_id", "status", "date_last_modified", "row_hash", "fp"),
    "enrollment": (
        "sourced_id", "class_id", "user_id", "role", "status", "primary", "date_last_modified", "row_hash",
        "fp",
    ),
}  # fmt: skip

Row = tuple[Any, ...]

#: The most characters a column holds, for every column a source's text goes into (the store's
#: column sizes; a test checks they agree). A row with a longer value is rejected on its own:
#: PostgreSQL refuses the value, which failed the whole run's write.
MAX_CHARS: dict[str, dict[str, int]] = {
    "org": {"sourced_id": 256, "name": 512, "type": 40, "identifier": 256, "parent_id": 256},
    "person": {
        "sourced_id": 256, "role": 40, "roles": 512, "given_name": 256, "family_name": 256,
        "email": 256, "username": 256, "org_ids": 2048,
    },
    "class": {"sourced_id": 256, "title": 512, "class_code": 256, "school_id": 256},
    "enrollment": {"sourced_id": 256, "class_id": 256, "user_id": 256, "role": 40},
}  # fmt: skip
#: The entity a rejected row of each kind is reported as (as connectors name them).
ENTITIES = {"org": "org", "person": "user", "class": "class", "enrollment": "enrollment"}
_LIMITS = {
    kind: tuple((COLUMNS[kind].index(name), most) for name, most in limits.items())
    for kind, limits in MAX_CHARS.items()
}


def _too_long(row: Row, limits: tuple[tuple[int, int], ...]) -> int | None:
    for index, most in limits:
        value = row[index]
        if value is not None and len(value) > most:
            return index
    return None


def fits(kind: str, row: Row) -> bool:
    """Whether every value of a row of this kind fits its column."""
    return _too_long(row, _LIMITS[kind]) is None


def keep_fitting(kind: str, rows: list[Row], rejected: list[Rejected]) -> list[Row]:
    """``rows`` without those holding a value longer than its column takes (each reported in
    ``rejected``, naming the column)."""
    limits = _LIMITS[kind]
    if all(_too_long(row, limits) is None for row in rows):
        return rows
    kept = []
    for row in rows:
        index = _too_long(row, limits)
        if index is None:
            kept.append(row)
            continue
        name = COLUMNS[kind][index]
        sourced_id = str(row[0])[:256]
        reason = f"{name} is longer than {MAX_CHARS[kind][name]} characters"
        rejected.append(Rejected(ENTITIES[kind], sourced_id, reason))
    return kept


def rejected_id(value: object) -> str | None:
    """The id a rejection names: the sourcedId the record would have had (a number's digits,
    no blanks around), cut to the length a report holds; None for none."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.strip()[: MAX_CHARS["person"]["sourced_id"]] or None


def utc_text(value: datetime | None) -> str | None:
    """The exact text SQLAlchemy's DateTime type stores on SQLite (UTC, no offset)."""
    if value is None:
        return None
    zone = value.tzinfo
    if zone is UTC:  # what the connectors' parsers give for "Z": no conversion needed
        value = value.replace(tzinfo=None)
    elif zone is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(" ", "microseconds")


def org_tuple(r: RosterOrg) -> Row:
    return (
        r.sourced_id,
        r.name,
        r.type,
        r.identifier,
        r.parent_id,
        r.status,
        utc_text(r.date_last_modified),
        r.content_hash(),
        None,
    )


def person_tuple(r: RosterPerson) -> Row:
    email = r.email.strip() if r.email else None
    return (
        r.sourced_id, r.role, r.roles_text, r.given_name, r.family_name, email, r.username, r.enabled,
        ",".join(r.org_ids), r.status, utc_text(r.date_last_modified), r.content_hash(), None,
    )  # fmt: skip


def class_tuple(r: RosterClass) -> Row:
    return (
        r.sourced_id,
        r.title,
        r.class_code,
        r.school_id,
        r.status,
        utc_text(r.date_last_modified),
        r.content_hash(),
        None,
    )


def enrollment_tuple(r: RosterEnrollment) -> Row:
    return (
        r.sourced_id, r.class_id, r.user_id, r.role, r.status, r.primary,
        utc_text(r.date_last_modified), r.content_hash(), None,
    )  # fmt: skip


def _as_dict(
    kind: str, r: RosterOrg | RosterPerson | RosterClass | RosterEnrollment, row: Row
) -> dict[str, Any]:
    """Column values for SQLAlchemy statements, which take the date as a datetime."""
    values = dict(zip(COLUMNS[kind], row, strict=True))
    values["date_last_modified"] = r.date_last_modified
    return values


def org_row(r: RosterOrg) -> dict[str, Any]:
    return _as_dict("org", r, org_tuple(r))


def person_row(r: RosterPerson) -> dict[str, Any]:
    return _as_dict("person", r, person_tuple(r))


def class_row(r: RosterClass) -> dict[str, Any]:
    return _as_dict("class", r, class_tuple(r))


def enrollment_row(r: RosterEnrollment) -> dict[str, Any]:
    return _as_dict("enrollment", r, enrollment_tuple(r))


#: Fingerprints are 63-bit (a signed 64-bit column holds them; ``~fp`` marks one left out).
FP_LIMIT = 1 << 63
#: The mirror's fingerprints are read in this many slices of their range: a slice's joined
#: fingerprints and ids are a few MB at district XL, the whole range's a large transient.
FP_SLICES = 8


def fp_slices() -> list[tuple[int, int]]:
    """The inclusive bounds of each slice of the fingerprints' range, in order."""
    step = FP_LIMIT // FP_SLICES
    return [(low, min(low + step, FP_LIMIT) - 1) for low in range(0, FP_LIMIT, step)]


@dataclass(frozen=True, slots=True)
class KnownSpec:
    """Where a connector's decode workers read the fingerprints the mirror holds for a full
    run's source (rostersync.sync.known): a SQLite file, or a PostgreSQL connection string."""

    dialect: str  # sqlite | postgresql
    where: str = field(repr=False)  # may hold a password
    source: str
    run_id: int  # one run's reads, not another's


@dataclass
class StagedBatch:
    """One batch sorted by table, with the rejections and the newest dateLastModified."""

    rows: dict[str, list[Row]] = field(
        default_factory=lambda: {"org": [], "person": [], "class": [], "enrollment": []}
    )
    rejected: list[Rejected] = field(default_factory=list)
    newest: datetime | None = None
    #: the academic sessions of this batch's classes that name any, by class sourcedId (not
    #: staged: the terms rules read them while the run is fetched)
    terms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: per kind, for a page of fingerprinted records: each record's fingerprint in the page's
    #: order, ``~fp`` (negative) for one left out because the mirror holds it as it is (see
    #: rostersync.sync.known); its rows carry the fingerprints of the others
    order: dict[str, array[int]] = field(default_factory=dict)
    #: per kind, the records left out so (counted as fetched all the same)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(map(len, self.rows.values())) + len(self.rejected)

    def count(self, kind: str) -> int:
        """Records of ``kind`` fetched: the rows and those left out as known."""
        return len(self.rows[kind]) + self.skipped.get(kind, 0)

    def extend(self, other: StagedBatch) -> None:
        """Append another batch (a later one: its rows win over these on a repeated id). Its
        ``order`` is dropped: only a batch that left no record out may be joined unfiltered."""
        if any(other.skipped.values()):
            raise ValueError("records left out as known must pass the mirror filter first")
        for kind, rows in other.rows.items():
            self.rows[kind].extend(rows)
        self.rejected.extend(other.rejected)
        self.terms.update(other.terms)
        if other.newest is not None and (self.newest is None or other.newest > self.newest):
            self.newest = other.newest


def sort_batch(records: Iterable[RosterRecord]) -> StagedBatch:
    out = StagedBatch()
    rows = out.rows
    newest: datetime | None = None
    for r in records:
        if isinstance(r, RosterEnrollment):  # the most frequent record first
            kind, row = "enrollment", enrollment_tuple(r)
        elif isinstance(r, RosterPerson):
            kind, row = "person", person_tuple(r)
        elif isinstance(r, RosterClass):
            kind, row = "class", class_tuple(r)
            if r.term_ids:
                out.terms[r.sourced_id] = r.term_ids
        elif isinstance(r, RosterOrg):
            kind, row = "org", org_tuple(r)
        else:
            out.rejected.append(r)
            continue
        if _too_long(row, _LIMITS[kind]) is not None:
            keep_fitting(kind, [row], out.rejected)  # reported; its date is not the source's
            continue
        rows[kind].append(row)
        dlm = r.date_last_modified
        if dlm is not None and (newest is None or dlm > newest):
            newest = dlm
    out.newest = newest
    return out
