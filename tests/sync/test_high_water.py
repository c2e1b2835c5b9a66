"""The delta high-water mark leaves out dates after the run that set it began
(rostersync.sync.runs.trusted_newest): a record dated in the future (year 9999, a source's
clock ahead) would otherwise become the mark, and every delta run after it would ask for the
changes since then and get none. The mark stays the newest of the other dates, on the
source's own clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.rows import StagedBatch, person_tuple
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store, as_utc, utcnow
from rostersync.sync import runs
from rostersync.sync.engine import SyncEngine
from rostersync.sync.fetch import Ahead
from rostersync.sync.runs import RunReport, load_report, source_state

DAY = datetime(2026, 9, 1, tzinfo=UTC)
FAR = datetime(9999, 12, 31, tzinfo=UTC)


def _school(teacher_dated: datetime = DAY) -> MemoryRoster:
    return MemoryRoster(
        persons=[
            RosterPerson("t1", "teacher", "Ada", "Lovelace", "t1@example.org", date_last_modified=teacher_dated),
            RosterPerson("s1", "student", "Stu", "One", "s1@example.org", date_last_modified=DAY),
        ],
        classes=[RosterClass("c1", "Algebra I", date_last_modified=DAY)],
        enrollments=[
            RosterEnrollment("e1", "c1", "t1", "teacher", date_last_modified=DAY),
            RosterEnrollment("e2", "c1", "s1", "student", date_last_modified=DAY),
        ],
    )  # fmt: skip


async def _run(settings: Settings, store: Store, roster: MemoryRoster, mode: str) -> RunReport:
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster, delta=True)})
    report = await engine.sync("mem", mode=mode)
    await engine.drain()
    with store.read() as conn:
        return load_report(conn, report.id)


def _mark(store: Store) -> datetime | None:
    with store.read() as conn:
        state = source_state(conn, "mem")
    assert state is not None
    return as_utc(state["high_water_mark"])


async def test_a_record_dated_in_the_future_does_not_stop_the_delta_runs_after_it(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings, roster = make_settings(), _school(teacher_dated=FAR)
    first = await _run(settings, store, roster, "full")
    assert first.status == "succeeded", first.error
    assert first.warnings == [
        "the source sent records dated after this run began (the newest 9999-12-31 00:00 "
        "UTC; person t1): a bad date, or the source's clock ahead of this machine's; they are "
        "left out of the point the next delta run asks for changes since"
    ]
    assert _mark(store) == DAY  # the newest of the other records' dates
    # A change made after that run reaches the next delta run.
    roster.persons[0] = replace(
        roster.persons[0],
        email="ada@example.org",
        date_last_modified=utcnow() + timedelta(seconds=1),
    )
    delta = await _run(settings, store, roster, "delta")
    assert delta.mode == "delta" and delta.status == "succeeded", delta.error
    assert delta.fetched["persons"] == 1  # with 9999 as the mark: 0, asked for since then


async def test_a_source_clock_a_little_ahead_is_left_out_without_a_word(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    ahead = utcnow() + timedelta(minutes=10)
    report = await _run(make_settings(), store, _school(teacher_dated=ahead), "full")
    assert report.warnings == []
    assert _mark(store) == DAY


async def test_a_mark_kept_in_the_future_before_turns_a_delta_run_full_and_is_replaced(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings, roster = make_settings(), _school()
    await _run(settings, store, roster, "full")
    with store.write() as conn:  # what an earlier version stored for a record dated 9999
        runs.save_source_state(conn, "mem", {"high_water_mark": FAR}, new=False)
    report = await _run(settings, store, roster, "delta")
    assert report.mode == "full" and report.status == "succeeded", report.error
    assert report.warnings == [
        "the delta high-water mark (9999-12-31 00:00 UTC, a record's date) lies in the "
        "future: running full"
    ]
    assert _mark(store) == DAY
    again = await _run(settings, store, roster, "delta")
    assert again.mode == "delta" and again.warnings == []


def test_ahead_keeps_the_newest_date_before_the_start_and_names_five_after_it() -> None:
    """rostersync.sync.fetch.Ahead on staging rows: dates as UTC text, some None."""
    began = datetime(2026, 12, 1, tzinfo=UTC)
    people = [
        person_tuple(RosterPerson(f"p{i}", "student", "A", "B", None, date_last_modified=FAR))
        for i in range(7)
    ] + [
        person_tuple(RosterPerson("old", "student", "A", "B", None, date_last_modified=DAY)),
        person_tuple(RosterPerson("undated", "student", "A", "B", None)),
    ]
    batch = StagedBatch(newest=FAR)
    batch.rows["person"] = people
    ahead = Ahead(began)
    assert ahead.newest_in(batch) == DAY
    assert ahead.ids == [f"person p{i}" for i in range(5)]
    assert ahead.warnings() == [
        "the source sent records dated after this run began (the newest 9999-12-31 00:00 UTC; "
        "person p0, person p1, person p2, person p3, person p4): a bad date, or the source's "
        "clock ahead of this machine's; they are left out of the point the next delta run "
        "asks for changes since"
    ]
    plain = StagedBatch(newest=DAY)
    assert Ahead(began).newest_in(plain) == DAY and Ahead(None).newest_in(batch) == FAR
