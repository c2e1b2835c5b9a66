"""``type: oneroster_csv``: a OneRoster 1.1 bulk CSV drop, in a folder or a ``.zip``.

Format handling:

* ``manifest.csv`` (``propertyName,value``) must exist. ``file.orgs``, ``file.users``,
  ``file.classes`` and ``file.enrollments`` say ``bulk`` (read it; the file must exist) or
  ``absent`` (skip it); a file the manifest does not mention is read if present. Any
  ``file.*`` set to ``delta`` is refused (delta drops are not supported yet), as is an
  ``oneroster.version`` other than 1.0/1.1 (1.2 moved roles out of ``users.csv``).
* Files are found by name, case-insensitively; in a zip a member at the root wins over one in a
  sub-folder (exports often wrap everything in one folder).
* Rows are streamed, never loaded whole: bytes are decoded line by line with an incremental
  decoder (``encoding``, default ``utf-8-sig`` to drop an Excel BOM), so an undecodable byte is
  reported with the line it sits on, and the csv module sees exactly one physical line per
  string, so ``reader.line_num`` is the physical line number (header = line 1). A row's
  location is the line it *starts* on, even if a quoted field runs over several lines.
* Header names are matched exactly as the 1.1 spec spells them (surrounding spaces ignored);
  unknown extra columns are ignored. A missing required column stops the run; columns we can
  default (``status``, ``dateLastModified``, ``enabledUser``, ``primary``, ...) may be absent.
* A bad row becomes a :class:`~rostersync.records.Rejected` with ``"<file> line <n>"`` and the
  run goes on: wrong number of fields, malformed CSV on one line (text after a closing quote,
  a field over the csv module's 128 KiB limit, a stray CR), a NUL character, missing
  ``sourcedId``, unknown ``status``, a boolean other than ``true``/``false``, an unparseable
  ``dateLastModified``, an enrollment without class or user, a person or enrollment without
  role, an org without name, a class without title. A file that cannot be read fails the run
  with :class:`~rostersync.errors.FatalSourceError` naming file and line: undecodable bytes, a
  corrupt or truncated zip member, a malformed header, or broken quoting that hides where the
  next row starts (see :mod:`rostersync.csvrecords`).
* Values: ``status`` blank -> ``active``; ``tobedeleted`` and 1.0's ``inactive`` ->
  ``tobedeleted``. ``enabledUser`` blank -> true, ``primary`` blank -> false. Blank email ->
  ``None``; email case is kept (the engine lower-cases). Roles are lower-cased.
  ``dateLastModified`` is ISO 8601 (``Z`` allowed; a naive time is taken as UTC).
* CSV files carry no change filter: ``supports_delta`` is false and a delta fetch raises
  :class:`~rostersync.errors.DeltaUnsupportedError`. ``fetch_teacher`` re-reads the files.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import os
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from pydantic import Field, ValidationInfo, field_validator

from rostersync.config.source import SourceConfig
from rostersync.config.types import ConfigPath, checking_files
from rostersync.connector import ConnectorContext, ConnectorPlugin, FetchMode
from rostersync.csvrecords import CsvUnreadable, read_records
from rostersync.errors import DeltaUnsupportedError, FatalSourceError
from rostersync.records import (
    STUDENT,
    TEACHER,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
    Status,
    TeacherRef,
    TeacherRoster,
)

MANIFEST = "manifest.csv"
ORGS = "orgs.csv"
USERS = "users.csv"
CLASSES = "classes.csv"
ENROLLMENTS = "enrollments.csv"

#: Columns a file must have: without them its rows mean nothing (or, for ``email``, every
#: teacher would silently lose their account).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    MANIFEST: ("propertyName", "value"),
    ORGS: ("sourcedId", "name"),
    USERS: ("sourcedId", "role", "givenName", "familyName", "email"),
    CLASSES: ("sourcedId", "title", "schoolSourcedId"),
    ENROLLMENTS: ("sourcedId", "classSourcedId", "userSourcedId", "role"),
}
_COLUMNS_READ: dict[str, tuple[str, ...]] = {
    MANIFEST: ("propertyName", "value"),
    ORGS: ("sourcedId", "status", "dateLastModified", "name", "type", "identifier",
           "parentSourcedId"),
    USERS: ("sourcedId", "status", "dateLastModified", "enabledUser", "orgSourcedIds", "role",
            "username", "givenName", "familyName", "email"),
    CLASSES: ("sourcedId", "status", "dateLastModified", "title", "classCode",
              "schoolSourcedId"),
    ENROLLMENTS: ("sourcedId", "status", "dateLastModified", "classSourcedId",
                  "userSourcedId", "role", "primary"),
}  # fmt: skip
_ENTITY = {ORGS: "org", USERS: "user", CLASSES: "class", ENROLLMENTS: "enrollment"}
_STATUS: dict[str, Status] = {"": "active", "active": "active", "tobedeleted": "tobedeleted",
                              "inactive": "tobedeleted"}  # fmt: skip
_SUPPORTED_VERSIONS = ("1.0", "1.1")


class CsvSourceConfig(SourceConfig):
    """A OneRoster 1.1 bulk CSV drop."""

    type: Literal["oneroster_csv"]
    path: ConfigPath = Field(
        description="a folder or a .zip of OneRoster 1.1 CSV files (relative to the config file)"
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


#: The longest physical line read: a row of 128 KiB fields is far shorter.
MAX_LINE_CHARS = 16 * 1024 * 1024
_READ_SIZE = 1024 * 1024


class _RowError(Exception):
    """One row is unusable; becomes a Rejected."""


class _LineTooLong(Exception):
    """A physical line grew past MAX_LINE_CHARS."""


class _Bundle:
    """The CSV files of one drop, in a folder or a zip, looked up by case-insensitive name."""

    def __init__(self, source: str, path: Path) -> None:
        self.source = source
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[str, str] = {}
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file():
                    self._names.setdefault(child.name.lower(), child.name)
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise FatalSourceError(source, f"{path}: not a readable zip ({exc})") from None
            members = [m for m in self._zip.namelist() if not m.endswith("/")]
            # Shallowest first, so a root member beats one of the same name in a sub-folder.
            for member in sorted(members, key=lambda m: (m.count("/"), m)):
                self._names.setdefault(member.rsplit("/", 1)[-1].lower(), member)
        else:
            raise FatalSourceError(source, f"{path}: no such folder or zip file")

    def has(self, name: str) -> bool:
        return name.lower() in self._names

    def open(self, name: str) -> IO[bytes]:
        actual = self._names[name.lower()]
        try:
            if self._zip is not None:
                return self._zip.open(actual)
            return open(self.path / actual, "rb")
        # RuntimeError: an encrypted member; NotImplementedError: a compression zipfile lacks.
        except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as exc:
            raise FatalSourceError(
                self.source, f"{self.where(name)}: cannot open ({exc})"
            ) from None

    def where(self, name: str) -> str:
        return f"{self.path}!{name}" if self._zip is not None else str(self.path / name)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _text_lines(raw: IO[bytes], encoding: str, counter: list[int]) -> Iterator[str]:
    """Decode `raw` one physical line per string, counting lines into ``counter[0]``.

    Splitting the decoded text (not the bytes) on ``\\n`` keeps multi-byte encodings such as
    UTF-16 right; yielding one physical line per string keeps ``csv.reader.line_num`` equal to
    the physical line number.
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    pending = ""
    # readline with a limit: a line with no end (gigabytes unpacked from a small zip) arrives
    # in pieces, and is refused past MAX_LINE_CHARS instead of filling the memory.
    for chunk in iter(functools.partial(raw.readline, _READ_SIZE), b""):
        pending += decoder.decode(chunk)
        while (cut := pending.find("\n")) >= 0:
            line, pending = pending[: cut + 1], pending[cut + 1 :]
            counter[0] += 1
            yield line
        if len(pending) > MAX_LINE_CHARS:
            raise _LineTooLong
    pending += decoder.decode(b"", final=True)
    if pending:
        counter[0] += 1
        yield pending


@dataclass(frozen=True, slots=True)
class _Row:
    """One CSV record: its values by column, and where it starts."""

    file: str
    line: int
    values: dict[str, str]

    @property
    def location(self) -> str:
        return f"{self.file} line {self.line}"

    def get(self, column: str) -> str:
        return self.values.get(column, "")


def _read_rows(bundle: _Bundle, name: str, encoding: str) -> Iterator[_Row | Rejected]:
    """Stream one file's rows; a row that cannot be used as read comes back Rejected."""
    entity = _ENTITY.get(name, name)
    counter = [0]
    try:
        with bundle.open(name) as raw:
            records = read_records(_text_lines(raw, encoding, counter))
            line, fields, problem = next(records, (0, [], None))
            if problem is not None:
                raise FatalSourceError(
                    bundle.source,
                    f"{bundle.where(name)} line {line}: unreadable header ({problem})",
                )
            # A BOM left by a concatenation or by `encoding: utf-8` is no part of a name.
            header = [h.replace("\ufeff", "").strip() for h in fields]
            for column in REQUIRED_COLUMNS.get(name, ()):
                if column not in header:
                    raise FatalSourceError(
                        bundle.source, f"{bundle.where(name)}: missing required column {column!r}"
                    )
            # Only the columns we read: stripping the rest would be wasted work per row.
            index = {c: header.index(c) for c in _COLUMNS_READ.get(name, ()) if c in header}
            width = len(header)
            for line, fields, problem in records:
                if problem is None and len(fields) == width:
                    values = {column: fields[i].strip() for column, i in index.items()}
                    yield _Row(name, line, values)
                elif problem is not None or fields:  # not a blank line
                    i = index.get("sourcedId", 0)
                    sid = fields[i].strip() if i < len(fields) and fields[i].strip() else None
                    reason = problem or f"expected {width} fields, found {len(fields)}"
                    yield Rejected(entity, sid, reason, f"{name} line {line}")
    except CsvUnreadable as exc:
        raise FatalSourceError(bundle.source, f"{bundle.where(name)} {exc}") from None
    except _LineTooLong:
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(name)} line {counter[0] + 1}: more than {MAX_LINE_CHARS} characters "
            "without a line break (not a CSV file?)",
        ) from None
    except UnicodeError as exc:  # also UTF-16 without a byte-order mark, not only bad bytes
        reason = exc.reason if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(name)} line {counter[0] + 1}: cannot decode as {encoding} ({reason})",
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise FatalSourceError(
            bundle.source,
            f"{bundle.where(name)} line {counter[0] + 1}: file is truncated or corrupt ({exc})",
        ) from None


# --- value parsing: each raises _RowError with the reason a row is rejected ------------------


def _status(row: _Row) -> Status:
    value = row.get("status")
    try:
        return _STATUS[value.lower()]
    except KeyError:
        raise _RowError(f"unknown status {value!r}") from None


def _boolean(row: _Row, column: str, default: bool) -> bool:
    value = row.get(column).lower()
    if not value:
        return default
    if value in ("true", "false"):
        return value == "true"
    raise _RowError(f"{column} {row.get(column)!r} is not true or false")


def _date(row: _Row) -> datetime | None:
    value = row.get("dateLastModified")
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _RowError(f"dateLastModified {value!r} is not an ISO 8601 date-time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _required(row: _Row, column: str) -> str:
    value = row.get(column)
    if not value:
        raise _RowError(f"missing {column}")
    return value


def _org(row: _Row) -> RosterOrg:
    return RosterOrg(
        row.get("sourcedId"),
        _required(row, "name"),
        type=row.get("type") or "school",
        identifier=row.get("identifier") or None,
        parent_id=row.get("parentSourcedId") or None,
        status=_status(row),
        date_last_modified=_date(row),
    )


def _person(row: _Row) -> RosterPerson:
    orgs = tuple(o.strip() for o in row.get("orgSourcedIds").split(",") if o.strip())
    return RosterPerson(
        row.get("sourcedId"),
        _required(row, "role").lower(),
        row.get("givenName"),
        row.get("familyName"),
        row.get("email") or None,
        row.get("username") or None,
        enabled=_boolean(row, "enabledUser", True),
        org_ids=orgs,
        status=_status(row),
        date_last_modified=_date(row),
    )


def _class(row: _Row) -> RosterClass:
    return RosterClass(
        row.get("sourcedId"),
        _required(row, "title"),
        class_code=row.get("classCode") or None,
        school_id=row.get("schoolSourcedId") or None,
        status=_status(row),
        date_last_modified=_date(row),
    )


def _enrollment(row: _Row) -> RosterEnrollment:
    return RosterEnrollment(
        row.get("sourcedId"),
        _required(row, "classSourcedId"),
        _required(row, "userSourcedId"),
        _required(row, "role").lower(),
        status=_status(row),
        primary=_boolean(row, "primary", False),
        date_last_modified=_date(row),
    )


_PARSERS: dict[str, Callable[[_Row], RosterRecord]] = {
    ORGS: _org,
    USERS: _person,
    CLASSES: _class,
    ENROLLMENTS: _enrollment,
}
#: Read in this order so every enrollment arrives after the people and classes it names.
DATA_FILES = (ORGS, USERS, CLASSES, ENROLLMENTS)


def _records(bundle: _Bundle, name: str, encoding: str) -> Iterator[RosterRecord]:
    parse = _PARSERS[name]
    entity = _ENTITY[name]
    for row in _read_rows(bundle, name, encoding):
        if isinstance(row, Rejected):
            yield row
            continue
        sourced_id = row.get("sourcedId")
        if not sourced_id:
            yield Rejected(entity, None, "missing sourcedId", row.location)
            continue
        try:
            yield parse(row)
        except _RowError as exc:
            yield Rejected(entity, sourced_id, str(exc), row.location)


class OneRosterCsvConnector:
    """Reads a OneRoster 1.1 bulk CSV drop (see the module docstring for the rules)."""

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

    @property
    def supports_delta(self) -> bool:
        return False

    def _files(self, bundle: _Bundle) -> list[str]:
        """The data files to read, from the manifest; refuses delta drops and 1.2 files."""
        if not bundle.has(MANIFEST):
            raise FatalSourceError(self.source, f"{self.path}: {MANIFEST} not found")
        props: dict[str, str] = {}
        for row in _read_rows(bundle, MANIFEST, self.encoding):
            if isinstance(row, _Row):
                props[row.get("propertyName")] = row.get("value")
        version = props.get("oneroster.version", "")
        if version and version not in _SUPPORTED_VERSIONS:
            raise FatalSourceError(
                self.source,
                f"{bundle.where(MANIFEST)}: oneroster.version {version!r} is not supported "
                "(OneRoster 1.1 CSV only)",
            )
        for key, value in props.items():
            if key.startswith("file.") and value.lower() == "delta":
                raise FatalSourceError(
                    self.source,
                    f"{bundle.where(MANIFEST)}: {key} is delta; "
                    "delta CSV files are not supported yet",
                )
        files: list[str] = []
        for name in DATA_FILES:
            key = f"file.{name.removesuffix('.csv')}"
            mode = props.get(key, "").lower()
            if mode == "bulk":
                if not bundle.has(name):
                    raise FatalSourceError(
                        self.source, f"{self.path}: manifest lists {name} as bulk but it is missing"
                    )
                files.append(name)
            elif mode == "" and bundle.has(name):
                files.append(name)
            elif mode not in ("", "absent"):
                raise FatalSourceError(
                    self.source, f"{bundle.where(MANIFEST)}: {key} has unknown value {mode!r}"
                )
        return files

    def _iter_records(self, bundle: _Bundle) -> Iterator[RosterRecord]:
        for name in self._files(bundle):
            yield from _records(bundle, name, self.encoding)

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        if mode is FetchMode.DELTA:
            raise DeltaUnsupportedError(self.source, "a OneRoster CSV drop has no delta filter")
        bundle = _Bundle(self.source, self.path)
        try:
            batch: list[RosterRecord] = []
            for record in self._iter_records(bundle):
                batch.append(record)
                if len(batch) >= self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            bundle.close()

    def _teacher_roster(self, teacher: TeacherRef) -> TeacherRoster:
        """Four passes over the files, keeping only what concerns this teacher."""
        bundle = _Bundle(self.source, self.path)
        try:
            files = self._files(bundle)

            def read(name: str) -> Iterator[RosterRecord]:
                return _records(bundle, name, self.encoding) if name in files else iter(())

            class_ids = {
                r.class_id
                for r in read(ENROLLMENTS)
                if isinstance(r, RosterEnrollment)
                and r.user_id == teacher.sourced_id
                and r.role == TEACHER
            }
            enrollments = [
                r
                for r in read(ENROLLMENTS)
                if isinstance(r, RosterEnrollment) and r.class_id in class_ids
            ]
            student_ids = {e.user_id for e in enrollments if e.role == STUDENT}
            roster = TeacherRoster(teacher=None, enrollments=enrollments)
            for r in read(CLASSES):
                if isinstance(r, RosterClass) and r.sourced_id in class_ids:
                    roster.classes.append(r)
                elif isinstance(r, Rejected) and r.sourced_id in class_ids:
                    roster.rejected.append(r)
            for r in read(USERS):
                if isinstance(r, RosterPerson):
                    if r.sourced_id == teacher.sourced_id:
                        roster.teacher = r
                    elif r.sourced_id in student_ids:
                        roster.persons.append(r)
                elif isinstance(r, Rejected) and (
                    r.sourced_id == teacher.sourced_id or r.sourced_id in student_ids
                ):
                    roster.rejected.append(r)
            return roster
        finally:
            bundle.close()

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        # A one-shot blocking read: a thread keeps the event loop (and other workers) moving.
        return await asyncio.to_thread(self._teacher_roster, teacher)

    async def aclose(self) -> None:
        self.closed = True


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
    description="OneRoster 1.1 bulk CSV files in a folder or a zip",
)
