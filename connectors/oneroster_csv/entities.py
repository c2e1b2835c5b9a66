"""Rows of the data files to records: the columns each file must have, and each value's rules.

A bad row becomes a :class:`~rostersync.source.records.Rejected` with ``"<file> line <n>"`` and the
run goes on: missing ``sourcedId``, unknown ``status``, a boolean other than ``true``/``false``,
an enrollment without class or user, a person or enrollment without role, an org without
name, a class without title. A ``tobedeleted`` row needs only its ``sourcedId`` (delta drops
often carry little else), as in the OneRoster REST connector.

A value no rule needs is forgiven: a ``dateLastModified`` that is not ISO 8601 (``1/05/2023``)
is a warning naming file and line, and the row is read without it (a full run never uses the
date; a delta run only takes the newest one as a bookmark).

Values: ``status`` blank -> ``active``; ``tobedeleted`` and 1.0's ``inactive`` ->
``tobedeleted``. ``enabledUser`` blank -> true, ``primary`` blank -> false; booleans are
``true``/``false`` in any case, or ``1``/``0``. Blank email ->
``None``; email case is kept (the engine lower-cases). Roles are lower-cased.
``dateLastModified`` is ISO 8601 (``Z`` allowed; a naive time is taken as UTC). A list cell
(``orgSourcedIds``, ``termSourcedIds``) is comma-separated.

The files and columns differ between versions only for people: OneRoster 1.1 gives each row of
``users.csv`` its ``role`` and ``orgSourcedIds``; 1.2 moved roles into ``roles.csv`` (see
:mod:`.roles`) and adds ``primaryOrgSourcedId``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from connectors.oneroster_csv.files import Bundle, Row, read_rows
from connectors.oneroster_csv.notes import Notes, quote
from rostersync.source.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
    Status,
)

MANIFEST = "manifest.csv"
ORGS = "orgs.csv"
USERS = "users.csv"
ROLES = "roles.csv"
CLASSES = "classes.csv"
ENROLLMENTS = "enrollments.csv"
SESSIONS = "academicSessions.csv"

V11 = "1.1"
V12 = "1.2"

#: Columns a file must have: without them its rows mean nothing (or, for ``email``, every
#: teacher would silently lose their account). By version; ``manifest.csv`` has no version.
_REQUIRED_COMMON: dict[str, tuple[str, ...]] = {
    MANIFEST: ("propertyName", "value"),
    ORGS: ("sourcedId", "name"),
    CLASSES: ("sourcedId", "title", "schoolSourcedId"),
    ENROLLMENTS: ("sourcedId", "classSourcedId", "userSourcedId", "role"),
    SESSIONS: ("sourcedId", "startDate", "endDate"),
}
REQUIRED_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    V11: {**_REQUIRED_COMMON, USERS: ("sourcedId", "role", "givenName", "familyName", "email")},
    V12: {
        **_REQUIRED_COMMON,
        USERS: ("sourcedId", "givenName", "familyName", "email"),
        ROLES: ("userSourcedId", "roleType", "role"),
    },
}
#: The columns read (only these are stripped and kept per row). A 1.2 ``users.csv`` may still
#: carry 1.1's ``role`` and ``orgSourcedIds``: they are used when present.
COLUMNS_READ: dict[str, tuple[str, ...]] = {
    MANIFEST: ("propertyName", "value"),
    ORGS: ("sourcedId", "status", "dateLastModified", "name", "type", "identifier",
           "parentSourcedId"),
    USERS: ("sourcedId", "status", "dateLastModified", "enabledUser", "orgSourcedIds", "role",
            "username", "givenName", "familyName", "email", "primaryOrgSourcedId"),
    ROLES: ("sourcedId", "status", "dateLastModified", "userSourcedId", "roleType", "role",
            "orgSourcedId"),
    CLASSES: ("sourcedId", "status", "dateLastModified", "title", "classCode",
              "schoolSourcedId", "termSourcedIds"),
    ENROLLMENTS: ("sourcedId", "status", "dateLastModified", "classSourcedId",
                  "userSourcedId", "role", "primary"),
    SESSIONS: ("sourcedId", "status", "dateLastModified", "title", "type", "startDate",
               "endDate", "parentSourcedId", "schoolYear"),
}  # fmt: skip
ENTITY = {MANIFEST: "manifest", ORGS: "org", USERS: "user", ROLES: "role", CLASSES: "class",
          ENROLLMENTS: "enrollment", SESSIONS: "academicSession"}  # fmt: skip
_STATUS: dict[str, Status] = {"": "active", "active": "active", "tobedeleted": "tobedeleted",
                              "inactive": "tobedeleted"}  # fmt: skip


class RowError(Exception):
    """One row is unusable; becomes a Rejected."""


def rows(
    bundle: Bundle, name: str, encoding: str, version: str = V11, *, key: str = "sourcedId"
) -> Iterator[Row | Rejected]:
    """One known file's rows, with its required columns checked (``key``: see read_rows)."""
    return read_rows(
        bundle,
        name,
        encoding,
        entity=ENTITY.get(name, name),
        required=REQUIRED_COLUMNS[version].get(name, ()),
        columns=COLUMNS_READ.get(name, ()),
        key=key,
    )


# --- value parsing: each raises RowError with the reason a row is rejected ------------------


def status(row: Row) -> Status:
    value = row.get("status")
    try:
        return _STATUS[value.lower()]
    except KeyError:
        raise RowError(f"unknown status {value!r}") from None


#: ``true``/``false`` as the spec spells them, and ``1``/``0`` as some exporters write them
#: (the REST connector reads both too).
_BOOLEAN = {"true": True, "false": False, "1": True, "0": False}


def boolean(row: Row, column: str, default: bool) -> bool:
    value = row.get(column).lower()
    if not value:
        return default
    found = _BOOLEAN.get(value)
    if found is None:
        raise RowError(f"{column} {row.get(column)!r} is not true or false")
    return found


def date(row: Row, notes: Notes) -> datetime | None:
    """``dateLastModified``, or None (with a warning) when it is not ISO 8601."""
    value = row.get("dateLastModified")
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is not None:  # OverflowError: year 1 ahead of UTC, 9999 behind it,
            parsed.astimezone(UTC)  # no instant a staging row holds (rows.utc_text)
    except (ValueError, OverflowError):
        notes.add(
            f"{row.file}: rows read without their dateLastModified",
            f"{row.location}: dateLastModified {quote(value)} is not an ISO 8601 date-time; "
            "the row was read without it",
        )
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def required(row: Row, column: str, state: Status = "active") -> str:
    """The column's value; blank is an error, except in a ``tobedeleted`` row."""
    value = row.get(column)
    if not value and state == "active":
        raise RowError(f"missing {column}")
    return value


def id_list(row: Row, column: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in row.get(column).split(",") if part.strip())


def org(row: Row, notes: Notes) -> RosterOrg:
    state = status(row)
    return RosterOrg(
        row.get("sourcedId"),
        required(row, "name", state),
        type=row.get("type") or "school",
        identifier=row.get("identifier") or None,
        parent_id=row.get("parentSourcedId") or None,
        status=state,
        date_last_modified=date(row, notes),
    )


def person(row: Row, notes: Notes) -> RosterPerson:
    """A OneRoster 1.1 ``users.csv`` row, which carries the person's role."""
    state = status(row)
    return RosterPerson(
        row.get("sourcedId"),
        required(row, "role", state).lower(),
        row.get("givenName"),
        row.get("familyName"),
        row.get("email") or None,
        row.get("username") or None,
        enabled=boolean(row, "enabledUser", True),
        org_ids=id_list(row, "orgSourcedIds"),
        status=state,
        date_last_modified=date(row, notes),
    )


def klass(row: Row, notes: Notes) -> RosterClass:
    state = status(row)
    return RosterClass(
        row.get("sourcedId"),
        required(row, "title", state),
        class_code=row.get("classCode") or None,
        school_id=row.get("schoolSourcedId") or None,
        status=state,
        date_last_modified=date(row, notes),
        term_ids=id_list(row, "termSourcedIds"),
    )


def enrollment(row: Row, notes: Notes) -> RosterEnrollment:
    state = status(row)
    return RosterEnrollment(
        row.get("sourcedId"),
        required(row, "classSourcedId", state),
        required(row, "userSourcedId", state),
        required(row, "role", state).lower(),
        status=state,
        primary=boolean(row, "primary", False),
        date_last_modified=date(row, notes),
    )


Parser = Callable[[Row, Notes], RosterRecord]

PARSERS: dict[str, Parser] = {ORGS: org, USERS: person, CLASSES: klass, ENROLLMENTS: enrollment}


def records(
    bundle: Bundle,
    name: str,
    encoding: str,
    notes: Notes,
    *,
    version: str = V11,
    parse: Parser | None = None,
) -> Iterator[RosterRecord]:
    """Every row of a data file as a record or its rejection (``parse`` overrides the file's
    usual parser: a 1.2 ``users.csv`` needs the drop's roles)."""
    for record, _ in records_with_rows(bundle, name, encoding, notes, version=version, parse=parse):
        yield record


def records_with_rows(
    bundle: Bundle,
    name: str,
    encoding: str,
    notes: Notes,
    *,
    version: str = V11,
    parse: Parser | None = None,
) -> Iterator[tuple[RosterRecord, Row | None]]:
    """:func:`records`, each with the row it was read from (None for a row malformed as CSV):
    a live read tells by a rejected row's other columns whom it concerns."""
    parse = parse or PARSERS[name]
    entity = ENTITY[name]
    for row in rows(bundle, name, encoding, version):
        if isinstance(row, Rejected):
            yield row, None
            continue
        sourced_id = row.get("sourcedId")
        refs = _refs(entity, row)
        if not sourced_id:
            yield Rejected(entity, None, "missing sourcedId", row.location, *refs), row
            continue
        try:
            yield parse(row, notes), row
        except RowError as exc:
            yield Rejected(entity, sourced_id, str(exc), row.location, *refs), row


def _refs(entity: str, row: Row) -> tuple[str | None, str | None]:
    """A rejected enrollment row's class and user, as far as they are filled in."""
    if entity != "enrollment":
        return None, None
    return row.get("classSourcedId").strip() or None, row.get("userSourcedId").strip() or None
