"""A sourcedId the source sends more than once in a run: the last version sent wins, and
where the versions differ the run's report says so (rostersync.sync.staging.repeat_warnings),
whichever way the run met them: both staged (a first load, or both unlike the mirror), or one
as the mirror holds it and one otherwise (a full run that stages only what changed)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.store.db import Store
from rostersync.store.tables import roster_person
from tests.sync.helpers import sync, users

DAY = datetime(2026, 9, 1, tzinfo=UTC)


def _teacher(email: str = "t1@example.org", given: str = "Ada") -> RosterPerson:
    return RosterPerson("t1", "teacher", given, "Lovelace", email, date_last_modified=DAY)


def _school(persons: list[RosterPerson]) -> MemoryRoster:
    """Teacher t1 of class c1 with one student, and ``persons`` (the memory connector sends
    them in this order, in batches of 7) after ten students of no class."""
    padding = [
        RosterPerson(f"p{i}", "student", "Pad", str(i), f"p{i}@example.org", date_last_modified=DAY)
        for i in range(10)
    ]
    return MemoryRoster(
        persons=[
            RosterPerson("s1", "student", "Stu", "One", "s1@example.org", date_last_modified=DAY),
            *persons[:1],
            *padding,
            *persons[1:],
        ],
        classes=[RosterClass("c1", "Algebra I", date_last_modified=DAY)],
        enrollments=[
            RosterEnrollment("e1", "c1", "t1", "teacher", date_last_modified=DAY),
            RosterEnrollment("e2", "c1", "s1", "student", date_last_modified=DAY),
        ],
    )


def _repeat_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "more than once with different content" in w]


@pytest.mark.parametrize("near", [True, False], ids=["one batch", "two batches"])
async def test_a_person_sent_twice_differently_in_a_first_load_is_reported_and_the_last_wins(
    store: Store, make_settings: Callable[..., Settings], near: bool
) -> None:
    first, second = _teacher(), _teacher(email="grace@example.org", given="Grace")
    roster = _school([first, second])
    if near:  # side by side: one batch holds both
        roster.persons = [p for p in roster.persons if p.sourced_id != "t1"] + [first, second]
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded", report.error
    assert _repeat_warnings(report.warnings) == [
        "persons: the source sent 1 sourcedId more than once with different content (t1); "
        "the last version sent of each was kept"
    ]
    assert "grace@example.org" in users(store)
    assert "t1@example.org" not in users(store)


async def test_a_record_sent_twice_as_it_is_is_no_news(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    roster = _school([_teacher(), _teacher()])
    roster.classes.append(roster.classes[0])
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded", report.error
    assert _repeat_warnings(report.warnings) == []
    again = await sync(make_settings(), store, roster)  # a full run staging what changed
    assert again.status == "succeeded", again.error
    assert _repeat_warnings(again.warnings) == []
    assert set(users(store)) == {"t1@example.org"}


@pytest.mark.parametrize(
    "mirror_first", [True, False], ids=["as held, then new", "new, then as held"]
)
async def test_a_full_run_meeting_a_record_as_the_mirror_holds_it_and_otherwise_says_so(
    store: Store, make_settings: Callable[..., Settings], mirror_first: bool
) -> None:
    """After a first load, a full run leaves out of staging the records the mirror holds as
    they are; a second version of one of them, before or after it, is still reported, and
    the last one sent is what the mirror holds."""
    settings = make_settings()
    assert (await sync(settings, store, _school([_teacher()]))).status == "succeeded"
    held, other = _teacher(), _teacher(given="Augusta")
    order = [held, other] if mirror_first else [other, held]
    report = await sync(settings, store, _school(order))
    assert report.status == "succeeded", report.error
    assert len(_repeat_warnings(report.warnings)) == 1
    assert "(t1)" in _repeat_warnings(report.warnings)[0]
    with store.read() as conn:
        kept = conn.execute(
            select(roster_person.c.given_name).where(roster_person.c.sourced_id == "t1")
        ).scalar_one()
    assert kept == ("Augusta" if mirror_first else "Ada")


async def test_many_repeats_are_counted_and_a_few_named(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    roster = _school([_teacher()])
    students = [
        RosterPerson(f"x{i}", "student", "X", str(i), f"x{i}@example.org", date_last_modified=DAY)
        for i in range(8)
    ]
    roster.persons += students + [
        RosterPerson(p.sourced_id, "student", "Y", str(i), p.email, date_last_modified=DAY)
        for i, p in enumerate(students)
    ]
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded", report.error
    assert _repeat_warnings(report.warnings) == [
        "persons: the source sent 8 sourcedIds more than once with different content "
        "(x0, x1, x2, x3, x4 and 3 more); the last version sent of each was kept"
    ]
