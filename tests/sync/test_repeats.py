"""A sourcedId the source sends more than once in a run (rostersync.sync.repeats): the last
version sent wins; where the versions differ the run's report says so, whichever way the run
met them (both staged: a first load, or both unlike the mirror; or one as the mirror holds it
and one otherwise: a full run that stages only what changed); and a full run of a source read
at offsets is held before it removes what it did not see."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from rostersync.config.models import Settings
from rostersync.config.source import SourceSafety
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.store.tables import roster_person
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import RunReport, load_report
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
    assert report.fetched["persons"] == 13
    assert report.fetched["persons_repeated"] == 1


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


class _Paging(MemoryConnector):
    """A memory source read as a OneRoster server is: at offsets, so records can move."""

    pages_may_shift = True


async def _sync_paged(settings: Settings, store: Store, roster: MemoryRoster) -> RunReport:
    engine = SyncEngine(settings, store, connectors={"mem": _Paging(roster, batch_size=7)})
    report = await engine.sync("mem")
    await engine.drain()
    with store.read() as conn:
        return load_report(conn, report.id)


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "not paged"])
async def test_a_full_run_that_got_a_record_twice_is_held_before_removing_what_it_did_not_see(
    store: Store, make_settings: Callable[..., Settings], paged: bool
) -> None:
    """A source read at offsets that sends a record twice (the same, here) moved its records
    under the run, so the person it did not send may only have been skipped: a full run that
    would remove them is held, and its approval removes them. A source that does not page so
    (a CSV drop, a connector without ``pages_may_shift``) is taken at its word."""
    settings = make_settings()
    gone = RosterPerson("s2", "student", "Stu", "Two", "s2@example.org", date_last_modified=DAY)
    first = _school([_teacher(), gone])
    assert (await sync(settings, store, first)).status == "succeeded"
    twice = _school([_teacher(), _teacher()])  # s2 skipped, t1 sent twice
    if not paged:
        report = await sync(settings, store, twice)
        assert report.status == "succeeded", report.error
        return
    held = await _sync_paged(settings, store, twice)
    assert held.status == "held", held.error
    assert held.hold_reason == (
        "persons: the source sent 1 sourcedId more than once (t1): its records moved while the "
        "run paged through them, so the 1 person it did not see may only have been skipped; "
        "run it again, or approve the run to remove them"
    )
    with store.read() as conn:
        kept = conn.execute(select(roster_person.c.sourced_id)).scalars().all()
    assert "s2" in kept
    # Sent once each, nothing to remove: applied, not held.
    again = await _sync_paged(settings, store, _school([_teacher(), gone]))
    assert again.status == "succeeded", again.hold_reason
    # Sent twice, but nothing of the kind to remove: applied.
    same = await _sync_paged(settings, store, _school([_teacher(), gone, _teacher()]))
    assert same.status == "succeeded", same.hold_reason
    held = await _sync_paged(settings, store, twice)
    assert held.status == "held"
    engine = SyncEngine(settings, store, connectors={"mem": _Paging(twice)})
    approved = await engine.approve(held.id)
    assert approved.status == "succeeded", approved.error
    # The approval keeps the copies the held run counted (its own staging may show fewer).
    assert held.fetched["persons_repeated"] == approved.fetched["persons_repeated"] == 1
    with store.read() as conn:
        kept = conn.execute(select(roster_person.c.sourced_id)).scalars().all()
    assert "s2" not in kept


@pytest.mark.parametrize("where", ["top level", "the source"])
async def test_hold_on_repeats_false_lets_such_a_run_remove_what_it_did_not_see(
    store: Store, make_settings: Callable[..., Settings], where: str
) -> None:
    """For a server that repeats ids of its own accord: ``safety.hold_on_repeats: false``, at
    the top level or the source's own ``safety``, takes its runs at their word."""
    off = {"hold_on_repeats": False}
    settings = make_settings(
        **({"safety": off} if where == "top level" else {}),
    )
    if where == "the source":
        sources = dict(settings.sources)
        sources["mem"] = sources["mem"].model_copy(
            update={"safety": SourceSafety.model_validate(off)}
        )
        settings = settings.model_copy(update={"sources": sources})
    gone = RosterPerson("s2", "student", "Stu", "Two", "s2@example.org", date_last_modified=DAY)
    assert (await sync(settings, store, _school([_teacher(), gone]))).status == "succeeded"
    report = await _sync_paged(settings, store, _school([_teacher(), _teacher()]))
    assert report.status == "succeeded", report.hold_reason
    with store.read() as conn:
        kept = conn.execute(select(roster_person.c.sourced_id)).scalars().all()
    assert "s2" not in kept


def _students(n: int) -> list[RosterPerson]:
    return [
        RosterPerson(f"x{i}", "student", "X", str(i), f"x{i}@example.org", date_last_modified=DAY)
        for i in range(n)
    ]


@pytest.mark.parametrize("after_a_first_load", [False, True], ids=["first load", "full run"])
async def test_the_copies_of_records_sent_more_than_once_are_counted_with_the_fetched_records(
    store: Store, make_settings: Callable[..., Settings], after_a_first_load: bool
) -> None:
    """The run's fetched counts hold every record sent and, as ``persons_repeated``, how many
    of them were copies (a person sent three times is two), whether the copies were staged or
    met as the mirror holds them."""
    settings = make_settings()
    if after_a_first_load:
        assert (await sync(settings, store, _school([_teacher()]))).status == "succeeded"
    roster = _school([_teacher()])
    pad, x = roster.persons[2], _students(2)
    assert pad.sourced_id == "p0"
    # p0 three times (the mirror holds it after a first load), x0 three times, x1 twice
    roster.persons += [pad, x[0], x[1], pad, x[0], x[0], x[1]]
    report = await sync(settings, store, roster)
    assert report.status == "succeeded", report.error
    assert report.fetched["persons"] == 12 + 7
    assert report.fetched["persons_repeated"] == 5
    assert "classes_repeated" not in report.fetched


async def test_min_source_ratio_compares_records_not_the_times_they_were_sent(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A source that sent every person twice last time and once now has not shrunk; one that
    lost most of its persons and sends each of the rest twice has, and is held."""
    settings = make_settings()
    whole = _school([_teacher()])
    whole.persons += _students(20)
    twice = MemoryRoster(
        persons=whole.persons * 2, classes=whole.classes, enrollments=whole.enrollments
    )
    first = await sync(settings, store, twice)
    assert first.status == "succeeded", first.error
    assert first.fetched["persons_repeated"] == 32
    once = await sync(settings, store, whole)
    assert once.status == "succeeded", once.hold_reason
    shrunk = _school([_teacher()])
    shrunk.persons = shrunk.persons * 2  # 12 persons, 24 sent
    held = await sync(settings, store, shrunk)
    assert held.status == "held"
    assert held.hold_reason is not None
    assert "a shrunken source: 12 persons against 32 in the last successful run" in (
        held.hold_reason
    )
