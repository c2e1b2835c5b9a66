"""The benchmark's district with GUID sourcedIds (``--ids guid``) is the same district."""

from __future__ import annotations

import re
from collections import Counter

from tests.benchmarks.bench_oneroster import SCALES, aged_roster, guid

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_guid_ids_keep_every_reference_and_nothing_else_changes() -> None:
    serial = aged_roster(SCALES["S"], seed=3)
    guids = aged_roster(SCALES["S"], seed=3, ids="guid")
    persons = {p.sourced_id for p in guids.persons}
    classes = {c.sourced_id for c in guids.classes}
    orgs = {o.sourced_id for o in guids.orgs}
    assert all(GUID.match(i) for i in persons | classes | orgs)
    assert len(persons) == len(serial.persons) and len(classes) == len(serial.classes)
    # Every reference points at a record of the district, as before.
    assert all(e.class_id in classes and e.user_id in persons for e in guids.enrollments)
    assert all(c.school_id in orgs for c in guids.classes if c.school_id)
    assert all(set(p.org_ids) <= orgs for p in guids.persons)
    # Same records otherwise: names, roles, emails, dates, and enrollments per class.
    for before, after in zip(serial.persons, guids.persons, strict=True):
        assert after.sourced_id == guid(before.sourced_id)
        assert (after.given_name, after.email, after.role, after.date_last_modified) == (
            before.given_name,
            before.email,
            before.role,
            before.date_last_modified,
        )
    per_class = Counter(guid(e.class_id) for e in serial.enrollments)
    assert Counter(e.class_id for e in guids.enrollments) == per_class
