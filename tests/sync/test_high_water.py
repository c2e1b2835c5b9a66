"""The delta high-water mark never lies after the run that set it began
(rostersync.sync.runs.trusted_newest): a record dated in the future (year 9999, a source's
clock ahead) would otherwise become the mark, and every delta run after it would ask for the
changes since then and get none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store, as_utc, utcnow
from rostersync.sync import runs
from rostersync.sync.engine import SyncEngine
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
    before = utcnow()
    first = await _run(settings, store, roster, "full")
    assert first.status == "succeeded", first.error
    assert [w for w in first.warnings if "after this run began" in w] == [
        "the source sent a record dated 9999-12-31 00:00 UTC, after this run began: the next "
        "delta run asks for changes since the run's start instead (a bad date, or the "
        "source's clock ahead of this machine's)"
    ]
    mark = _mark(store)
    assert mark is not None and before <= mark <= utcnow()
    # A change made after that run reaches the next delta run.
    roster.persons[0] = replace(
        roster.persons[0],
        email="ada@example.org",
        date_last_modified=utcnow() + timedelta(seconds=1),
    )
    delta = await _run(settings, store, roster, "delta")
    assert delta.mode == "delta" and delta.status == "succeeded", delta.error
    assert delta.fetched["persons"] == 1  # without the cap: 0, asked for since 9999


async def test_a_source_clock_a_little_ahead_is_capped_without_a_word(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    ahead = utcnow() + timedelta(minutes=10)
    report = await _run(make_settings(), store, _school(teacher_dated=ahead), "full")
    assert report.warnings == []
    mark = _mark(store)
    assert mark is not None and mark < ahead


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
