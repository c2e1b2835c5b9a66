"""The sync engine end to end on a memory source, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, text

from connectors.memory import MemoryConnector
from rostersync.config.models import Settings
from rostersync.errors import RunStateError
from rostersync.records import MemoryRoster, Rejected, RosterEnrollment, RosterPerson
from rostersync.resync import worker as worker_module
from rostersync.resync.queue import queue_resync
from rostersync.rows import StagedBatch, sort_batch
from rostersync.store.db import Store
from rostersync.sync import detect, mirror, provisioning
from rostersync.sync import merge as merging
from rostersync.sync import runs as runs_module
from rostersync.sync.engine import SyncEngine
from rostersync.sync.staging import stage
from tests.rosterdata import small_roster
from tests.sync.helpers import add_user, groups, snapshot, sync, user_id, users

ZERO = {
    "users_created": 0,
    "users_linked": 0,
    "users_archived": 0,
    "users_skipped_license": 0,
    "groups_created": 0,
    "groups_updated": 0,
    "groups_removed": 0,
    "resync_queued": 0,
}


def counts(report: object) -> dict[str, int]:
    return {k: v for k, v in report.counts.items() if k in ZERO}  # type: ignore[attr-defined]


async def test_first_sync_creates_eligible_teachers_with_role_site_and_groups(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Teachers of populated classes get a user (email lower-cased), default role and site, and groups."""
    report = await sync(make_settings(), store, small_roster())
    assert report.status == "succeeded"
    assert set(users(store)) == {"ada@example.org", "alan.turing@example.org"}
    ada = users(store)["ada@example.org"]
    assert (
        ada["roles"] == ["Teacher"] and ada["sites"] == ["North High"] and ada["status"] == "active"
    )
    assert ada["display_name"] == "Ada Lovelace" and ada["sources"] == ["mem"]
    g = groups(store)
    assert set(g) == {"c-1", "c-2"}  # c-3 has no students: no group
    assert g["c-2"]["owners"] == ["ada@example.org", "alan.turing@example.org"]  # co-taught
    assert {m["sourced_id"] for m in g["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
    assert g["c-1"]["name"] == "Algebra I"
    assert report.counts["users_created"] == 2
    assert report.counts["groups_created"] == 2
    assert report.counts["resync_queued"] == 2


async def test_second_identical_sync_changes_nothing(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Re-running on unchanged data reports all counts zero and leaves every row as it was."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = snapshot(store)
    report = await sync(settings, store, small_roster())
    assert counts(report) == ZERO
    assert snapshot(store) == before


async def test_teacher_without_email_is_rejected_with_reason(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A teacher of a populated class with no email gets no user and is listed in `rejected`."""
    roster = small_roster()
    roster.replace_person("t-1", email=None)
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded_with_errors"
    assert {
        "entity": "user",
        "sourced_id": "t-1",
        "reason": "no email: teaches classes with students but has no email address",
    } in report.rejected
    assert report.counts["records_rejected"] == 1
    assert "ada@example.org" not in users(store)


@pytest.mark.parametrize(
    ("change", "expected_absent"),
    [
        ("disabled", "ada@example.org"),
        ("tobedeleted_person", "ada@example.org"),
        ("only_deleted_students", "ada@example.org"),
        ("deleted_class", "ada@example.org"),
    ],
)
async def test_eligibility_edge_cases(
    store: Store, make_settings: Callable[..., Settings], change: str, expected_absent: str
) -> None:
    """Disabled or deleted teachers, classes whose students are all deleted, and deleted classes give no account."""
    roster = small_roster()
    # Ada alone teaches c-1; make her co-teaching of c-2 go away so only c-1 counts.
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c2"]
    if change == "disabled":
        roster.replace_person("t-1", enabled=False)
    elif change == "tobedeleted_person":
        roster.replace_person("t-1", status="tobedeleted")
    elif change == "only_deleted_students":
        roster.enrollments = [
            replace(e, status="tobedeleted") if e.class_id == "c-1" and e.role == "student" else e
            for e in roster.enrollments
        ]
    elif change == "deleted_class":
        roster.classes = [
            replace(c, status="tobedeleted") if c.sourced_id == "c-1" else c for c in roster.classes
        ]
    await sync(make_settings(), store, roster)
    assert expected_absent not in users(store)
    assert "alan.turing@example.org" in users(store)


async def test_teacher_whose_only_students_are_deleted_persons_is_not_eligible(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Students whose person record is tobedeleted do not make a class populated."""
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c2"]
    for sid in ("s-1", "s-2", "s-3"):
        roster.replace_person(sid, status="tobedeleted")
    await sync(make_settings(), store, roster)
    assert "ada@example.org" not in users(store)


async def test_existing_user_is_linked_case_insensitively_not_duplicated(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A directory user whose email differs only in case is linked, not duplicated, and keeps their role."""
    settings = make_settings()
    with store.write() as conn:
        add_user(conn, "alan.turing@example.org", name="Prof. Turing", created_by="import")
    report = await sync(settings, store, small_roster())
    assert report.counts["users_linked"] == 1 and report.counts["users_created"] == 1
    all_users = users(store)
    assert len([e for e in all_users if e.startswith("alan")]) == 1
    assert all_users["alan.turing@example.org"]["display_name"] == "Prof. Turing"
    assert all_users["alan.turing@example.org"]["sources"] == ["mem"]
    assert "alan.turing@example.org" in groups(store)["c-2"]["owners"]


async def test_license_limit_skips_users_over_it(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """With room for one more user, one teacher is created and the other counted as skipped."""
    report = await sync(make_settings(license_limit=1), store, small_roster())
    assert report.counts["users_created"] == 1
    assert report.counts["users_skipped_license"] == 1
    assert len(users(store)) == 1


async def test_delta_run_redecides_everyone_after_a_provisioning_change(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A delta run normally decides only for the teachers its changes touch; once the
    license limit (or another provisioning setting) changed since the last run, it decides for
    everyone, so the teacher skipped for want of a license is created without a full run."""
    when = datetime(2026, 1, 5, tzinfo=UTC)
    base = small_roster()
    roster = MemoryRoster(
        *(
            [replace(r, date_last_modified=when) for r in records]
            for records in (base.orgs, base.persons, base.classes, base.enrollments)
        )
    )

    async def run(settings: Settings, mode: str) -> Any:
        connector = MemoryConnector(roster, delta=True)
        engine = SyncEngine(settings, store, connectors={"mem": connector})
        report = await engine.sync("mem", mode=mode)
        await engine.drain()
        with store.read() as conn:
            return runs_module.load_report(conn, report.id)

    limited = make_settings(license_limit=1)
    first = await run(limited, "full")
    assert (first.counts["users_created"], first.counts["users_skipped_license"]) == (1, 1)
    same = await run(limited, "delta")  # nothing changed: nobody is decided for
    assert same.mode == "delta" and same.counts["users_created"] == 0
    assert same.counts["users_skipped_license"] == 0 and same.warnings == []

    raised = make_settings(license_limit=5)
    after = await run(raised, "delta")
    assert after.mode == "delta" and after.status == "succeeded"
    assert after.counts["users_created"] == 1
    assert len(users(store)) == 2
    assert any("license_limit changed" in w for w in after.warnings)
    again = await run(raised, "delta")  # decided with these settings now: narrow again
    assert again.counts["users_created"] == 0 and again.warnings == []


async def test_site_map_by_school_id_and_name(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """site_map maps a teacher's school (sourcedId or name) to a site, else the default site applies."""
    roster = small_roster()
    roster.replace_person("t-2", org_ids=("sch-2",))
    settings = make_settings(provisioning={"site_map": {"South Middle": "South Middle"}})
    await sync(settings, store, roster)
    assert users(store)["alan.turing@example.org"]["sites"] == ["South Middle"]
    assert users(store)["ada@example.org"]["sites"] == ["North High"]


async def test_auto_create_off_creates_nobody(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """With auto_create_users false, a sync mirrors the roster but creates no user."""
    report = await sync(
        make_settings(provisioning={"auto_create_users": False}), store, small_roster()
    )
    assert users(store) == {}
    assert report.counts["users_not_created"] == 2


async def test_removed_teacher_is_archived_and_loses_groups(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A teacher who no longer teaches is archived (created by rostersync) and their groups go away."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    report = await sync(settings, store, roster)
    assert report.status == "succeeded"
    assert report.counts["users_archived"] == 1
    assert users(store)["alan.turing@example.org"]["status"] == "archived"
    assert groups(store)["c-2"]["owners"] == ["ada@example.org"]
    # Back again: the user is restored, not duplicated.
    report = await sync(settings, store, small_roster())
    assert report.counts["users_restored"] == 1 and report.counts["users_created"] == 0
    assert users(store)["alan.turing@example.org"]["status"] == "active"


async def test_user_not_created_by_rostersync_is_never_archived(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A linked user that an admin created keeps its status when the teacher disappears."""
    settings = make_settings()
    with store.write() as conn:
        add_user(conn, "ada@example.org", name="Ada", created_by="import")
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-1"]
    report = await sync(settings, store, roster)
    assert report.counts["users_archived"] == 0
    assert users(store)["ada@example.org"]["status"] == "active"
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    assert "c-1" not in groups(store)


async def test_a_teacher_leaving_removes_solo_groups_and_keeps_co_taught_ones(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """One resync lets go of both of a teacher's groups: the one nobody else teaches goes,
    with its members; the co-taught one stays with its other owner, counted and stamped as
    updated (the stamp stored as every other timestamp is)."""
    settings = make_settings()
    await sync(settings, store, small_roster())

    def stamps() -> dict[str, Any]:
        with store.read() as conn:
            return dict(conn.execute(text("SELECT external_id, updated_at FROM groups")).all())

    before = stamps()
    await asyncio.sleep(0.01)  # the new stamp must differ from the first
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-1"]
    report = await sync(settings, store, roster)
    assert report.counts["groups_removed"] == 1
    assert report.counts["groups_updated"] == 1
    g = groups(store)
    assert set(g) == {"c-2"} and g["c-2"]["owners"] == ["alan.turing@example.org"]
    with store.read() as conn:
        members = conn.execute(text("SELECT count(*) FROM group_member")).scalar_one()
    assert members == 3  # c-2's students; c-1's went with its group
    after = stamps()
    assert set(after) == {"c-2"} and after["c-2"] > before["c-2"]
    if store.dialect == "sqlite":  # same text shape as the ORM writes: no offset suffix
        assert len(after["c-2"]) == len(before["c-2"]) and "+" not in after["c-2"]


async def test_on_teacher_removed_keep(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """With on_teacher_removed: keep, a vanished teacher keeps an active account but no groups."""
    settings = make_settings(provisioning={"on_teacher_removed": "keep"})
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    await sync(settings, store, roster)
    assert users(store)["alan.turing@example.org"]["status"] == "active"
    assert groups(store)["c-2"]["owners"] == ["ada@example.org"]


async def test_student_changes_update_members_and_queue_only_their_teachers(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A student's new name reaches the group in the sync itself: the class keeps its owners
    and its students, so no teacher's groups need a resync."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.replace_person("s-1", given_name="Renamed")
    report = await sync(settings, store, roster, drain=False)
    assert report.counts["resync_queued"] == 0
    assert report.counts["groups_updated"] == 1  # s-1 is only in c-1
    names = {m["sourced_id"]: m["name"] for m in groups(store)["c-1"]["members"]}
    assert names["s-1"] == "Renamed Dent"
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0


async def test_a_sync_adds_removes_and_updates_members_in_one_pass(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The sync's own member update writes all three kinds of change at once (on PostgreSQL
    each as one statement over arrays): a student whose email is gone keeps a member row with
    no email, one leaves c-1, one joins it, and the other members stay as they were."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = {m["sourced_id"]: m for m in groups(store)["c-2"]["members"]}
    roster = small_roster()
    roster.replace_person("s-1", email=None, family_name="Nomail")
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-s2c1"]
    roster.enrollments.append(RosterEnrollment("e-s4c1", "c-1", "s-4", "student"))
    report = await sync(settings, store, roster, drain=False)
    assert report.status == "succeeded"
    members = {m["sourced_id"]: m for m in groups(store)["c-1"]["members"]}
    assert set(members) == {"s-1", "s-3", "s-4"}
    assert members["s-1"]["email"] is None and members["s-1"]["name"] == "Stu1 Nomail"
    assert members["s-4"]["email"] == "s4@example.org" and members["s-4"]["name"] == "Stu4 Dent"
    assert {m["sourced_id"]: m for m in groups(store)["c-2"]["members"]} == before


async def test_student_side_changes_that_move_owners_still_queue_the_teachers(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Members-only updates stop where owners can change: a class losing its last student
    loses its group through its teacher's resync, a student moving between two classes is
    moved by the sync alone, and a student who becomes a teacher goes to resync."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    # s-4 moves from c-2 to c-1 (the same enrollment id, another class): members only.
    roster.enrollments = [
        replace(e, class_id="c-1") if e.sourced_id == "e-s4c2" else e for e in roster.enrollments
    ]
    report = await sync(settings, store, roster, drain=False)
    assert report.counts["resync_queued"] == 0 and report.counts["groups_updated"] == 2
    g = groups(store)
    assert "s-4" in {m["sourced_id"] for m in g["c-1"]["members"]}
    assert "s-4" not in {m["sourced_id"] for m in g["c-2"]["members"]}

    # Every student leaves c-2: its teachers are resynced and the group goes.
    roster.enrollments = [
        e for e in roster.enrollments if not (e.class_id == "c-2" and e.role == "student")
    ]
    report = await sync(settings, store, roster)
    assert report.counts["resync_queued"] == 2 and report.counts["groups_removed"] == 1
    assert "c-2" not in groups(store)

    # A student of c-1 whose person record turns teacher may change who teaches c-1: its
    # teacher is resynced (membership follows the enrollment, so s-1 stays a member).
    roster.replace_person("s-1", role="teacher")
    report = await sync(settings, store, roster)
    assert report.counts["resync_queued"] == 1
    assert "s-1" in {m["sourced_id"] for m in groups(store)["c-1"]["members"]}


async def test_student_enrolled_twice_in_a_class_is_one_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Two enrollment records for one student in one class (sources do send them) make one
    member of the new group, not a failed insert."""
    roster = small_roster()
    roster.enrollments.append(RosterEnrollment("e-again", "c-1", "s-1", "student"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded"
    members = [m["sourced_id"] for m in groups(store)["c-1"]["members"]]
    assert sorted(members) == ["s-1", "s-2", "s-3"]


async def test_a_record_sent_twice_in_a_run_is_mirrored_as_its_last_version(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A source repeating a person within one run (Classroom lists a student under each of
    their courses; paging can shift) leaves one mirror row, the last version, and one
    member named after it: on SQLite the apply settles the repeat in staging, which the
    fetch only appended to. On a first load and on a later run alike."""
    roster = small_roster()
    s1 = next(p for p in roster.persons if p.sourced_id == "s-1")
    roster.persons.append(replace(s1, family_name="Later"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded"
    with store.read() as conn:
        names = conn.execute(
            text("SELECT family_name FROM roster_person WHERE sourced_id = 's-1'")
        ).scalars()
        assert list(names) == ["Later"]
    members = {m["sourced_id"]: m["name"] for m in groups(store)["c-1"]["members"]}
    assert members["s-1"].endswith(" Later")
    roster.persons.append(replace(s1, family_name="Last"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded"
    members = {m["sourced_id"]: m["name"] for m in groups(store)["c-1"]["members"]}
    assert members["s-1"].endswith(" Last")
    with store.read() as conn:
        staged = conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one()
    assert staged == 0


async def test_member_emails_are_lower_cased_beyond_ascii(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Member emails are lower-cased as Python and PostgreSQL do it, on SQLite too: in a new
    group and in a members-only update by the sync."""
    settings = make_settings()
    roster = small_roster()
    roster.replace_person("s-1", email="ÉLÈVE.Un@Example.ORG")
    await sync(settings, store, roster)
    emails = {m["sourced_id"]: m["email"] for m in groups(store)["c-1"]["members"]}
    assert emails["s-1"] == "élève.un@example.org"
    roster.replace_person("s-2", email="ÖZGE@EXAMPLE.ORG")
    await sync(settings, store, roster)
    emails = {m["sourced_id"]: m["email"] for m in groups(store)["c-1"]["members"]}
    assert emails["s-2"] == "özge@example.org"


async def test_new_enrollment_adds_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A new student enrollment adds a member to the class's group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments.append(RosterEnrollment("e-new", "c-1", "s-5", "student"))
    report = await sync(settings, store, roster)
    assert report.counts["groups_updated"] == 1
    assert "s-5" in {m["sourced_id"] for m in groups(store)["c-1"]["members"]}


async def test_class_emptied_removes_group(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A class whose students all leave stops being a group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [
        e for e in roster.enrollments if not (e.class_id == "c-2" and e.role == "student")
    ]
    report = await sync(settings, store, roster)
    assert report.counts["groups_removed"] == 1
    assert set(groups(store)) == {"c-1"}
    assert users(store)["alan.turing@example.org"]["status"] == "archived"


async def test_connector_rejections_are_reported_and_run_continues(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A rejected record is counted and listed; the rest of the run is applied."""
    roster = small_roster()
    roster.rejected.append(Rejected("user", "bad-1", "unknown status 'zombie'", "users.csv line 9"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded_with_errors"
    assert report.counts["records_rejected"] == 1
    assert report.rejected[0]["location"] == "users.csv line 9"
    assert len(users(store)) == 2


async def test_failure_half_way_changes_nothing(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A source that fails mid-fetch leaves the directory and mirror exactly as they were."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = small_roster()
    roster.persons = [p for p in roster.persons if p.sourced_id != "t-2"]
    report = await sync(settings, store, roster, fail_after=2)
    assert report.status == "failed"
    assert "connection lost" in (report.error or "")
    assert snapshot(store) == before
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one() == 0


async def test_removals_over_threshold_hold_the_run_until_approved(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A run removing more than max_removals is held with nothing applied; approval applies it."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = small_roster()
    roster.enrollments = [
        e for e in roster.enrollments if e.role == "teacher" or e.class_id != "c-2"
    ]
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    report = await sync(settings, store, roster)
    assert report.status == "held"
    assert "max_removals" in (report.hold_reason or "")
    assert snapshot(store) == before
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    approved = await engine.approve(report.id)
    await engine.drain()
    assert approved.status == "succeeded"
    assert users(store)["alan.turing@example.org"]["status"] == "archived"
    assert "c-2" not in groups(store)


async def test_a_held_run_whose_staged_data_is_gone_is_not_approved(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Approval skips the safety rules, so it first checks that the held run's staged rows are
    still there: applied without them, a full run would sweep the whole source."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    roster.enrollments = [e for e in roster.enrollments if e.class_id != "c-2"]
    report = await sync(settings, store, roster)
    assert report.status == "held"
    before = snapshot(store)
    with store.write() as conn:  # as a server crash empties unlogged tables
        conn.execute(text("DELETE FROM staging_enrollment"))
        conn.execute(text("DELETE FROM staging_class"))
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    with pytest.raises(RunStateError, match=r"staged data is gone \(classes, enrollments"):
        await engine.approve(report.id)
    assert snapshot(store) == before
    with store.read() as conn:
        status = conn.execute(
            text("SELECT status FROM sync_run WHERE id = :r"), {"r": report.id}
        ).scalar_one()
    assert status == "held"


async def test_empty_pull_is_held(store: Store, make_settings: Callable[..., Settings]) -> None:
    """A source that suddenly returns nothing is held, never applied."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = snapshot(store)
    report = await sync(settings, store, MemoryRoster())
    assert report.status == "held"
    assert "empty pull" in (report.hold_reason or "")
    assert snapshot(store) == before


async def test_shrunken_source_is_held(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Fewer than min_source_ratio of the last run's enrollments holds the run."""
    settings = make_settings(safety={"min_source_ratio": 0.9, "max_removals": 100})
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = roster.enrollments[:6]
    report = await sync(settings, store, roster)
    assert report.status == "held"
    assert "shrunken source" in (report.hold_reason or "")


async def test_approving_a_superseded_held_run_is_refused(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A held run older than a later successful run cannot be approved."""
    from rostersync.errors import RunStateError

    settings = make_settings()
    await sync(settings, store, small_roster())
    held = await sync(settings, store, MemoryRoster())
    await sync(settings, store, small_roster())
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(small_roster())})
    with pytest.raises(RunStateError, match="out of date"):
        await engine.approve(held.id)


async def test_dry_run_reports_and_changes_nothing(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A dry run reports would-be counts and changes neither mirror nor directory."""
    settings = make_settings()
    before = snapshot(store)
    report = await sync(settings, store, small_roster(), dry_run=True)
    assert report.dry_run and report.counts["users_created"] == 2
    assert snapshot(store) == before


async def test_two_person_records_with_one_email_make_one_user(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Two eligible persons whose emails differ only in case share one account."""
    roster = small_roster()
    roster.persons.append(RosterPerson("t-9", "teacher", "Ada", "Again", "ADA@example.org"))
    roster.enrollments.append(RosterEnrollment("e-t9c1", "c-1", "t-9", "teacher"))
    await sync(make_settings(), store, roster)
    assert len([e for e in users(store) if e == "ada@example.org"]) == 1
    assert groups(store)["c-1"]["owners"] == ["ada@example.org"]


async def test_users_of_other_sources_are_untouched(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Each source sweeps only its own mirror and archives only the users it created."""
    settings = make_settings(memory_sources=("mem", "other"))
    await sync(settings, store, small_roster(), source="mem")
    other = small_roster()
    await sync(settings, store, other, source="other")
    assert users(store)["ada@example.org"]["sources"] == ["mem", "other"]
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-1"]
    report = await sync(settings, store, roster, source="mem")
    assert report.counts["users_archived"] == 0  # still teaches in "other"
    assert users(store)["ada@example.org"]["status"] == "active"
    assert "c-1" in groups(store)  # the group of "other"'s c-1 remains


async def test_live_resync_refreshes_the_teacher_from_the_source(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live resync reads the teacher's classes now and rebuilds groups from that, without a full sync."""

    settings = make_settings()
    await sync(settings, store, small_roster())
    changed = small_roster()
    changed.enrollments.append(RosterEnrollment("e-new", "c-1", "s-5", "student"))
    changed.enrollments = [e for e in changed.enrollments if e.sourced_id != "e-s1c1"]
    with store.write() as conn:
        uid = user_id(conn, "ada@example.org")
        queue_resync(conn, [uid], reason="manual", run_id=None, live=True)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(changed)})
    outcomes = await engine.process_batch()
    assert [o for _, o in outcomes] == ["succeeded"]
    members = {m["sourced_id"] for m in groups(store)["c-1"]["members"]}
    assert members == {"s-2", "s-3", "s-5"}


async def test_live_resync_failure_is_retried_then_failed(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live fetch that fails leaves the job queued with its error, then failed after max_attempts."""

    settings = make_settings(resync={"max_attempts": 2, "backoff": 0})
    await sync(settings, store, small_roster())

    class Broken(MemoryConnector):
        async def fetch_teacher(self, teacher: object) -> object:  # type: ignore[override]
            raise RuntimeError("source unreachable")

    with store.write() as conn:
        uid = user_id(conn, "ada@example.org")
        queue_resync(conn, [uid], reason="manual", run_id=None, live=True)
    engine = SyncEngine(settings, store, connectors={"mem": Broken(small_roster())})
    assert [o for _, o in await engine.process_batch()] == ["queued"]
    assert [o for _, o in await engine.process_batch()] == ["failed"]
    with store.read() as conn:
        state, err = conn.execute(
            text("SELECT state, last_error FROM resync_job WHERE live = :t"), {"t": True}
        ).one()
    assert state == "failed" and "source unreachable" in err


async def test_rejected_class_is_not_swept(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A class the source refused this time keeps its mirror rows, group and teacher."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = small_roster()
    roster.classes = [c for c in roster.classes if c.sourced_id != "c-1"]
    roster.enrollments = [e for e in roster.enrollments if e.class_id != "c-1"]
    roster.persons = [p for p in roster.persons if p.sourced_id not in ("s-1", "s-2")]
    roster.rejected.append(Rejected("class", "c-1", "forbidden: 403"))
    report = await sync(settings, store, roster)
    assert report.status == "succeeded_with_errors"
    assert report.counts["users_archived"] == 0 and report.counts["groups_removed"] == 0
    assert snapshot(store) == before


async def test_owner_added_by_import_survives_resyncs(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A group owner an admin added (origin import) is kept when the class's teachers are resynced."""

    settings = make_settings()
    await sync(settings, store, small_roster())
    with store.write() as conn:
        admin = add_user(conn, "coach@example.org", name="Coach", created_by="import")
        gid = conn.execute(text("SELECT id FROM groups WHERE external_id = 'c-1'")).scalar_one()
        conn.execute(
            text("INSERT INTO group_owner (group_id, user_id, origin) VALUES (:g, :u, 'import')"),
            {"g": gid, "u": admin},
        )
        queue_resync(conn, [admin], reason="t", run_id=None)
    roster = small_roster()
    roster.replace_person("s-1", given_name="Changed")
    await sync(settings, store, roster)
    assert groups(store)["c-1"]["owners"] == ["ada@example.org", "coach@example.org"]


async def test_source_that_stops_sending_emails_is_held(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A run that would blank most people's email addresses is held, not applied."""
    from rostersync.sampledata import DistrictSpec, generate_district

    settings = make_settings()
    roster = generate_district(DistrictSpec(teachers=6, students=40, classes=8, edge_cases=False))
    await sync(settings, store, roster)
    before = snapshot(store)
    blank = roster.copy()
    blank.persons = [replace(p, email=None) for p in blank.persons]
    report = await sync(settings, store, blank)
    assert report.status == "held"
    assert "lose their email address" in (report.hold_reason or "")
    assert snapshot(store) == before


async def test_manual_resync_rereads_every_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A manual resync repairs a group's members even when no sync marked its class changed."""

    settings = make_settings()
    await sync(settings, store, small_roster())
    with store.write() as conn:
        conn.execute(text("DELETE FROM group_member WHERE sourced_id = 's-1'"))
        uid = user_id(conn, "ada@example.org")
        queue_resync(conn, [uid], reason="manual", run_id=None)
        marked = {r[0] for r in conn.execute(text("SELECT class_id FROM dirty_class"))}
        assert "c-1" not in marked
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(small_roster())})
    await engine.drain()
    assert "s-1" in {m["sourced_id"] for m in groups(store)["c-1"]["members"]}


async def test_drain_runs_batches_side_by_side_on_postgresql(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain() runs resync.workers batches at once on PostgreSQL (one on SQLite, whose
    writers take turns), reports the running total after each batch, and ends with every job
    done and the groups one batch at a time would give."""
    settings = make_settings(resync={"batch_size": 1, "workers": 3})
    await sync(settings, store, small_roster(), drain=False)
    engine = SyncEngine(settings, store)
    in_flight = peak = 0
    real = engine.process_batch

    async def counting() -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.05)  # let the other workers lease their batches meanwhile
            return await real()
        finally:
            in_flight -= 1

    monkeypatch.setattr(engine, "process_batch", counting)
    totals: list[int] = []
    assert await engine.drain(on_batch=totals.append) == 2  # Ada and Alan; Grace's class is empty
    assert peak == (3 if store.is_postgres else 1)
    assert sorted(totals) == [1, 2]
    with store.read() as conn:
        states = conn.execute(text("SELECT state, count(*) FROM resync_job GROUP BY state")).all()
    assert states == [("succeeded", 2)]
    assert {m["sourced_id"] for m in groups(store)["c-2"]["members"]} == {"s-3", "s-4", "s-5"}
    assert groups(store)["c-2"]["owners"] == ["ada@example.org", "alan.turing@example.org"]


async def test_a_failing_drain_worker_stops_the_others(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error out of one worker (not a job's failure, which is recorded) cancels the others
    and reaches the caller as it was raised."""
    settings = make_settings(resync={"batch_size": 1, "workers": 3})
    await sync(settings, store, small_roster(), drain=False)
    engine = SyncEngine(settings, store)
    calls = 0
    cancelled: list[bool] = []

    async def failing() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("lease failed")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return []

    monkeypatch.setattr(engine, "process_batch", failing)
    with pytest.raises(RuntimeError, match="lease failed"):
        await asyncio.wait_for(engine.drain(), timeout=5)
    assert len(cancelled) == (2 if store.is_postgres else 0)


async def test_sync_marks_changed_classes_until_their_resync(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A sync marks the members it changed (a person, an enrollment) and the classes whose own
    row changed; the resync that re-reads them clears the marks."""
    settings = make_settings()
    await sync(settings, store, small_roster(), drain=False)
    with store.read() as conn:  # a first run: new groups read every member anyway
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0
    await SyncEngine(settings, store).drain()
    roster = small_roster()
    roster.replace_person("s-4", given_name="Changed")  # s-4 is only in c-2
    # Ada stops co-teaching c-2: its owners change, so its members wait for the resync too.
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c2"]
    roster.classes = [
        replace(c, title="Algebra II") if c.sourced_id == "c-1" else c for c in roster.classes
    ]
    roster.enrollments = [
        e for e in roster.enrollments if not (e.class_id == "c-1" and e.user_id == "s-1")
    ]
    await sync(settings, store, roster, drain=False)
    with store.read() as conn:
        classes = {r[0] for r in conn.execute(text("SELECT class_id FROM dirty_class"))}
        members = set(conn.execute(text("SELECT class_id, person_id FROM dirty_member")).all())
    assert classes == {"c-1"}  # its title changed: its members are re-read in full
    assert members == {("c-2", "s-4")}  # (c-1, s-1) is covered by the class mark
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.drain()
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM dirty_class")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0
    g = groups(store)
    assert "Changed Dent" in {m["name"] for m in g["c-2"]["members"]}
    assert g["c-2"]["owners"] == ["alan.turing@example.org"]
    assert g["c-1"]["name"] == "Algebra II"
    assert "s-1" not in {m["sourced_id"] for m in g["c-1"]["members"]}


async def test_member_marks_re_read_only_the_marked_members(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A sync-queued resync re-reads the marked members of a group and leaves its other rows
    alone (that is the point of the marks); a manual resync re-reads the whole group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    with store.write() as conn:  # drift nobody marked: another member's stored name
        conn.execute(text("UPDATE group_member SET name = 'Stale' WHERE sourced_id = 's-5'"))
    roster = small_roster()
    roster.replace_person("s-4", given_name="Changed")
    report = await sync(settings, store, roster)
    assert report.counts["groups_updated"] == 1
    names = {m["sourced_id"]: m["name"] for m in groups(store)["c-2"]["members"]}
    assert names["s-4"] == "Changed Dent" and names["s-5"] == "Stale"

    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    with store.write() as conn:
        owner = conn.execute(
            text("""SELECT o.user_id FROM group_owner o JOIN groups g ON g.id = o.group_id
                    WHERE g.external_id = 'c-2' ORDER BY o.user_id LIMIT 1""")
        ).scalar_one()
        queue_resync(conn, [owner], reason="manual", run_id=None)
    await engine.drain()
    names = {m["sourced_id"]: m["name"] for m in groups(store)["c-2"]["members"]}
    assert names["s-5"] != "Stale"


async def test_batches_arriving_during_a_slow_staging_write_are_staged_together(
    store: Store,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The fetch does not wait for each staging write: batches that arrive meanwhile go in
    the next write together, in arrival order (a repeated sourcedId keeps its last version),
    and the run ends as an ordinary one does."""
    roster = small_roster()
    # t-1 sent twice, the later version renamed: the later one must win.
    renamed = replace(next(p for p in roster.persons if p.sourced_id == "t-1"), given_name="Ida")
    roster.enrollments = [*roster.enrollments, renamed]  # type: ignore[list-item]
    writes: list[int] = []
    real_stage = SyncEngine._stage

    def slow_stage(self: SyncEngine, run_id: int, batch: StagedBatch) -> None:
        writes.append(len(batch))
        time.sleep(0.05)
        real_stage(self, run_id, batch)

    monkeypatch.setattr(SyncEngine, "_stage", slow_stage)
    report = await sync(make_settings(), store, roster)  # batches of 7 records
    assert report.status == "succeeded", report.error
    batches = -(-len(roster.records()) // 7)
    assert sum(writes) == len(roster.records())
    assert 1 < len(writes) < batches  # later writes took several batches at once
    assert users(store)["ada@example.org"]["display_name"] == "Ida Lovelace"

    monkeypatch.setattr(SyncEngine, "_stage", real_stage)
    other = Store(f"sqlite:///{tmp_path / 'plain.db'}")
    other.upgrade()
    try:
        plain = await sync(make_settings(), other, roster)
        assert plain.counts == report.counts
        assert users(other).keys() == users(store).keys()
        assert groups(other) == groups(store)
    finally:
        other.dispose()


async def test_a_bulk_load_rebuilds_the_mirror_indexes_and_a_failure_keeps_them(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that doubles a mirror table drops its secondary indexes and builds them again
    in the same transaction: they exist afterwards, and a run failing after the load leaves
    the indexes and the (empty) mirror as they were."""
    monkeypatch.setattr(merging, "BULK_LOAD_MIN_ROWS", 1)
    dropped: list[str] = []
    real_drop = merging.DropIndex

    def spy(index: Any) -> Any:
        dropped.append(index.name)
        return real_drop(index)

    monkeypatch.setattr(merging, "DropIndex", spy)
    expected = {"ix_roster_enr_class", "ix_roster_enr_user"}

    def boom(conn: Any, written: Any) -> None:
        raise RuntimeError("boom after the load")

    with monkeypatch.context() as m:
        m.setattr(merging, "refresh_statistics", boom)
        failed = await sync(make_settings(), store, small_roster())
    assert failed.status == "failed" and "boom" in (failed.error or "")
    assert expected <= set(dropped)
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("roster_enrollment")}
    assert expected <= indexes
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM roster_enrollment")).scalar_one() == 0

    dropped.clear()
    report = await sync(make_settings(), store, small_roster())
    assert report.status == "succeeded"
    assert expected <= set(dropped) and "ix_roster_person_email" in dropped
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("roster_enrollment")}
    assert expected <= indexes
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
    dropped.clear()
    await sync(make_settings(), store, small_roster())  # not a first load: indexes kept
    assert dropped == []


async def test_a_sources_first_load_inserts_without_comparing_and_later_runs_upsert(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Into a mirror table that holds no row of the source, the merge inserts the staged rows
    plainly (nothing to compare, no conflict possible), even beside another source's rows;
    once the source has rows there, changes go through the comparing upsert."""
    settings = make_settings(memory_sources=("mem", "other"))
    statements: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO roster_enrollment"):
            statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", spy)
    try:
        await sync(settings, store, small_roster())
        first = list(statements)
        await sync(settings, store, small_roster(), source="other")
        beside = statements[len(first) :]
        roster = small_roster()
        roster.enrollments = [
            replace(e, primary=True) if e.sourced_id == "e-s1c1" else e for e in roster.enrollments
        ]
        count = len(statements)
        report = await sync(settings, store, roster)
        again = statements[count:]
    finally:
        event.remove(store.engine, "before_cursor_execute", spy)
    assert report.status == "succeeded"
    assert len(first) == 1 and "ON CONFLICT" not in first[0] and "NOT EXISTS" not in first[0]
    assert len(beside) == 1 and "ON CONFLICT" not in beside[0]
    assert len(again) == 1 and "ON CONFLICT" in again[0]
    with store.read() as conn:
        rows = conn.execute(
            text(
                'SELECT source, count(*), sum(CASE WHEN "primary" THEN 1 ELSE 0 END) '
                "FROM roster_enrollment GROUP BY source ORDER BY source"
            )
        ).all()
    base = small_roster().enrollments
    primaries = sum(e.primary for e in base)
    assert not next(e for e in base if e.sourced_id == "e-s1c1").primary
    assert [tuple(r) for r in rows] == [
        ("mem", len(base), primaries + 1),
        ("other", len(base), primaries),
    ]


async def test_changed_rows_keep_their_index_entries_when_no_indexed_column_changed(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The merge writes every change, and on SQLite sets an indexed column only for rows
    whose value in it changed: a trigger on those columns fires for the moved enrollment and
    the new email, not for the flag or the family name that changed beside them."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    sqlite = store.engine.dialect.name == "sqlite"
    if sqlite:
        with store.write() as conn:
            conn.execute(text("CREATE TABLE index_writes (tbl TEXT, sourced_id TEXT)"))
            conn.execute(
                text(
                    "CREATE TRIGGER enr_index_cols AFTER UPDATE OF class_id, user_id, role "
                    "ON roster_enrollment BEGIN INSERT INTO index_writes "
                    "VALUES ('enrollment', new.sourced_id); END"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER person_index_cols AFTER UPDATE OF email ON roster_person "
                    "BEGIN INSERT INTO index_writes VALUES ('person', new.sourced_id); END"
                )
            )
    roster = small_roster()
    roster.enrollments = [
        replace(e, primary=True)
        if e.sourced_id == "e-s1c1"
        else replace(e, class_id="c-2")
        if e.sourced_id == "e-s2c1"
        else e
        for e in roster.enrollments
    ]
    roster.replace_person("s-3", family_name="Renamed")
    roster.replace_person("s-4", email="s4.new@example.org")
    report = await sync(settings, store, roster)
    assert report.status == "succeeded"
    with store.read() as conn:
        enrollments = {
            sid: (cls, primary)
            for sid, cls, primary in conn.execute(
                text('SELECT sourced_id, class_id, "primary" FROM roster_enrollment')
            )
        }
        people = {
            sid: (family, email)
            for sid, family, email in conn.execute(
                text("SELECT sourced_id, family_name, email FROM roster_person")
            )
        }
        writes = (
            sorted(conn.execute(text("SELECT tbl, sourced_id FROM index_writes")).all())
            if sqlite
            else []
        )
    assert enrollments["e-s1c1"] == ("c-1", True)
    assert enrollments["e-s2c1"] == ("c-2", False)
    assert people["s-3"] == ("Renamed", "s3@example.org")
    assert people["s-4"] == ("Dent", "s4.new@example.org")
    assert {m["sourced_id"] for m in groups(store)["c-2"]["members"]} == {
        "s-2",
        "s-3",
        "s-4",
        "s-5",
    }
    assert {m["name"] for m in groups(store)["c-1"]["members"]} >= {"Stu3 Renamed"}
    if sqlite:
        assert writes == [("enrollment", "e-s2c1"), ("person", "s-4")]


def test_a_first_load_finds_the_changes_the_row_by_row_comparison_finds(store: Store) -> None:
    """A source's first load (no enrollment of it in the mirror, no group) counts classes and
    enrollments in SQL: the same dirty classes, owners and new enrollments as reading every
    staged enrollment, here with a sparse ``tobedeleted`` one and an aide among them."""
    roster = small_roster()
    roster.enrollments += [
        RosterEnrollment("e-aide", "c-3", "s-1", "aide"),
        RosterEnrollment("e-gone", "", "", "", status="tobedeleted"),
    ]
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    with store.write() as conn:
        stage(conn, 1, sort_batch(roster.records()))
        event.listen(conn, "before_cursor_execute", seen)
        fast = detect.find_changes(conn, "mem", 1, full=True, grouped={})
        event.remove(conn, "before_cursor_execute", seen)
        # A group for a class the roster does not have: the first-load test fails, the loop runs
        slow = detect.find_changes(conn, "mem", 1, full=True, grouped={"no-such-class": 0})
    assert any("GROUP BY s.class_id" in q for q in statements)  # the first-load path ran
    assert not any("LEFT JOIN roster_enrollment" in q for q in statements)
    # A first load writes every staged enrollment: their ids are not collected (the merge
    # reads all of staging); the loop collects all of them.
    assert "enrollment" not in fast.to_write
    assert slow.to_write.pop("enrollment") == {e.sourced_id for e in roster.enrollments}
    assert fast == slow
    assert fast.dirty_classes == {"c-1", "c-2", "c-3", ""}
    assert fast.owner_classes == {"c-1", "c-2", "c-3", ""}
    assert fast.member_pairs == set()


@pytest.mark.parametrize("targeted", [True, False], ids=["by-id", "whole-run"])
async def test_a_full_run_that_changed_little_upserts_just_those_rows(
    store: Store,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    targeted: bool,
) -> None:
    """The merge writes the rows find_changes found new or changed, by id, and only for the
    kinds that have some: a full run that changed nothing runs no upsert and compares no
    staged row again. Beyond TARGETED_UPSERT_MAX rows of a kind it reads the whole run
    instead: the same mirror either way."""
    if not targeted:
        monkeypatch.setattr(merging, "TARGETED_UPSERT_MAX", 0)
    settings = make_settings()
    roster = small_roster()
    await sync(settings, store, roster)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO roster_"):
            statements.append(" ".join(statement.split()))

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        before = snapshot(store)
        await sync(settings, store, roster)
        assert snapshot(store) == before
        noop = list(statements)
        statements.clear()
        roster.replace_person("s-1", family_name="Renamed")
        roster.enrollments.append(RosterEnrollment("e-new", "c-2", "s-1", "student"))
        await sync(settings, store, roster)
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    assert noop == []  # nothing new or changed: no upsert at all
    assert {q.split()[2] for q in statements} == {"roster_person", "roster_enrollment"}
    by_id = [q for q in statements if "s.sourced_id IN" in q]
    assert len(by_id) == (len(statements) if targeted else 0)
    with store.read() as conn:
        person = conn.execute(
            text("SELECT family_name FROM roster_person WHERE sourced_id = 's-1'")
        ).scalar_one()
        enrolled = conn.execute(
            text("SELECT class_id FROM roster_enrollment WHERE sourced_id = 'e-new'")
        ).scalar_one()
    assert (person, enrolled) == ("Renamed", "c-2")
    members = {m["sourced_id"]: m["name"] for m in groups(store)["c-2"]["members"]}
    assert members["s-1"].endswith(" Renamed")


async def test_users_of_many_persons_are_read_in_one_pass(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Above 2,000 persons the identities are read once and matched in Python: the same
    users as the IN-list queries give for a few."""
    await sync(make_settings(), store, small_roster())
    many = {"t-1", "t-2", "s-1"} | {f"nobody-{n}" for n in range(2500)}
    with store.read() as conn:
        few = provisioning.users_of_persons(conn, "mem", {"t-1", "t-2", "s-1"})
        bulk = provisioning.users_of_persons(conn, "mem", many)
    assert len(few) == 2 and bulk == few


@pytest.mark.postgres
async def test_a_batch_refreshes_statistics_in_a_transaction_of_its_own(
    pg_store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ANALYZE holds its table lock until commit: run inside a batch, it made every other
    batch's ANALYZE wait for that whole batch, and concurrent batches ran one at a time. It
    commits before the batch's own transaction begins."""
    settings = make_settings()
    await sync(settings, pg_store, small_roster(), drain=False)
    engine = SyncEngine(settings, pg_store)
    engine._created_unanalyzed = 100  # groups were created since the last refresh
    transactions: dict[str, int] = {}
    real_refresh, real_rebuild = merging.refresh_directory_statistics, worker_module.rebuild_groups

    def refresh(conn: Any, members: bool = True) -> None:
        transactions["analyze"] = conn.execute(text("SELECT txid_current()")).scalar_one()
        real_refresh(conn, members=members)

    def rebuild(conn: Any, *args: Any, **kwargs: Any) -> Any:
        transactions["batch"] = conn.execute(text("SELECT txid_current()")).scalar_one()
        return real_rebuild(conn, *args, **kwargs)

    monkeypatch.setattr(merging, "refresh_directory_statistics", refresh)
    monkeypatch.setattr(worker_module, "rebuild_groups", rebuild)
    assert await engine.drain() == 2
    assert transactions["batch"] > transactions["analyze"]  # a later transaction, not the same


async def test_resync_workers_refresh_statistics_as_the_group_tables_grow(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers refresh all directory statistics once groups were created since the last
    refresh (then at most every ANALYZE_EVERY seconds), the small tables once the groups
    created since are 100 or more and at least as many as before (the tables doubled), and
    nothing while no group is created. SQLite keeps the same count but has no statistics to
    refresh, so nothing is called there."""
    settings = make_settings()
    await sync(settings, store, small_roster(), drain=False)
    calls: list[bool] = []
    monkeypatch.setattr(
        merging, "refresh_directory_statistics", lambda conn, members=True: calls.append(members)
    )

    def refreshed(*members: bool) -> list[bool]:
        return list(members) if store.is_postgres else []

    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(small_roster())})
    await engine.drain()
    assert calls == refreshed()  # nothing was created before this batch
    assert engine._created_unanalyzed == 2  # the two groups this batch created

    def requeue() -> None:
        with store.write() as conn:
            queue_resync(conn, [user_id(conn, "ada@example.org")], reason="t", run_id=None)

    requeue()
    await engine.drain()  # groups created since, never refreshed: everything
    assert calls == refreshed(True) and engine._created_unanalyzed == 0
    engine._analyzed_at -= worker_module.ANALYZE_EVERY
    requeue()
    await engine.drain()  # the interval is over, but no group was created since
    assert calls == refreshed(True)
    engine._created_unanalyzed = 100
    requeue()
    await engine.drain()
    assert calls == refreshed(True, True)  # created since, and the interval is over: everything
    assert engine._created_analyzed == 102  # 2 + 100 groups were sampled
    engine._created_unanalyzed = 101
    requeue()
    await engine.drain()  # within the interval, and the tables have not doubled: nothing
    assert calls == refreshed(True, True) and engine._created_unanalyzed == 101
    engine._created_unanalyzed = 102
    requeue()
    await engine.drain()  # within the interval, doubled: the small tables only
    assert calls == refreshed(True, True, False) and engine._created_unanalyzed == 0
    assert engine._created_analyzed == 204


def test_id_lookups_take_every_value_in_one_statement_on_postgresql(store: Store) -> None:
    """``ids_in`` answers for every value, past the first 500 too: in one statement over an
    array on PostgreSQL (one plan, one round trip), in IN-list chunks of 500 on SQLite."""
    wanted = {f"c-{i:04d}" for i in range(0, 1200, 2)} | {"absent"}
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_class (source, sourced_id, title, status, row_hash) "
                "VALUES ('mem', :sid, 'T', 'active', 'h')"
            ),
            [{"sid": f"c-{i:04d}"} for i in range(1200)],
        )
        event.listen(conn, "before_cursor_execute", seen)
        found = mirror.ids_in(
            conn,
            "SELECT sourced_id FROM roster_class WHERE source = :src AND sourced_id IN :ids",
            wanted,
            src="mem",
        )
        event.remove(conn, "before_cursor_execute", seen)
    assert found == wanted - {"absent"}
    assert len(statements) == (1 if store.dialect == "postgresql" else 2)
