"""Normalized roster records: the small frozen values every connector yields.

Connectors translate their source's shapes (OneRoster 1.1/1.2 JSON, OneRoster CSV rows,
Google Classroom courses and rosters) into these, so the sync engine knows one vocabulary.
`sourced_id` is unique within one source only; the store keys everything on
``(source, sourced_id)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from hashlib import blake2b
from typing import Any, Literal

Status = Literal["active", "tobedeleted"]

#: The roles the engine acts on; others (guardian, aide, ...) are kept as given.
TEACHER = "teacher"
STUDENT = "student"


def digest(*parts: object) -> str:
    """A short stable fingerprint of a record's content, used to spot changes in SQL.

    One hash call over one joined string: this runs once per record of a full sync.
    """
    return digest_text("\x1f".join(["\x00" if p is None else str(p) for p in parts]))


def digest_text(text: str) -> str:
    """:func:`digest` of parts already joined (``None`` as ``"\\x00"``, ``"\\x1f"`` between)."""
    return blake2b(text.encode(), digest_size=8).hexdigest()


def person_roles(role: str, roles: Iterable[str] = ()) -> str:
    """The stored ``roles`` of a person: the primary ``role`` and every other one, lower-cased,
    each once, sorted and comma-joined (``administrator,teacher``)."""
    names = {r.strip().lower().replace(",", " ") for r in (role, *roles) if r and r.strip()}
    return ",".join(sorted(names))


def person_digest(
    role: str,
    roles_text: str,
    given: str,
    family: str,
    email: str | None,
    username: str | None,
    enabled: bool,
    org_ids: tuple[str, ...],
    status: str,
) -> str:
    """A person's ``row_hash``. Roles beyond the primary one join the hash only when there are
    any, so a person with one role keeps the hash it had before roles were stored."""
    extra = () if roles_text == role.lower() else (roles_text,)
    return digest(role, given, family, email, username, enabled, org_ids, status, *extra)


@dataclass(frozen=True, slots=True)
class RosterOrg:
    sourced_id: str
    name: str
    type: str = "school"
    identifier: str | None = None
    parent_id: str | None = None
    status: Status = "active"
    date_last_modified: datetime | None = None

    entity = "org"

    def content_hash(self) -> str:
        return digest(self.name, self.type, self.identifier, self.parent_id, self.status)


@dataclass(frozen=True, slots=True)
class RosterPerson:
    sourced_id: str
    role: str
    given_name: str = ""
    family_name: str = ""
    email: str | None = None
    username: str | None = None
    enabled: bool = True
    org_ids: tuple[str, ...] = ()
    status: Status = "active"
    date_last_modified: datetime | None = None
    #: roles besides ``role`` (OneRoster 1.2 ``roles[]``); any of them may make a teacher
    other_roles: tuple[str, ...] = ()

    entity = "user"

    @property
    def display_name(self) -> str:
        return " ".join(p for p in (self.given_name, self.family_name) if p).strip()

    @property
    def roles_text(self) -> str:
        return person_roles(self.role, self.other_roles)

    def content_hash(self) -> str:
        return person_digest(
            self.role,
            self.roles_text,
            self.given_name,
            self.family_name,
            self.email,
            self.username,
            self.enabled,
            self.org_ids,
            self.status,
        )


@dataclass(frozen=True, slots=True)
class RosterClass:
    sourced_id: str
    title: str
    class_code: str | None = None
    school_id: str | None = None
    status: Status = "active"
    date_last_modified: datetime | None = None
    #: the academic sessions (terms) the class runs in: read by the terms rules
    #: (``terms: {mode: current}``) while a run is fetched; not stored, no part of ``content_hash``
    term_ids: tuple[str, ...] = ()

    entity = "class"

    def content_hash(self) -> str:
        return digest(self.title, self.class_code, self.school_id, self.status)


@dataclass(frozen=True, slots=True)
class AcademicSession:
    """One academic session (a school year, semester, term or grading period): a connector
    keeps those it read on its ``academic_sessions`` (by sourcedId) for the terms rules.
    OneRoster 1.2 calls ``end_date`` the first day after the session, 1.1 its last: the
    rules count it as a day of the session (the grace days dwarf the difference). ``type`` is
    ``schoolYear``, ``semester``, ``term``, ``gradingPeriod`` or an ``ext:`` name."""

    sourced_id: str
    title: str
    type: str
    start_date: date
    end_date: date
    parent_id: str | None = None
    school_year: str | None = None
    status: Status = "active"


@dataclass(frozen=True, slots=True)
class RosterEnrollment:
    sourced_id: str
    class_id: str
    user_id: str
    role: str
    status: Status = "active"
    primary: bool = False
    date_last_modified: datetime | None = None

    entity = "enrollment"

    def content_hash(self) -> str:
        return digest(self.class_id, self.user_id, self.role, self.status, self.primary)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record the connector could not accept; reported, never fatal to the run."""

    entity: str
    sourced_id: str | None
    reason: str
    location: str | None = None  # e.g. "users.csv line 14"
    #: a rejected enrollment's class and user, where the connector could read them: a live
    #: answer's apply then keeps just the rows they may be (see rostersync.resync.live)
    class_id: str | None = None
    user_id: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {
            "entity": self.entity,
            "sourced_id": self.sourced_id,
            "reason": self.reason,
        }
        if self.location:
            out["location"] = self.location
        return out


RosterRecord = RosterOrg | RosterPerson | RosterClass | RosterEnrollment | Rejected


@dataclass(frozen=True, slots=True)
class TeacherRef:
    """Who a live resync is for: the teacher's id in the source and their email."""

    sourced_id: str
    email: str | None


@dataclass(slots=True)
class TeacherRoster:
    """A teacher's current classes, with those classes' enrollments and students (live resync)."""

    teacher: RosterPerson | None
    classes: list[RosterClass] = field(default_factory=list)
    enrollments: list[RosterEnrollment] = field(default_factory=list)
    persons: list[RosterPerson] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class MemoryRoster:
    """A whole roster held in memory: test data, generated districts, the memory connector."""

    orgs: list[RosterOrg] = field(default_factory=list)
    persons: list[RosterPerson] = field(default_factory=list)
    classes: list[RosterClass] = field(default_factory=list)
    enrollments: list[RosterEnrollment] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    #: the academic sessions the memory connector reports (its ``academic_sessions``)
    sessions: list[AcademicSession] = field(default_factory=list)

    def records(self) -> list[RosterRecord]:
        return [*self.orgs, *self.persons, *self.classes, *self.enrollments, *self.rejected]

    def copy(self) -> MemoryRoster:
        return MemoryRoster(
            list(self.orgs),
            list(self.persons),
            list(self.classes),
            list(self.enrollments),
            list(self.rejected),
            list(self.sessions),
        )

    def replace_person(self, sourced_id: str, **changes: Any) -> None:
        self.persons = [
            replace(p, **changes) if p.sourced_id == sourced_id else p for p in self.persons
        ]
