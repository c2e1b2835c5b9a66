"""The canonical small roster every connector's contract tests serve in its own format (see
:mod:`rostersync.source.testing`).

Sources differ in shape, not in meaning: a connector that reads this roster from CSV files, a
OneRoster server or Google Classroom must yield the same people, classes and enrollments.
"""

from __future__ import annotations

from rostersync.source.records import (
    MemoryRoster,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
)


def small_roster() -> MemoryRoster:
    """Two schools, three teachers (one co-teaching), two populated classes, one empty class."""
    orgs = [
        RosterOrg("org-d", "Springfield District", type="district"),
        RosterOrg("sch-1", "North High", parent_id="org-d", identifier="NH"),
        RosterOrg("sch-2", "South Middle", parent_id="org-d", identifier="SM"),
    ]
    persons = [
        RosterPerson(
            "t-1", "teacher", "Ada", "Lovelace", "ada@example.org", "ada", org_ids=("sch-1",)
        ),
        RosterPerson(
            "t-2",
            "teacher",
            "Alan",
            "Turing",
            "Alan.Turing@Example.org",
            "alan",
            org_ids=("sch-1",),
        ),
        RosterPerson(
            "t-3", "teacher", "Grace", "Hopper", "grace@example.org", "grace", org_ids=("sch-2",)
        ),
        *[
            RosterPerson(
                f"s-{i}",
                "student",
                f"Stu{i}",
                "Dent",
                f"s{i}@example.org",
                f"s{i}",
                org_ids=("sch-1",),
            )
            for i in range(1, 6)
        ],
    ]
    classes = [
        RosterClass("c-1", "Algebra I", class_code="ALG1", school_id="sch-1"),
        RosterClass("c-2", "Computing", class_code="CS1", school_id="sch-1"),
        RosterClass("c-3", "Empty Study Hall", class_code="SH", school_id="sch-2"),
    ]
    enrollments = [
        RosterEnrollment("e-t1c1", "c-1", "t-1", "teacher", primary=True),
        RosterEnrollment("e-t2c2", "c-2", "t-2", "teacher", primary=True),
        RosterEnrollment("e-t1c2", "c-2", "t-1", "teacher"),
        RosterEnrollment("e-t3c3", "c-3", "t-3", "teacher", primary=True),
        *[RosterEnrollment(f"e-s{i}c1", "c-1", f"s-{i}", "student") for i in range(1, 4)],
        *[RosterEnrollment(f"e-s{i}c2", "c-2", f"s-{i}", "student") for i in range(3, 6)],
    ]
    return MemoryRoster(orgs=orgs, persons=persons, classes=classes, enrollments=enrollments)
