"""Enrollments naming a person or class the source did not send (rostersync.sync.dangling):
kept, counted for no group, and named in the report of the run that wrote them or removed
what they name; a run that changes none of them says nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.store.tables import roster_enrollment
from rostersync.sync import dangling
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import load_report
from tests.sync.helpers import groups, sync

DAY = datetime(2026, 9, 1, tzinfo=UTC)


@pytest.fixture(autouse=True, params=["by enrollment", "by reference"])
def _way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test both ways a run finds them: each written enrollment checked, or (past
    dangling.WHOLE_SOURCE_MIN written) the ids all of the source's enrollments name."""
    if request.param == "by reference":
        monkeypatch.setattr(dangling, "WHOLE_SOURCE_MIN", 0)


def _dangling(warnings: list[str]) -> list[str]:
    return [w for w in warnings if w.startswith("enrollments: ")]


def _school() -> MemoryRoster:
    """Teacher t1 of class c1 with student s1; e3 names a person, e4 a class, neither sent."""
    return MemoryRoster(
        persons=[
            RosterPerson(
                "t1", "teacher", "Ada", "Lovelace", "t1@example.org", date_last_modified=DAY
            ),
            RosterPerson("s1", "student", "Stu", "One", "s1@example.org", date_last_modified=DAY),
        ],
        classes=[RosterClass("c1", "Algebra I", date_last_modified=DAY)],
        enrollments=[
            RosterEnrollment("e1", "c1", "t1", "teacher", date_last_modified=DAY),
            RosterEnrollment("e2", "c1", "s1", "student", date_last_modified=DAY),
            RosterEnrollment("e3", "c1", "ghost", "student", date_last_modified=DAY),
            RosterEnrollment("e4", "c9", "t1", "teacher", date_last_modified=DAY),
        ],
    )


def _enrollments(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(roster_enrollment)).scalar_one())


async def test_a_first_load_names_the_enrollments_whose_person_or_class_was_not_sent(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    report = await sync(make_settings(), store, _school())
    assert report.status == "succeeded", report.error
    assert _dangling(report.warnings) == [
        "enrollments: 1 names a person the source has not sent, or sent and had rejected "
        "(e3 -> ghost); 1 names a class the source has not sent, or sent and had rejected "
        "(e4 -> c9); they are kept, and give no group an owner or member until that person "
        "or class arrives"
    ]
    assert _enrollments(store) == 4  # kept as sent
    assert groups(store)["c1"]["owners"] == ["t1@example.org"]
    assert [m["sourced_id"] for m in groups(store)["c1"]["members"]] == ["s1"]
    assert set(groups(store)) == {"c1"}


async def test_a_run_that_changes_none_of_them_says_nothing_and_one_that_does_says_it_again(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings, roster = make_settings(), _school()
    await sync(settings, store, roster)
    again = await sync(settings, store, roster)
    assert again.status == "succeeded", again.error
    assert _dangling(again.warnings) == []
    roster.enrollments[2] = replace(roster.enrollments[2], role="aide")  # e3 changed
    changed = await sync(settings, store, roster)
    assert _dangling(changed.warnings) == [
        "enrollments: 1 names a person the source has not sent, or sent and had rejected "
        "(e3 -> ghost); they are kept, and give no group an owner or member until that "
        "person or class arrives"
    ]


async def test_a_person_or_class_removed_while_its_enrollments_stay_is_named(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings, roster = make_settings(), _school()
    roster.enrollments = roster.enrollments[:2]
    roster.persons.append(replace(roster.persons[1], sourced_id="s2", email="s2@example.org"))
    roster.enrollments.append(RosterEnrollment("e6", "c1", "s2", "student", date_last_modified=DAY))
    await sync(settings, store, roster)
    roster.persons = [p for p in roster.persons if p.sourced_id != "s1"]  # e2 still sent
    report = await sync(settings, store, roster)
    assert report.status == "succeeded", report.error
    assert _dangling(report.warnings) == [
        "enrollments: 1 names a person the source has not sent, or sent and had rejected "
        "(e2 -> s1); they are kept, and give no group an owner or member until that person "
        "or class arrives"
    ]
    assert [m["sourced_id"] for m in groups(store)["c1"]["members"]] == ["s2"]
    roster.classes = []  # the class goes; its enrollments stay
    gone = await sync(settings, store, roster)
    assert _dangling(gone.warnings) == [
        "enrollments: 1 names a person the source has not sent, or sent and had rejected "
        "(e2 -> s1); 3 name a class the source has not sent, or sent and had rejected "
        "(e1 -> c1, e2 -> c1, e6 -> c1); they are kept, and give no group an owner or member until "
        "that person or class arrives"
    ]


async def test_a_delta_run_and_a_dry_run_name_what_they_write(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings, roster = make_settings(), _school()
    roster.enrollments = roster.enrollments[:2]
    await sync(settings, store, roster)
    later = DAY + timedelta(days=1)
    roster.enrollments.append(
        RosterEnrollment("e5", "c7", "s1", "student", date_last_modified=later)
    )
    dry = await sync(settings, store, roster, dry_run=True)
    assert "(e5 -> c7)" in _dangling(dry.warnings)[0]
    assert _enrollments(store) == 2  # a dry run changes nothing
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster, delta=True)})
    report = await engine.sync("mem", mode="delta")
    with store.read() as conn:
        delta = load_report(conn, report.id)
    assert delta.mode == "delta" and delta.status == "succeeded", delta.error
    assert _dangling(delta.warnings) == [
        "enrollments: 1 names a class the source has not sent, or sent and had rejected "
        "(e5 -> c7); they are kept, and give no group an owner or member until that person "
        "or class arrives"
    ]


async def test_many_are_counted_and_five_shown(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    roster = _school()
    roster.enrollments = roster.enrollments[:2] + [
        RosterEnrollment(f"x{i}", "c1", f"nobody{i}", "student", date_last_modified=DAY)
        for i in range(8)
    ]
    report = await sync(make_settings(), store, roster)
    (warning,) = _dangling(report.warnings)
    assert warning.startswith(
        "enrollments: 8 name a person the source has not sent, or sent and had rejected "
        "(x0 -> nobody0, x1 -> nobody1, x2 -> nobody2, x3 -> nobody3, x4 -> nobody4 and 3 more)"
    )
