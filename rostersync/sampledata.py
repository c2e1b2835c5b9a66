"""A deterministic synthetic school district, for the bundled sample, fake servers and benchmarks.

:func:`generate_district` turns a :class:`DistrictSpec` into a
:class:`~rostersync.source.records.MemoryRoster`; :func:`iter_district` yields the same records one by
one for callers that stream them. :func:`write_oneroster_csv` writes a roster as a OneRoster 1.1
bulk CSV drop (a folder and, optionally, a zip).

Determinism: the same spec always gives the same records, byte for byte once written. Every
random choice comes from :class:`random.Random` streams seeded from ``spec.seed`` (one stream
per kind of record, so streaming one kind never shifts another), nothing reads the clock, and
every record carries the fixed :data:`DATE_LAST_MODIFIED`.

Shape of a district:

* one district org ``org-district`` and ``spec.schools`` schools ``sch-001``, ``sch-002``, ...
  named "North High", "South Middle", "East Elementary", "West High", ...;
* ``spec.teachers`` teachers ``t-0001``... and ``spec.students`` students ``s-000001``...,
  dealt to the schools in turn (person *n* goes to school ``(n - 1) % schools``);
* ``spec.classes`` classes ``c-00001``..., dealt to the schools in turn, titled like
  "Algebra I (P3)"; each has one primary teacher from its school and ``students_per_class``
  distinct students drawn from its school (fewer if the school has fewer students);
* enrollments ``e-0000001``...; emails are lower-case ``first.last{n}@domain`` where *n* is a
  district-wide person number (teachers first, then students), so no two people share one.

With ``edge_cases`` (the default) these extra records are added, all in school ``sch-001``;
tests refer to them by the module constants named here:

==========================  =====================================================================
``EDGE_NO_CLASSES``         ``t-edge-noclasses``: a teacher with no classes
``EDGE_EMPTY_CLASSES``      ``t-edge-emptyclasses``: teaches ``EDGE_EMPTY_CLASS``
                            (``c-edge-empty``), which has no students
``EDGE_ONLY_DELETED``       ``t-edge-onlydeleted``: teaches ``EDGE_DELETED_CLASS``
                            (``c-edge-deleted``), whose student enrollments are all
                            ``tobedeleted``
``EDGE_NO_EMAIL``           ``t-edge-noemail``: classes and students but no email
``EDGE_UPPER_EMAIL``        ``t-edge-uppercase``: email ``Mixed.Case@<domain>`` (not lower-case)
``EDGE_DISABLED``           ``t-edge-disabled``: ``enabled=False`` but teaches students
``EDGE_COTEACH_CLASS``      ``c-edge-coteach``: taught by ``EDGE_COTEACH_PRIMARY``
                            (``t-edge-coprimary``, primary) and ``EDGE_COTEACHER``
                            (``t-edge-coteacher``, ``primary=False``; member of
                            ``sch-001`` and ``sch-002`` when there are two schools)
==========================  =====================================================================

Edge classes other than the empty one get :data:`EDGE_CLASS_STUDENTS` students of ``sch-001``.
Edge records are *in addition to* the spec's counts; their ids all contain ``-edge-``.
"""

from __future__ import annotations

import csv
import io
import random
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rostersync.source.records import (
    STUDENT,
    TEACHER,
    MemoryRoster,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    RosterRecord,
    Status,
)

#: Every generated record's dateLastModified: fixed so output never depends on the clock.
DATE_LAST_MODIFIED = datetime(2026, 9, 1, tzinfo=UTC)

DISTRICT_ID = "org-district"
EDGE_SCHOOL = "sch-001"
EDGE_NO_CLASSES = "t-edge-noclasses"
EDGE_EMPTY_CLASSES = "t-edge-emptyclasses"
EDGE_EMPTY_CLASS = "c-edge-empty"
EDGE_ONLY_DELETED = "t-edge-onlydeleted"
EDGE_DELETED_CLASS = "c-edge-deleted"
EDGE_NO_EMAIL = "t-edge-noemail"
EDGE_NO_EMAIL_CLASS = "c-edge-noemail"
EDGE_UPPER_EMAIL = "t-edge-uppercase"
EDGE_UPPER_EMAIL_CLASS = "c-edge-uppercase"
EDGE_DISABLED = "t-edge-disabled"
EDGE_DISABLED_CLASS = "c-edge-disabled"
EDGE_COTEACH_CLASS = "c-edge-coteach"
EDGE_COTEACH_PRIMARY = "t-edge-coprimary"
EDGE_COTEACHER = "t-edge-coteacher"
#: Students in each edge class that has students.
EDGE_CLASS_STUDENTS = 5

#: Teachers who should become console users (they teach active students, are enabled and
#: have an email), and those who should not.
EDGE_ELIGIBLE = (EDGE_UPPER_EMAIL, EDGE_COTEACH_PRIMARY, EDGE_COTEACHER)
EDGE_INELIGIBLE = (
    EDGE_NO_CLASSES,
    EDGE_EMPTY_CLASSES,
    EDGE_ONLY_DELETED,
    EDGE_NO_EMAIL,
    EDGE_DISABLED,
)

_DIRECTIONS = ("North", "South", "East", "West", "Central", "Lakeside", "Hillcrest", "Riverside")
_LEVELS = ("High", "Middle", "Elementary")
_SUBJECTS = {
    "High": (
        "Algebra I", "Geometry", "Algebra II", "Biology", "Chemistry", "Physics",
        "English 9", "English 10", "World History", "US History", "Spanish I",
        "French II", "Computer Science", "Art Studio", "AP Calculus",
    ),
    "Middle": (
        "Math 6", "Math 7", "Pre-Algebra", "Life Science", "Earth Science",
        "English 7", "English 8", "Social Studies", "Band", "Health",
    ),
    "Elementary": (
        "Kindergarten", "Grade 1", "Grade 2", "Grade 3", "Grade 4", "Grade 5",
        "Reading Group", "Music", "Library",
    ),
}  # fmt: skip


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# A few non-ASCII and punctuated names keep UTF-8 handling and email folding honest.
_GIVEN = _words(
    "Ada Alan Grace Maya Liam Olivia Noah Emma Ava Elijah Sophia Lucas Mia Mateo Amelia "
    "Ethan Harper Aiden Zoë José Chloé Priya Wei Fatima Omar Hana Kenji Ingrid Dmitri Aoife "
    "Siobhan Kwame Amara Diego Lucía Nikolai Yara Tomás Leila Sven"
)
_FAMILY = _words(
    "Smith Johnson Garcia Nguyễn Brown Patel Kim Martinez Lee Clark O'Brien Walker Hall "
    "Young Allen Müller Wright López Hill Scott Green Adams Baker Nelson Carter Mitchell "
    "Pérez Roberts Turner Phillips Campbell Parker Evans Edwards Collins Stewart Sánchez "
    "Morris Rogers Reed Cook Morgan Bell Murphy Bailey Rivera Cooper Richardson Cox Howard "
    "Ward Torres Peterson Gray Ramírez"
)


@dataclass(frozen=True)
class DistrictSpec:
    """How big a district to generate, and from which seed."""

    seed: int = 1
    schools: int = 3
    teachers: int = 40
    students: int = 1000
    classes: int = 100
    students_per_class: int = 25
    edge_cases: bool = True
    domain: str = "springfield.example.org"

    def __post_init__(self) -> None:
        if self.schools < 1:
            raise ValueError("a district needs at least one school")
        for name in ("teachers", "students", "classes", "students_per_class"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative")
        if self.classes and not self.teachers:
            raise ValueError("classes need at least one teacher")
        if self.edge_cases and not self.students:
            raise ValueError("edge cases need at least one student in sch-001")


def school_id(index: int) -> str:
    """The sourcedId of the school with 0-based `index`."""
    return f"sch-{index + 1:03d}"


def teacher_id(number: int) -> str:
    return f"t-{number:04d}"


def student_id(number: int) -> str:
    return f"s-{number:06d}"


def class_id(number: int) -> str:
    return f"c-{number:05d}"


def _school_name(index: int) -> tuple[str, str]:
    """Name and level: directions and levels cycle independently; later rounds get a number."""
    level = _LEVELS[index % len(_LEVELS)]
    name = f"{_DIRECTIONS[index % len(_DIRECTIONS)]} {level}"
    cycle = index // (len(_DIRECTIONS) * len(_LEVELS))
    return (f"{name} {cycle + 1}" if cycle else name), level


def _email_part(name: str) -> str:
    """ASCII-fold a name for an address: "Zoë" -> "zoe", "O'Brien" -> "obrien"."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _members(index: int, count: int, schools: int) -> range:
    """Numbers (1-based) of the people dealt to school `index` out of `count`."""
    return range(index + 1, count + 1, schools)


def iter_district(spec: DistrictSpec) -> Iterator[RosterRecord]:
    """Every record of the district, lazily: orgs, persons, classes, then enrollments."""
    yield from _orgs(spec)
    yield from _persons(spec)
    yield from _classes(spec)
    yield from _enrollments(spec)


def generate_district(spec: DistrictSpec) -> MemoryRoster:
    """The whole district as a :class:`MemoryRoster` (same spec, same roster)."""
    roster = MemoryRoster()
    roster.orgs.extend(_orgs(spec))
    roster.persons.extend(_persons(spec))
    roster.classes.extend(_classes(spec))
    roster.enrollments.extend(_enrollments(spec))
    return roster


def _orgs(spec: DistrictSpec) -> Iterator[RosterOrg]:
    town = spec.domain.split(".")[0].capitalize()
    yield RosterOrg(
        DISTRICT_ID,
        f"{town} Public Schools",
        type="district",
        identifier="DIST",
        date_last_modified=DATE_LAST_MODIFIED,
    )
    for index in range(spec.schools):
        name, _ = _school_name(index)
        yield RosterOrg(
            school_id(index),
            name,
            type="school",
            identifier="".join(word[0] for word in name.split()),
            parent_id=DISTRICT_ID,
            date_last_modified=DATE_LAST_MODIFIED,
        )


def _person(
    rng: random.Random, sourced_id: str, role: str, number: int, school: str, domain: str
) -> RosterPerson:
    given = rng.choice(_GIVEN)
    family = rng.choice(_FAMILY)
    email = f"{_email_part(given)}.{_email_part(family)}{number}@{domain}"
    return RosterPerson(
        sourced_id,
        role,
        given,
        family,
        email,
        email,
        org_ids=(school,),
        date_last_modified=DATE_LAST_MODIFIED,
    )


def _persons(spec: DistrictSpec) -> Iterator[RosterPerson]:
    rng = random.Random(f"{spec.seed}:persons")
    for n in range(1, spec.teachers + 1):
        school = school_id((n - 1) % spec.schools)
        yield _person(rng, teacher_id(n), TEACHER, n, school, spec.domain)
    if spec.edge_cases:
        yield from _edge_teachers(spec)
    for n in range(1, spec.students + 1):
        school = school_id((n - 1) % spec.schools)
        yield _person(rng, student_id(n), STUDENT, spec.teachers + n, school, spec.domain)


def _edge_teachers(spec: DistrictSpec) -> Iterator[RosterPerson]:
    domain = spec.domain

    def teacher(
        sourced_id: str,
        given: str,
        family: str,
        email: str | None,
        *,
        enabled: bool = True,
        orgs: tuple[str, ...] = (EDGE_SCHOOL,),
    ) -> RosterPerson:
        return RosterPerson(
            sourced_id,
            TEACHER,
            given,
            family,
            email,
            email or sourced_id,
            enabled=enabled,
            org_ids=orgs,
            date_last_modified=DATE_LAST_MODIFIED,
        )

    yield teacher(EDGE_NO_CLASSES, "Nora", "Noclasses", f"nora.noclasses@{domain}")
    yield teacher(EDGE_EMPTY_CLASSES, "Eli", "Emptyclass", f"eli.emptyclass@{domain}")
    yield teacher(EDGE_ONLY_DELETED, "Dana", "Deleted", f"dana.deleted@{domain}")
    yield teacher(EDGE_NO_EMAIL, "Nolan", "Noemail", None)
    yield teacher(EDGE_UPPER_EMAIL, "Mixed", "Case", f"Mixed.Case@{domain}")
    yield teacher(EDGE_DISABLED, "Dora", "Disabled", f"dora.disabled@{domain}", enabled=False)
    yield teacher(EDGE_COTEACH_PRIMARY, "Paula", "Primary", f"paula.primary@{domain}")
    # Two schools, so the CSV writer has to quote a comma-joined orgSourcedIds field.
    both = (EDGE_SCHOOL, school_id(1)) if spec.schools > 1 else (EDGE_SCHOOL,)
    yield teacher(EDGE_COTEACHER, "Colin", "Coteacher", f"colin.coteacher@{domain}", orgs=both)


def _class_teacher(spec: DistrictSpec, number: int) -> int:
    """The teacher number of class `number`: the school's teachers take its classes in turn."""
    index = (number - 1) % spec.schools
    nth_in_school = (number - 1) // spec.schools
    teachers = _members(index, spec.teachers, spec.schools)
    if teachers:
        return teachers[nth_in_school % len(teachers)]
    # More schools than teachers: borrow one from the whole district.
    return (number - 1) % spec.teachers + 1


def _classes(spec: DistrictSpec) -> Iterator[RosterClass]:
    rng = random.Random(f"{spec.seed}:classes")
    for n in range(1, spec.classes + 1):
        index = (n - 1) % spec.schools
        _, level = _school_name(index)
        subject = rng.choice(_SUBJECTS[level])
        period = rng.randint(1, 8)
        yield RosterClass(
            class_id(n),
            f"{subject} (P{period})",
            class_code=f"C{n:05d}",
            school_id=school_id(index),
            date_last_modified=DATE_LAST_MODIFIED,
        )
    if spec.edge_cases:
        for sourced_id, title in (
            (EDGE_EMPTY_CLASS, "Empty Study Hall (P8)"),
            (EDGE_DELETED_CLASS, "Dropped Elective (P7)"),
            (EDGE_NO_EMAIL_CLASS, "Unmailed Geometry (P6)"),
            (EDGE_UPPER_EMAIL_CLASS, "Case Studies (P5)"),
            (EDGE_DISABLED_CLASS, "Disabled Drama (P4)"),
            (EDGE_COTEACH_CLASS, "Team-Taught Biology (P2)"),
        ):
            yield RosterClass(
                sourced_id,
                title,
                class_code=sourced_id.upper(),
                school_id=EDGE_SCHOOL,
                date_last_modified=DATE_LAST_MODIFIED,
            )


def _enrollment(
    number: int, class_ref: str, user: str, role: str, *, primary: bool = False
) -> RosterEnrollment:
    return RosterEnrollment(
        f"e-{number:07d}",
        class_ref,
        user,
        role,
        primary=primary,
        date_last_modified=DATE_LAST_MODIFIED,
    )


def _enrollments(spec: DistrictSpec) -> Iterator[RosterEnrollment]:
    rng = random.Random(f"{spec.seed}:enrollments")
    school_students = [_members(i, spec.students, spec.schools) for i in range(spec.schools)]
    # One shared id string per student keeps a million enrollments from holding a million copies.
    student_ids = [""] + [student_id(n) for n in range(1, spec.students + 1)]
    counter = 0
    for n in range(1, spec.classes + 1):
        cid = class_id(n)
        counter += 1
        yield _enrollment(counter, cid, teacher_id(_class_teacher(spec, n)), TEACHER, primary=True)
        pool = school_students[(n - 1) % spec.schools]
        # Sorted so the CSV reads naturally; sampling from a range never materialises it.
        for s in sorted(rng.sample(pool, min(spec.students_per_class, len(pool)))):
            counter += 1
            yield _enrollment(counter, cid, student_ids[s], STUDENT)
    if spec.edge_cases:
        yield from _edge_enrollments(rng, school_students[0])


def _edge_enrollments(rng: random.Random, pool: Sequence[int]) -> Iterator[RosterEnrollment]:
    def students(class_ref: str, *, status: Status = "active") -> Iterable[RosterEnrollment]:
        picked = sorted(rng.sample(pool, min(EDGE_CLASS_STUDENTS, len(pool))))
        for s in picked:
            yield RosterEnrollment(
                f"e-edge-{class_ref.removeprefix('c-edge-')}-{student_id(s)}",
                class_ref,
                student_id(s),
                STUDENT,
                status=status,
                date_last_modified=DATE_LAST_MODIFIED,
            )

    def teaches(class_ref: str, teacher: str, *, primary: bool = True) -> RosterEnrollment:
        return RosterEnrollment(
            f"e-edge-{class_ref.removeprefix('c-edge-')}-{teacher}",
            class_ref,
            teacher,
            TEACHER,
            primary=primary,
            date_last_modified=DATE_LAST_MODIFIED,
        )

    yield teaches(EDGE_EMPTY_CLASS, EDGE_EMPTY_CLASSES)
    yield teaches(EDGE_DELETED_CLASS, EDGE_ONLY_DELETED)
    yield from students(EDGE_DELETED_CLASS, status="tobedeleted")
    for class_ref, teacher in (
        (EDGE_NO_EMAIL_CLASS, EDGE_NO_EMAIL),
        (EDGE_UPPER_EMAIL_CLASS, EDGE_UPPER_EMAIL),
        (EDGE_DISABLED_CLASS, EDGE_DISABLED),
    ):
        yield teaches(class_ref, teacher)
        yield from students(class_ref)
    yield teaches(EDGE_COTEACH_CLASS, EDGE_COTEACH_PRIMARY)
    yield teaches(EDGE_COTEACH_CLASS, EDGE_COTEACHER, primary=False)
    yield from students(EDGE_COTEACH_CLASS)


# ---------------------------------------------------------------------------------------------
# OneRoster 1.1 bulk CSV

ORGS_HEADER = ("sourcedId", "status", "dateLastModified", "name", "type", "identifier",
               "parentSourcedId")  # fmt: skip
USERS_HEADER = (
    "sourcedId", "status", "dateLastModified", "enabledUser", "orgSourcedIds", "role",
    "username", "userIds", "givenName", "familyName", "middleName", "identifier", "email",
    "sms", "phone", "agentSourcedIds", "grades", "password",
)  # fmt: skip
CLASSES_HEADER = (
    "sourcedId", "status", "dateLastModified", "title", "grades", "courseSourcedId",
    "classCode", "classType", "location", "schoolSourcedId", "termSourcedIds", "subjects",
    "subjectCodes", "periods",
)  # fmt: skip
ENROLLMENTS_HEADER = (
    "sourcedId", "status", "dateLastModified", "classSourcedId", "schoolSourcedId",
    "userSourcedId", "role", "primary", "beginDate", "endDate",
)  # fmt: skip

_MANIFEST = (
    ("manifest.version", "1.0"),
    ("oneroster.version", "1.1"),
    ("file.academicSessions", "absent"),
    ("file.categories", "absent"),
    ("file.classes", "bulk"),
    ("file.classResources", "absent"),
    ("file.courses", "absent"),
    ("file.courseResources", "absent"),
    ("file.demographics", "absent"),
    ("file.enrollments", "bulk"),
    ("file.lineItems", "absent"),
    ("file.orgs", "bulk"),
    ("file.resources", "absent"),
    ("file.results", "absent"),
    ("file.users", "bulk"),
    ("source.systemName", "rostersync"),
    ("source.systemCode", "sampledata"),
)
#: The files :func:`write_oneroster_csv` writes, in the order it writes them.
CSV_FILES = ("manifest.csv", "orgs.csv", "users.csv", "classes.csv", "enrollments.csv")


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _stamp(status: str, modified: datetime | None) -> tuple[str, str]:
    """Bulk files leave status and date blank, except to mark a record for deletion."""
    if status != "tobedeleted":
        return "", ""
    when = modified.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if modified else ""
    return status, when


def _csv_rows(roster: MemoryRoster, name: str) -> Iterator[Sequence[str]]:
    if name == "manifest.csv":
        yield ("propertyName", "value")
        yield from _MANIFEST
    elif name == "orgs.csv":
        yield ORGS_HEADER
        for o in roster.orgs:
            yield (o.sourced_id, *_stamp(o.status, o.date_last_modified), o.name, o.type,
                   o.identifier or "", o.parent_id or "")  # fmt: skip
    elif name == "users.csv":
        yield USERS_HEADER
        for p in roster.persons:
            yield (
                p.sourced_id, *_stamp(p.status, p.date_last_modified), _bool(p.enabled),
                ",".join(p.org_ids), p.role, p.username or "", "", p.given_name, p.family_name,
                "", "", p.email or "", "", "", "", "", "",
            )  # fmt: skip
    elif name == "classes.csv":
        yield CLASSES_HEADER
        for c in roster.classes:
            yield (
                c.sourced_id, *_stamp(c.status, c.date_last_modified), c.title, "", "",
                c.class_code or "", "scheduled", "", c.school_id or "", "", "", "", "",
            )  # fmt: skip
    elif name == "enrollments.csv":
        yield ENROLLMENTS_HEADER
        school_of = {c.sourced_id: c.school_id or "" for c in roster.classes}
        for e in roster.enrollments:
            yield (
                e.sourced_id, *_stamp(e.status, e.date_last_modified), e.class_id,
                school_of.get(e.class_id, ""), e.user_id, e.role, _bool(e.primary), "", "",
            )  # fmt: skip
    else:  # pragma: no cover - CSV_FILES is closed
        raise ValueError(name)


def write_oneroster_csv(
    roster: MemoryRoster, folder: Path, *, zip_path: Path | None = None
) -> None:
    """Write `roster` as OneRoster 1.1 bulk CSV files into `folder` (created if missing).

    With `zip_path`, also pack the same files at the root of a zip. Output is UTF-8 with ``\\n``
    line ends (no BOM) and stable bytes: zip entries carry a fixed timestamp.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in CSV_FILES:
        with open(folder / name, "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(_csv_rows(roster, name))
    if zip_path is not None:
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in CSV_FILES:
                info = zipfile.ZipInfo(name, date_time=(2026, 9, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with (
                    zf.open(info, "w") as raw,
                    io.TextIOWrapper(raw, encoding="utf-8", newline="") as text,
                ):
                    csv.writer(text, lineterminator="\n").writerows(_csv_rows(roster, name))


__all__ = [
    "CSV_FILES",
    "DATE_LAST_MODIFIED",
    "DISTRICT_ID",
    "EDGE_CLASS_STUDENTS",
    "EDGE_COTEACHER",
    "EDGE_COTEACH_CLASS",
    "EDGE_COTEACH_PRIMARY",
    "EDGE_DELETED_CLASS",
    "EDGE_DISABLED",
    "EDGE_DISABLED_CLASS",
    "EDGE_ELIGIBLE",
    "EDGE_EMPTY_CLASS",
    "EDGE_EMPTY_CLASSES",
    "EDGE_INELIGIBLE",
    "EDGE_NO_CLASSES",
    "EDGE_NO_EMAIL",
    "EDGE_NO_EMAIL_CLASS",
    "EDGE_ONLY_DELETED",
    "EDGE_SCHOOL",
    "EDGE_UPPER_EMAIL",
    "EDGE_UPPER_EMAIL_CLASS",
    "DistrictSpec",
    "generate_district",
    "iter_district",
    "write_oneroster_csv",
]
