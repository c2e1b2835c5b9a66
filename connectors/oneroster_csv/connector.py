"""The ``oneroster_csv`` connector: its config, the fetch, and the live teacher read.

A drop is a bulk drop (a full snapshot) or a delta drop (changes only), as its manifest says
(:mod:`.manifest`). What a run does with it:

* a **full** fetch of a bulk drop reads everything, and the engine then sweeps what the drop
  does not mention;
* a **full** fetch of a delta drop raises :class:`~rostersync.errors.ChangesOnlyError`: a full
  run would remove everything the changes leave out. The engine runs a delta run instead, or
  refuses when ``--full`` was asked for or no full run has succeeded yet. So does a full
  fetch of a drop in part, one without ``users.csv``, ``classes.csv`` or ``enrollments.csv``
  (``absent`` in its manifest, or not there): it says nothing of those records, and a full
  run would remove every teacher or every group;
* a **delta** fetch reads either kind of drop as changes: every row is upserted and a
  ``tobedeleted`` row is a removal, nothing else is removed. ``since`` is not used: a drop is
  whatever the exporter put in it, and reading the same drop twice changes nothing.

``supports_delta`` is therefore true. ``fetch_teacher`` (``resync --live``) re-reads a bulk
drop and refuses a delta drop or a drop in part, which cannot say which classes a teacher has
now.

``warnings`` holds what the last fetch forgave (see :mod:`.notes`), ``academic_sessions`` the
sessions it read (:mod:`.sessions`).
"""

from __future__ import annotations

import asyncio
import codecs
import os
import zipfile
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from connectors.oneroster_csv.entities import (
    CLASSES,
    ENROLLMENTS,
    MANIFEST,
    ORGS,
    ROLES,
    SESSIONS,
    USERS,
    V12,
    Parser,
    records,
    records_with_rows,
)
from connectors.oneroster_csv.files import (
    Bundle,
    Row,
    best_effort_fields,
    read_header,
    read_rows,
)
from connectors.oneroster_csv.manifest import BULK, Drop, plan
from connectors.oneroster_csv.notes import Notes
from connectors.oneroster_csv.roles import RolesIndex, person_parser, read_roles, untaken_roles
from connectors.oneroster_csv.sessions import read_sessions
from rostersync.config.source import ScopedSourceConfig
from rostersync.config.types import ConfigPath, checking_files
from rostersync.errors import ChangesOnlyError, FatalSourceError
from rostersync.scoping import OrgInfo, resolve_schools
from rostersync.source.connector import ConnectorContext, ConnectorPlugin, FetchMode
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    AcademicSession,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
    RosterRecord,
    TeacherRef,
    TeacherRoster,
)


class CsvSourceConfig(ScopedSourceConfig):
    """A OneRoster 1.1 or 1.2 CSV drop, bulk or delta."""

    type: Literal["oneroster_csv"]
    path: ConfigPath = Field(
        description="a folder or a .zip of OneRoster 1.1 or 1.2 CSV files (relative to the "
        "config file)"
    )
    encoding: str = Field(default="utf-8-sig", description="text encoding of the CSV files")
    batch_size: int = Field(default=1000, ge=1, description="records per batch handed on")

    @field_validator("path")
    @classmethod
    def _drop_readable(cls, value: Path, info: ValidationInfo) -> Path:
        # `config check` reports what the run would fail on (see checking_files).
        if not checking_files(info):
            return value
        if value.is_dir():
            if not os.access(value, os.R_OK | os.X_OK):
                raise ValueError(f"folder {value} is not readable")
            return value
        if not value.exists():
            raise ValueError(f"{value} does not exist (give a folder or a .zip of CSV files)")
        try:
            if zipfile.is_zipfile(value):
                return value
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
        raise ValueError(f"{value} is neither a folder nor a .zip file")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}") from None
        return value

    @model_validator(mode="after")
    def _schools_known(self, info: ValidationInfo) -> CsvSourceConfig:
        """`config check`: each `schools` entry must name an org of the drop (by sourcedId or
        name), when the drop is there with a bulk orgs.csv (a delta one holds changes only)."""
        if not checking_files(info) or not (self.schools.include or self.schools.exclude):
            return self
        orgs = bulk_orgs(self.path, self.encoding)
        if orgs is None:
            return self
        unknown = resolve_schools(orgs, self.schools.include, self.schools.exclude).unknown
        if unknown:
            raise ValueError(
                f"schools: {', '.join(unknown)} matches no org of the drop's orgs.csv "
                "(by sourcedId or name)"
            )
        return self


def bulk_orgs(path: Path, encoding: str) -> dict[str, OrgInfo] | None:
    """The orgs of a drop's bulk orgs.csv, or None when the drop cannot say (no drop, a
    delta orgs.csv, a file that cannot be read)."""
    try:
        bundle = Bundle("config", path)
    except FatalSourceError:
        return None
    try:
        drop = plan(bundle, encoding, Notes())
        if drop.modes.get(ORGS) != BULK or not bundle.has(ORGS):
            return None
        orgs: dict[str, OrgInfo] = {}
        for row in read_rows(
            bundle,
            ORGS,
            encoding,
            entity="org",
            columns=("sourcedId", "name", "type", "parentSourcedId"),
        ):
            if not isinstance(row, Rejected) and row.get("sourcedId"):
                orgs[row.get("sourcedId")] = OrgInfo(
                    row.get("name"),
                    (row.get("type") or "school").lower(),
                    row.get("parentSourcedId") or None,
                )
        return orgs
    except (FatalSourceError, LookupError, ValueError):
        return None
    finally:
        bundle.close()


class _Reader:
    """One pass over one drop: its plan, and its records in reading order."""

    def __init__(self, bundle: Bundle, encoding: str, notes: Notes) -> None:
        self.bundle = bundle
        self.encoding = encoding
        self.notes = notes
        self.drop: Drop = plan(bundle, encoding, notes)

    def sessions(self) -> dict[str, AcademicSession]:
        if not self.drop.reads(SESSIONS):
            return {}
        return read_sessions(self.bundle, self.encoding, self.notes)

    def read(self, name: str, roles: RolesIndex | None = None) -> Iterator[RosterRecord]:
        """One data file's records (nothing when the drop does not read it)."""
        if not self.drop.reads(name):
            return iter(())
        parse: Parser | None = person_parser(roles) if name == USERS and roles else None
        return records(
            self.bundle, name, self.encoding, self.notes, version=self.drop.version, parse=parse
        )

    def read_with_rows(self, name: str) -> Iterator[tuple[RosterRecord, Row | None]]:
        """:meth:`read` (of a file other than users.csv), each record with its row."""
        if not self.drop.reads(name):
            return iter(())
        return records_with_rows(
            self.bundle, name, self.encoding, self.notes, version=self.drop.version
        )

    def roles(self) -> tuple[RolesIndex | None, list[Rejected]]:
        """A 1.2 drop's roles index (None for 1.1), with the rows that name no user."""
        if self.drop.version != V12:
            return None, []
        # Only a delta drop may hold part of a user's roles: a bulk roles.csv, or a bulk drop
        # (whose users.csv then has 1.1's role column), has them all.
        complete = not self.drop.is_delta or self.drop.modes.get(ROLES) == BULK
        if not self.drop.reads(ROLES):
            return RolesIndex(complete=complete, from_file=False), []
        return read_roles(self.bundle, self.encoding, self.notes, complete=complete)

    def records(self) -> Iterator[RosterRecord]:
        index, unusable = self.roles()
        yield from unusable
        for name in (ORGS, USERS, CLASSES, ENROLLMENTS):
            yield from self.read(name, index)
            if name == USERS and index is not None:
                yield from self._untaken(index)

    def _untaken(self, index: RolesIndex) -> Iterator[Rejected]:
        users_bulk = self.drop.modes.get(USERS) == BULK
        if users_bulk or not index.complete:
            yield from untaken_roles(
                self.bundle, self.encoding, index, self.notes, applied=not users_bulk
            )


class OneRosterCsvConnector:
    """Reads a OneRoster 1.1 or 1.2 CSV drop (see the package docstring for the rules)."""

    def __init__(
        self,
        source: str,
        path: Path,
        *,
        encoding: str = "utf-8-sig",
        batch_size: int = 1000,
    ) -> None:
        try:
            # Not codecs.lookup(): it also knows bytes-to-bytes codecs (hex, rot13, base64).
            "a".encode(encoding)
        except LookupError:
            raise FatalSourceError(source, f"unknown text encoding {encoding!r}") from None
        self.source = source
        self.path = path
        self.encoding = encoding
        self.batch_size = batch_size
        self.closed = False
        #: the last fetch's warnings, for the run's report (complete once the fetch ends)
        self.warnings: list[str] = []
        #: the academic sessions the last fetch read, by sourcedId (for the terms rules)
        self.academic_sessions: dict[str, AcademicSession] = {}

    @property
    def supports_delta(self) -> bool:
        return True

    def _check_mode(self, reader: _Reader, mode: FetchMode) -> None:
        drop, where = reader.drop, reader.bundle.where(MANIFEST)
        if drop.is_delta and mode is FetchMode.FULL:
            raise ChangesOnlyError(
                self.source,
                f"{where}: a delta drop ({drop.describe()}): it holds changes only, and a full "
                "run would remove everything it does not mention",
            )
        if drop.unread and mode is FetchMode.FULL:
            raise ChangesOnlyError(
                self.source,
                f"{where}: a drop in part ({drop.describe_unread()}): it says nothing of "
                "those records, and a full run would remove every one of them",
            )
        bulk = [name for name, m in drop.modes.items() if m == BULK and name != SESSIONS]
        if mode is FetchMode.DELTA and bulk:
            kind = "a delta drop" if drop.is_delta else "a bulk drop read by a delta run"
            reader.notes.add(
                "bulk files applied as changes",
                f"{', '.join(bulk)} {'is' if len(bulk) == 1 else 'are'} bulk in {kind}: "
                "applied as changes, so records left out of them are not removed (a full "
                "run of a bulk drop removes them)",
            )

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        self.warnings = []
        self.academic_sessions = {}
        notes = Notes()
        bundle = Bundle(self.source, self.path)
        try:
            reader = _Reader(bundle, self.encoding, notes)
            self._check_mode(reader, mode)
            self.academic_sessions = reader.sessions()
            batch: list[RosterRecord] = []
            for record in reader.records():
                batch.append(record)
                if len(batch) >= self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
            bundle.check_unchanged()
        finally:
            bundle.close()
        self.warnings = notes.lines()

    def _teacher_roster(self, teacher: TeacherRef) -> TeacherRoster:
        """Four passes over the files, keeping only what concerns this teacher, rejected
        records included: the engine must not take a record it rejected for gone."""
        bundle = Bundle(self.source, self.path)
        try:
            reader = _Reader(bundle, self.encoding, Notes())  # a live read reports no warnings
            drop = reader.drop
            if drop.is_delta or drop.unread:
                what = (
                    f"a delta drop ({drop.describe()}) holds changes only"
                    if drop.is_delta
                    else f"a drop in part ({drop.describe_unread()})"
                )
                raise FatalSourceError(
                    self.source,
                    f"{bundle.where(MANIFEST)}: {what} and cannot say which classes a teacher "
                    "has now: `resync --live` needs a bulk drop (a resync without --live uses "
                    "the last sync)",
                )
            class_ids: set[str] = set()
            bad: list[tuple[Rejected, Row | None]] = []
            for r, row in reader.read_with_rows(ENROLLMENTS):
                if isinstance(r, RosterEnrollment):
                    if r.user_id == teacher.sourced_id and r.role == TEACHER:
                        class_ids.add(r.class_id)
                elif isinstance(r, Rejected):
                    bad.append((r, row))
            enrollments = [
                r
                for r in reader.read(ENROLLMENTS)
                if isinstance(r, RosterEnrollment) and r.class_id in class_ids
            ]
            student_ids = {e.user_id for e in enrollments if e.role == STUDENT}
            roster = TeacherRoster(teacher=None, enrollments=enrollments)
            roster.rejected.extend(_enrollments_concerning(reader, bad, teacher, class_ids))
            for r in reader.read(CLASSES):
                if isinstance(r, RosterClass) and r.sourced_id in class_ids:
                    roster.classes.append(r)
                # One naming no id may be one of the teacher's classes.
                elif isinstance(r, Rejected) and (
                    r.sourced_id is None or r.sourced_id in class_ids
                ):
                    roster.rejected.append(r)
            index, _ = reader.roles()
            for r in reader.read(USERS, index):
                if isinstance(r, RosterPerson):
                    if r.sourced_id == teacher.sourced_id:
                        roster.teacher = r
                    elif r.sourced_id in student_ids:
                        roster.persons.append(r)
                elif isinstance(r, Rejected) and (
                    r.sourced_id is None
                    or r.sourced_id == teacher.sourced_id
                    or r.sourced_id in student_ids
                ):
                    roster.rejected.append(r)
            bundle.check_unchanged()
            return roster
        finally:
            bundle.close()

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        # A one-shot blocking read: a thread keeps the event loop (and other workers) moving.
        return await asyncio.to_thread(self._teacher_roster, teacher)

    async def aclose(self) -> None:
        self.closed = True


def _enrollments_concerning(
    reader: _Reader,
    bad: list[tuple[Rejected, Row | None]],
    teacher: TeacherRef,
    class_ids: set[str],
) -> Iterator[Rejected]:
    """The rejected enrollment rows a live answer must list: the teacher's own (it may be
    a class they teach now) and those of the teacher's classes, in file order. A row that
    does not say its class or its user may be one of those, so it is listed too."""
    # A row malformed as CSV is listed unless what can be read of it, leniently, shows it
    # is another user's in another class: its fields may be out of place, so the teacher's
    # or a class's id anywhere in it, or a blank or missing class or user, ties it to the answer.
    broken = {_line(r) for r, row in bad if row is None}
    fields = best_effort_fields(reader.bundle, ENROLLMENTS, reader.encoding, broken)
    header = read_header(reader.bundle, ENROLLMENTS, reader.encoding) if broken else []
    at = [header.index(c) for c in ("classSourcedId", "userSourcedId") if c in header]
    for r, row in bad:
        if row is None:
            found = fields.get(_line(r))
            if (
                found is None
                or teacher.sourced_id in found
                or class_ids.intersection(found)
                or any(i >= len(found) or not found[i] for i in at)
            ):
                yield r
            continue
        cls, user = row.get("classSourcedId"), row.get("userSourcedId")
        if not cls or cls in class_ids or not user or user == teacher.sourced_id:
            yield r


def _line(row: Rejected) -> int:
    """The line of a row the reader rejected (its location is ``"<file> line N"``)."""
    return int((row.location or "0").rsplit(" ", 1)[-1])


def create(ctx: ConnectorContext) -> OneRosterCsvConnector:
    config = ctx.config
    if not isinstance(config, CsvSourceConfig):
        raise TypeError(f"oneroster_csv needs a CsvSourceConfig, got {type(config).__name__}")
    return OneRosterCsvConnector(
        ctx.source, config.path, encoding=config.encoding, batch_size=config.batch_size
    )


PLUGIN = ConnectorPlugin(
    type="oneroster_csv",
    config_model=CsvSourceConfig,
    create=create,
    description="OneRoster 1.1 or 1.2 CSV files (bulk or delta) in a folder or a zip",
)
