"""The roster a memory source serves in the model test, and the values its steps draw.

Every change stamps the changed record with the next tick of a logical clock as its
``date_last_modified``, as a OneRoster server would, so a delta run (records newer than the
high-water mark) sees exactly what changed since the last applied run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from rostersync.source.records import (
    AcademicSession,
    MemoryRoster,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
)

EPOCH = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
#: Dates after every run's start (feed.Feed.date_ahead): the oracle leaves them out of a
#: run's newest date, as the engine does.
AHEAD = datetime(2100, 1, 1, tzinfo=UTC)

TEACHERS = ("t1", "t2", "t3", "t4", "t5", "t6")
STUDENTS = ("s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9")
PEOPLE = TEACHERS + STUDENTS
CLASSES = ("c1", "c2", "c3", "c4", "c5")
ORGS = {"sch-1": "Lincoln High", "sch-2": "Maple Middle"}
DOMAIN = "springfield.example.org"

#: The day the terms rules judge by, and the source's academic sessions around it.
TODAY = date(2026, 10, 1)
SESSIONS = (
    AcademicSession("past", "Spring 2026", "term", date(2026, 1, 5), date(2026, 6, 1)),
    AcademicSession("now", "Fall 2026", "term", date(2026, 8, 20), date(2026, 12, 20)),
    # Starts 9 days after TODAY: running with 14 grace days, not with none.
    AcademicSession("soon", "Autumn block", "term", date(2026, 10, 10), date(2026, 12, 1)),
    AcademicSession("next", "Spring 2027", "term", date(2027, 1, 5), date(2027, 6, 1)),
)
#: A class's terms as a step sets them: none, past, running, to come, mixed, unknown ("x").
TERM_SETS = ((), ("now",), ("past",), ("soon",), ("next",), ("past", "next"), ("x",), ("past", "x"))

GIVEN = ("Ada", "Alan", "Grace", "Zoë", "")
FAMILY = ("Lovelace", "Turing", "Hopper", "")
TITLES = ("Algebra I", "Computing", "Biology", "Art", "Study Hall")

#: Person roles the steps give: teachers, look-alikes of teachers, and the rest.
ROLES = ("teacher", "Teacher", "administrator", "aide", "student")

#: How a teacher's email is written, by name (rendered per person by :func:`teacher_email`).
#: Invalid values, look-alikes and other domains sit beside the ordinary forms.
EMAIL_KINDS = (
    "plain",
    "upper",
    "spaced",
    "subdomain",
    "other_domain",
    "n/a",
    "empty",
    "missing",
    "none",
    "blank",
    "no_tld",
    "kate",
    "kelvin_kate",
    "fullwidth_kate",
    "cyrillic_kate",
    "zero_width_inside",
    "zero_width_edge",
    "too_long",
)


def teacher_email(pid: str, kind: str) -> str | None:
    """A teacher's email address written the way ``kind`` names."""
    forms: dict[str, str | None] = {
        "plain": f"{pid}@{DOMAIN}",
        "upper": f"{pid.upper()}@Springfield.Example.ORG",
        "spaced": f"  {pid}@{DOMAIN}\t",
        "subdomain": f"{pid}@hs.{DOMAIN}",
        "other_domain": f"{pid}@other.example.net",
        "n/a": "N/A",
        "empty": "",
        "missing": None,
        "none": "none",
        "blank": "   ",
        "no_tld": f"{pid}@springfield",
        # Shared by whoever draws it: the Kelvin sign and full-width k fold to "k" (NFKC), a
        # Cyrillic a (U+0430) does not and is no address.
        "kate": f"kate@{DOMAIN}",
        "kelvin_kate": f"\u212aate@{DOMAIN}",
        "fullwidth_kate": f"\uff4bate@{DOMAIN}",
        "cyrillic_kate": f"k\u0430te@{DOMAIN}",
        "zero_width_inside": f"{pid}\u200b@{DOMAIN}",
        "zero_width_edge": f"\u200b{pid}@{DOMAIN}",
        "too_long": f"{pid}{'x' * 250}@{DOMAIN}",
    }
    return forms[kind]


STUDENT_EMAIL_KINDS = ("plain", "accented", "spaced", "missing", "empty")


def student_email(pid: str, kind: str) -> str | None:
    forms: dict[str, str | None] = {
        "plain": f"{pid}@students.{DOMAIN}",
        "accented": f"ÉLÈVE.{pid.upper()}@Students.Example.ORG",
        "spaced": f" {pid}@students.{DOMAIN} ",
        "missing": None,
        "empty": "",
    }
    return forms[kind]


#: The connector's entity name of each kind, in its rejections.
ENTITY = {"org": "org", "person": "user", "class": "class", "enrollment": "enrollment"}


@dataclass
class Feed:
    """The source's current roster, keyed by kind and sourced id, in insertion order."""

    orgs: dict[str, RosterOrg] = field(default_factory=dict)
    persons: dict[str, RosterPerson] = field(default_factory=dict)
    classes: dict[str, RosterClass] = field(default_factory=dict)
    enrollments: dict[str, RosterEnrollment] = field(default_factory=dict)
    #: records the connector reports as rejected, by (kind, sourced id): the record held back
    rejected: dict[tuple[str, str], Any] = field(default_factory=dict)
    clock: int = 0
    next_enrollment: int = 0
    #: the feed before the last "empty" or "shrink" step, for "restore"
    saved: Feed | None = None
    #: (kind, sourced id) of the persons and classes the source also sends as a decoy: a copy
    #: of other content just before the real record (a server paging through data that
    #: changes as it is read), which the last version sent must beat
    decoys: set[tuple[str, str]] = field(default_factory=set)

    def tick(self) -> datetime:
        self.clock += 1
        return EPOCH + timedelta(seconds=self.clock)

    def table(self, kind: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "org": self.orgs,
            "person": self.persons,
            "class": self.classes,
            "enrollment": self.enrollments,
        }
        return tables[kind]

    def put(self, kind: str, record: Any) -> None:
        """Add or change a record (stamped now). A rejected record stays rejected, changed."""
        record = replace(record, date_last_modified=self.tick())
        key = (kind, record.sourced_id)
        if key in self.rejected:
            self.rejected[key] = record
        else:
            self.table(kind)[record.sourced_id] = record

    def date_ahead(self, kind: str, sid: str) -> None:
        """The record as it is, dated in the future (after every run's start)."""
        self.clock += 1
        record = self.table(kind)[sid]
        self.table(kind)[sid] = replace(
            record, date_last_modified=AHEAD + timedelta(seconds=self.clock)
        )

    def get(self, kind: str, sid: str) -> Any:
        return self.table(kind).get(sid)

    def change(self, kind: str, sid: str, **changes: Any) -> bool:
        current = self.get(kind, sid)
        if current is None:
            return False
        self.put(kind, replace(current, **changes))
        return True

    def drop(self, kind: str, sid: str) -> None:
        self.table(kind).pop(sid, None)

    def new_enrollment(self, class_id: str, user_id: str, role: str) -> None:
        self.next_enrollment += 1
        self.put(
            "enrollment", RosterEnrollment(f"e{self.next_enrollment}", class_id, user_id, role)
        )

    def reject(self, kind: str, sid: str) -> bool:
        record = self.table(kind).pop(sid, None)
        if record is None:
            return False
        self.rejected[(kind, sid)] = record
        return True

    def unreject(self, key: tuple[str, str]) -> None:
        record = self.rejected.pop(key)
        self.put(key[0], record)

    def snapshot(self) -> Feed:
        return Feed(
            dict(self.orgs),
            dict(self.persons),
            dict(self.classes),
            dict(self.enrollments),
            dict(self.rejected),
        )

    def revert(self, earlier: Feed, *, exact: bool = False) -> None:
        """Back to an earlier snapshot's records: those changed since are sent again as they
        were (stamped now, as a source that undoes a change would; ``exact``: with their
        dates, the very records sent before), those added go."""
        for kind in ("org", "person", "class", "enrollment"):
            then, now = earlier.table(kind), self.table(kind)
            for sid in [sid for sid in now if sid not in then]:
                self.drop(kind, sid)
            for sid, record in then.items():
                if now.get(sid) != record:
                    now[sid] = record if exact else replace(record, date_last_modified=self.tick())
        self.rejected = dict(earlier.rejected)

    def records(self, *, decoys: bool = True) -> list[RosterRecord]:
        """In the memory connector's order: orgs, persons, classes, enrollments, rejections;
        the decoys of persons and classes first among their kind (``decoys``)."""
        return [
            *self.orgs.values(),
            *(self.decoyed("person") if decoys else ()),
            *self.persons.values(),
            *(self.decoyed("class") if decoys else ()),
            *self.classes.values(),
            *self.enrollments.values(),
            *(
                Rejected(ENTITY[kind], sid, f"{ENTITY[kind]} {sid} does not parse (model)")
                for kind, sid in self.rejected
            ),
        ]

    def decoyed(self, kind: str) -> list[RosterRecord]:
        """The decoys of this kind's records the feed holds: a person of another name and
        email, a class of another title, each dated as its real record (a delta run sends
        both or neither)."""
        out: list[RosterRecord] = []
        for k, sid in sorted(self.decoys):
            record = self.table(kind).get(sid) if k == kind else None
            if isinstance(record, RosterPerson):
                out.append(replace(record, given_name="Decoy", email=f"decoy.{sid}@{DOMAIN}"))
            elif isinstance(record, RosterClass):
                out.append(replace(record, title=f"Decoy of {record.title}"))
        return out

    def roster(self) -> MemoryRoster:
        """The roster as a live answer reads it (no decoys)."""
        records = self.records(decoys=False)
        return MemoryRoster(
            orgs=[r for r in records if isinstance(r, RosterOrg)],
            persons=[r for r in records if isinstance(r, RosterPerson)],
            classes=[r for r in records if isinstance(r, RosterClass)],
            enrollments=[r for r in records if isinstance(r, RosterEnrollment)],
            rejected=[r for r in records if isinstance(r, Rejected)],
            sessions=list(SESSIONS),
        )
