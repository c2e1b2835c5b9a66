"""``academicSessions.csv``: the school years, semesters, terms and grading periods.

Classes name theirs in ``termSourcedIds`` (:attr:`~rostersync.source.records.RosterClass.term_ids`);
the engine's terms rules (``terms: {mode: current}``) read both. A class whose sessions are
unknown counts, so nothing about this file stops a run or rejects a record: a missing column,
an unreadable file or a row without usable dates is a warning, and the sessions that could be
read are kept on the connector
(:attr:`~connectors.oneroster_csv.OneRosterCsvConnector.academic_sessions`).
"""

from __future__ import annotations

from datetime import date, datetime

from connectors.oneroster_csv.entities import (
    COLUMNS_READ,
    ENTITY,
    REQUIRED_COLUMNS,
    SESSIONS,
    V11,
    RowError,
    status,
)
from connectors.oneroster_csv.files import Bundle, read_rows
from connectors.oneroster_csv.notes import Notes, quote
from rostersync.errors import FatalSourceError
from rostersync.source.records import AcademicSession, Rejected


def _day(value: str, column: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        pass
    try:  # some exports write a date-time
        return datetime.fromisoformat(value).date()
    except ValueError:
        raise RowError(f"{column} {quote(value)} is not a date (YYYY-MM-DD)") from None


def read_sessions(bundle: Bundle, encoding: str, notes: Notes) -> dict[str, AcademicSession]:
    """Every usable session by sourcedId; the rest are warnings."""
    kind = f"{SESSIONS}: sessions not read"
    found: dict[str, AcademicSession] = {}
    try:
        for row in read_rows(
            bundle,
            SESSIONS,
            encoding,
            entity=ENTITY[SESSIONS],
            required=REQUIRED_COLUMNS[V11][SESSIONS],
            columns=COLUMNS_READ[SESSIONS],
        ):
            if isinstance(row, Rejected):
                notes.add(kind, f"{row.location}: {row.reason}; the session is not read")
                continue
            sourced_id = row.get("sourcedId")
            try:
                if not sourced_id:
                    raise RowError("missing sourcedId")
                found[sourced_id] = AcademicSession(
                    sourced_id,
                    row.get("title"),
                    row.get("type"),
                    _day(row.get("startDate"), "startDate"),
                    _day(row.get("endDate"), "endDate"),
                    parent_id=row.get("parentSourcedId") or None,
                    school_year=row.get("schoolYear") or None,
                    status=status(row),
                )
            except RowError as exc:
                notes.add(kind, f"{row.location}: {exc}; the session is not read")
    except FatalSourceError as exc:
        # Half a file of sessions would be worse than none once terms decide anything.
        notes.add(kind, f"{exc.detail}; no academic session is read")
        return {}
    return found
