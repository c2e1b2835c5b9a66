"""Engine bugs the model-based test found, each as a minimal plain reproduction.

Each test states the rule (README / issue 16) it checks. They fail until the engine is fixed;
tests/model/README.md lists them with the model's step sequence that found each.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, text

from rostersync.config.models import Settings
from rostersync.importer import parse_bytes, run_import
from rostersync.resync.queue import queue_resync
from rostersync.source.records import (
    MemoryRoster,
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterPerson,
)
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import merge as merging
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import load_report
from tests.sync.helpers import drain_failing, groups, live_resync, snapshot, sync, users


def _school() -> MemoryRoster:
    """One teacher, one class with one student; dated, so that delta runs can run."""
    day = datetime(2026, 9, 1, tzinfo=UTC)
    return MemoryRoster(
        persons=[
            RosterPerson(
                "t1", "teacher", "Ada", "Lovelace", "t1@example.org", date_last_modified=day
            ),
            RosterPerson("s1", "student", "Stu", "One", "s1@example.org", date_last_modified=day),
        ],
        classes=[RosterClass("c1", "Algebra I", date_last_modified=day)],
        enrollments=[
            RosterEnrollment("e1", "c1", "t1", "teacher", date_last_modified=day),
            RosterEnrollment("e2", "c1", "s1", "student", date_last_modified=day),
        ],
    )


def _members(store: Store, class_id: str) -> set[str]:
    return {m["sourced_id"] for m in groups(store)[class_id]["members"]}


async def test_a_student_whose_enrollment_came_first_becomes_a_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Members are the class's active student enrollments whose person is active: a student
    whose person record arrives a run after the enrollment (its row was rejected, or the
    source sent the enrollment first) is a member once the person is there."""
    settings = make_settings()
    roster = _school()
    roster.enrollments.append(RosterEnrollment("e3", "c1", "s2", "student"))
    await sync(settings, store, roster)
    assert _members(store, "c1") == {"s1"}
    roster.persons.append(RosterPerson("s2", "student", "Stu", "Two", "s2@example.org"))
    await sync(settings, store, roster)
    assert _members(store, "c1") == {"s1", "s2"}


async def test_a_failed_approval_does_not_leave_the_run_running(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed run changes nothing, and says it failed: an approval whose apply fails
    half-way leaves the directory as it was and the run held (to approve again) or failed,
    never `running` for good."""
    settings = make_settings(safety={"max_removals": 0})
    await sync(settings, store, _school())
    emptied = _school()
    emptied.enrollments = []
    held = await sync(settings, store, emptied)
    assert held.status == "held"
    before = snapshot(store)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(merging, "merge", broken)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(emptied)})
    with pytest.raises(RuntimeError):
        await engine.approve(held.id)
    monkeypatch.undo()
    assert snapshot(store) == before
    with store.read() as conn:
        assert load_report(conn, held.id).status in ("held", "failed")


async def test_a_delta_run_links_a_teacher_to_an_account_imported_since(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An unlinked eligible person whose email matches an existing user is linked to it; a
    delta run must leave the rules holding for everyone, also for a teacher whose record did
    not change but whose account an import created since the last run."""
    settings = make_settings(provisioning={"auto_create_users": False})
    roster = _school()
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster, delta=True)})
    await engine.sync("mem", mode="full")
    assert "t1@example.org" not in users(store)
    sheet = parse_bytes(b"Email,Display Name\nt1@example.org,Ada\n", "t.csv", max_rows=10)
    assert [str(r.status) for r in run_import(store, settings, sheet).rows] == ["Success"]
    report = await engine.sync("mem", mode="delta")
    await engine.drain()
    assert report.mode == "delta"
    assert users(store)["t1@example.org"]["sources"] == ["mem"]
    assert groups(store)["c1"]["owners"] == ["t1@example.org"]


async def test_a_statement_left_open_by_a_failed_apply_does_not_fail_later_runs(
    sqlite_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A failed run changes nothing, and nothing after it: an apply that fails between two
    statements must not leave the first one's result open on a pooled SQLite connection, or
    a later run's DROP INDEX on that connection fails with "database table is locked"
    (until Python's cycle collector happens to run; it is off here to make that certain)."""
    store = sqlite_store
    settings = make_settings(safety={"max_removals": 0})
    await sync(settings, store, _school())
    emptied = _school()
    emptied.enrollments = []
    held = await sync(settings, store, emptied)
    assert held.status == "held"
    failing = {"armed": True}

    def fail_once(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        # The second of nothing_missing's two counts, while the first is still unread.
        if failing["armed"] and statement.startswith("SELECT count(*) FROM staging_"):
            failing["armed"] = False
            raise RuntimeError("I/O error (injected)")

    gc.disable()
    event.listen(store.engine, "before_cursor_execute", fail_once)
    try:
        engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(emptied)})
        with pytest.raises(RuntimeError):
            await engine.approve(held.id)
        statuses = []
        for roster in (_school(), emptied, _school(), emptied, _school(), emptied):
            report = await sync(settings, store, roster)
            statuses.append(report.error or report.status)
    finally:
        event.remove(store.engine, "before_cursor_execute", fail_once)
        gc.enable()
        gc.collect()
    assert "database table is locked" not in " ".join(statuses), statuses


async def test_a_person_no_longer_of_a_teacher_role_owns_no_group(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A group's owners are the active linked users whose person is active, enabled and of a
    teacher role: a teacher whose record becomes a student's stops owning the class's group
    (with on_teacher_removed: keep the account stays, the ownership does not), and a dry run
    counts that group as removed."""
    settings = make_settings(provisioning={"on_teacher_removed": "keep"})
    await sync(settings, store, _school())
    assert groups(store)["c1"]["owners"] == ["t1@example.org"]
    roster = _school()
    roster.replace_person("t1", role="student")
    dry = await sync(settings, store, roster, dry_run=True)
    assert dry.counts["groups_removed"] == 1
    await sync(settings, store, roster)
    assert "c1" not in groups(store)
    assert users(store)["t1@example.org"]["status"] == "active"


async def test_a_delta_run_gives_a_freed_license_seat_to_a_skipped_teacher(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Teachers over license_limit are skipped while there is no seat; once a seat is free,
    the next run creates them. A delta run must end where deciding for everyone would,
    also for a skipped teacher whose own records did not change."""
    settings = make_settings(license_limit=2)
    roster = _school()
    day = datetime(2026, 9, 1, tzinfo=UTC)
    for n in (2, 3):
        roster.persons.append(
            RosterPerson(
                f"t{n}", "teacher", "T", str(n), f"t{n}@example.org", date_last_modified=day
            )
        )
        roster.enrollments.append(
            RosterEnrollment(f"e-t{n}", "c1", f"t{n}", "teacher", date_last_modified=day)
        )
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster, delta=True)})
    first = await engine.sync("mem", mode="full")
    assert first.counts["users_skipped_license"] == 1
    assert set(users(store)) == {"t1@example.org", "t2@example.org"}
    roster.replace_person("t1", enabled=False, date_last_modified=datetime(2026, 9, 2, tzinfo=UTC))
    await engine.sync("mem", mode="delta")  # t1 is archived: a seat is free from now on
    assert users(store)["t1@example.org"]["status"] == "archived"
    report = await engine.sync("mem", mode="delta")
    assert report.mode == "delta"
    assert users(store)["t3@example.org"]["status"] == "active"


async def test_a_shared_account_stays_while_one_of_its_persons_teaches(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Several persons with one email are one account (a teacher with a record per school).
    It is archived when none of them is a candidate any more, not when one of them stops
    teaching: that archived the account, removed the class groups it still teaches, and the
    next run restored it (and so on, run after run)."""
    settings = make_settings()
    roster = _school()
    roster.persons.append(RosterPerson("t2", "teacher", "Ada", "Lovelace", "T1@example.org"))
    roster.persons.append(RosterPerson("s2", "student", "Stu", "Two", "s2@example.org"))
    roster.classes.append(RosterClass("c2", "Computing"))
    roster.enrollments += [
        RosterEnrollment("e3", "c2", "t2", "teacher"),
        RosterEnrollment("e4", "c2", "s2", "student"),
    ]
    await sync(settings, store, roster)
    assert users(store)["t1@example.org"]["status"] == "active"
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e3"]
    report = await sync(settings, store, roster)
    assert report.counts["users_archived"] == 0
    assert users(store)["t1@example.org"]["status"] == "active"
    assert set(groups(store)) == {"c1"}


async def test_a_shared_account_is_restored_once_and_takes_one_seat(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An archived account whose two persons both come back is one restoration: counted
    once, taking one license seat (it counted two restorations, or with one seat free a
    restoration and a license skip of the same account)."""
    settings = make_settings(license_limit=1)

    def roster(status: str) -> MemoryRoster:
        return MemoryRoster(
            persons=[
                RosterPerson("t1", "teacher", "Ada", "Lovelace", "t1@example.org"),
                RosterPerson("t2", "teacher", "Ada", "Lovelace", "t1@example.org"),
                RosterPerson("s1", "student", "Stu", "One", "s1@example.org"),
            ],
            classes=[RosterClass("c1", "Algebra I", status=status)],  # type: ignore[arg-type]
            enrollments=[
                RosterEnrollment("e1", "c1", "t1", "teacher"),
                RosterEnrollment("e2", "c1", "t2", "teacher"),
                RosterEnrollment("e3", "c1", "s1", "student"),
            ],
        )

    await sync(settings, store, roster("active"))
    await sync(settings, store, roster("tobedeleted"))
    assert users(store)["t1@example.org"]["status"] == "archived"
    report = await sync(settings, store, roster("active"))
    assert users(store)["t1@example.org"]["status"] == "active"
    assert report.counts["users_restored"] == 1
    assert report.counts["users_skipped_license"] == 0


async def test_an_overlong_email_rejects_its_teacher_not_the_run(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An email over 256 characters is no identity: its teacher is rejected with the reason
    and the run goes on. (On PostgreSQL the staging column, VARCHAR(256), failed the whole
    run at the COPY.)"""
    roster = _school()
    roster.replace_person("t1", email="t" + "x" * 300 + "@example.org")
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded_with_errors", report.error
    assert [r["sourced_id"] for r in report.rejected] == ["t1"]


async def test_a_group_taken_over_by_a_teacher_provisioned_in_the_run_is_not_removed(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """ "Groups removed" counts the source's groups that would have no owner after the run: a
    class whose teacher leaves while a new teacher, created in the same run, takes it keeps its
    group, so it is not counted (it was, and a low safety.max_removals held the run)."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, _school())
    roster = _school()
    roster.persons.append(RosterPerson("t2", "teacher", "Alan", "Turing", "t2@example.org"))
    roster.enrollments = [
        RosterEnrollment("e2", "c1", "s1", "student"),
        RosterEnrollment("e3", "c1", "t2", "teacher"),
    ]
    dry = await sync(settings, store, roster, dry_run=True)
    assert (dry.counts["users_archived"], dry.counts["users_created"]) == (1, 1)
    assert dry.counts["groups_removed"] == 0
    assert dry.status == "succeeded"


async def test_two_persons_linked_to_one_account_are_one_user_linked(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """`users_linked` counts accounts, as `users_created` and `users_restored` do: two persons
    of one email linked to the account an import created are one user linked (it said 2)."""
    settings = make_settings(provisioning={"auto_create_users": False})
    roster = _school()
    roster.persons.append(RosterPerson("t2", "teacher", "Ada", "Lovelace", "T1@example.org"))
    roster.enrollments.append(RosterEnrollment("e3", "c1", "t2", "teacher"))
    sheet = parse_bytes(b"Email,Display Name\nt1@example.org,Ada\n", "t.csv", max_rows=10)
    assert [str(r.status) for r in run_import(store, settings, sheet).rows] == ["Success"]
    report = await sync(settings, store, roster)
    assert report.counts["users_linked"] == 1
    assert users(store)["t1@example.org"]["sources"] == ["mem"]


async def test_a_sync_job_merged_into_a_queued_manual_resync_counts_in_the_run(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A run's report counts the groups its resync jobs create, also when a user's job merged
    into a manual resync already queued for them (it counted nothing: the merged job kept the
    manual request's empty run), and the merged job still re-reads every member."""
    settings = make_settings()
    await sync(settings, store, _school())
    with store.write() as conn:
        user_id = int(conn.execute(text('SELECT id FROM "user"')).scalar_one())
        queue_resync(conn, [user_id], reason="manual resync", run_id=None)
    roster = _school()
    roster.classes.append(RosterClass("c2", "Geometry"))
    roster.enrollments += [
        RosterEnrollment("e3", "c2", "t1", "teacher"),
        RosterEnrollment("e4", "c2", "s1", "student"),
    ]
    report = await sync(settings, store, roster)
    assert report.counts["groups_created"] == 1
    assert _members(store, "c2") == {"s1"}
    with store.read() as conn:
        job = conn.execute(
            text("SELECT run_id, refresh, state FROM resync_job ORDER BY id DESC LIMIT 1")
        ).one()
    assert (job[0], bool(job[1]), job[2]) == (report.id, True, "succeeded")


def _enrollment_status(store: Store, sourced_id: str) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                text("SELECT status FROM roster_enrollment WHERE sourced_id = :s"),
                {"s": sourced_id},
            ).scalar_one()
        )


async def test_a_live_answer_that_drops_an_enrollment_drops_the_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live resync writes the teacher's roster as the source answers it now: an enrollment
    the answer holds as ``tobedeleted`` is one the source has dropped, so its student leaves
    the group. The memory and CSV connectors answer with the enrollments' statuses, and the
    live apply took every enrollment of the answer for an active one."""
    settings = make_settings()
    await sync(settings, store, _school())
    live = _school()
    live.enrollments = [replace(e, status="tobedeleted") if e.sourced_id == "e2" else e
                        for e in live.enrollments]  # fmt: skip
    live.enrollments.append(RosterEnrollment("e3", "c1", "s2", "student"))
    live.persons.append(RosterPerson("s2", "student", "Stu", "Two", "s2@example.org"))
    await live_resync(store, settings, live, email="t1@example.org")
    assert _enrollment_status(store, "e2") == "tobedeleted"
    assert _members(store, "c1") == {"s2"}


async def test_a_live_answer_with_an_overlong_email_keeps_the_persons_row(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A record with a value longer than its column is rejected on its own (a run keeps the
    mirror's row): so is it in a live answer. The live apply wrote it as it came, which
    failed the teacher's live resync on PostgreSQL (the value does not fit) and, on SQLite,
    put an address no run would accept into the mirror."""
    settings = make_settings()
    await sync(settings, store, _school())
    live = _school()
    long_email = "s1" + "x" * 260 + "@example.org"
    live.persons = [replace(p, email=long_email) if p.sourced_id == "s1" else p
                    for p in live.persons]  # fmt: skip
    await live_resync(store, settings, live, email="t1@example.org")
    with store.read() as conn:
        email = conn.execute(
            text("SELECT email FROM roster_person WHERE sourced_id = 's1'")
        ).scalar_one()
    assert email == "s1@example.org"
    assert _members(store, "c1") == {"s1"}


async def test_a_full_sync_after_a_live_resync_updates_the_other_teachers_groups(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live resync writes the answer's people into the mirror but rebuilds only its
    teacher's groups; another teacher's group with the same student shows the student as
    the last sync saw them until a sync re-reads the student. The rows the live resync wrote
    kept the source's fingerprint, so the next full sync took the student for unchanged and
    the other group kept the old name for good."""
    settings = make_settings()
    school = _school()
    school.persons.append(RosterPerson("t2", "teacher", "Alan", "Turing", "t2@example.org"))
    school.classes.append(RosterClass("c2", "Geometry"))
    school.enrollments += [
        RosterEnrollment("e3", "c2", "t2", "teacher"),
        RosterEnrollment("e4", "c2", "s1", "student"),
    ]
    await sync(settings, store, school)
    school.persons = [replace(p, given_name="Renamed") if p.sourced_id == "s1" else p
                      for p in school.persons]  # fmt: skip
    await live_resync(store, settings, school, email="t1@example.org")
    assert [m["name"] for m in groups(store)["c1"]["members"]] == ["Renamed One"]
    await sync(settings, store, school)
    assert [m["name"] for m in groups(store)["c2"]["members"]] == ["Renamed One"]


async def test_a_live_answer_without_a_student_enrolled_twice_drops_the_student(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A student the source enrolled twice in a class (two enrollment records) leaves the
    group when the live answer no longer has them: the live apply kept one row per (class,
    person, role), whichever the database read last, and marked only that one."""
    settings = make_settings()
    school = _school()
    school.persons.append(RosterPerson("s2", "student", "Stu", "Two", "s2@example.org"))
    school.enrollments += [
        RosterEnrollment("e3", "c1", "s1", "student"),
        RosterEnrollment("e4", "c1", "s2", "student"),
    ]
    await sync(settings, store, school)
    live = _school()
    live.enrollments = [e for e in live.enrollments if e.user_id != "s1"]
    live.enrollments.append(RosterEnrollment("e4", "c1", "s2", "student"))
    live.persons = [p for p in school.persons if p.sourced_id != "s1"]
    await live_resync(store, settings, live, email="t1@example.org")
    assert {_enrollment_status(store, e) for e in ("e2", "e3")} == {"tobedeleted"}
    assert _members(store, "c1") == {"s2"}


async def test_a_live_answer_with_a_moved_enrollment_enrolls_its_new_student(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An enrollment the source moved to another student (same sourcedId, as CSV answers
    carry it) makes that student a member: the live apply wrote the moved row, then marked
    the old (class, student) pair's row, by its id, tobedeleted: the row it had just
    written."""
    settings = make_settings()
    school = _school()
    school.persons.append(RosterPerson("s2", "student", "Stu", "Two", "s2@example.org"))
    await sync(settings, store, school)
    school.enrollments = [replace(e, user_id="s2") if e.sourced_id == "e2" else e
                          for e in school.enrollments]  # fmt: skip
    await live_resync(store, settings, school, email="t1@example.org")
    assert _enrollment_status(store, "e2") == "active"
    assert _members(store, "c1") == {"s2"}


async def test_a_live_answer_with_a_rejected_enrollment_keeps_the_teachers_classes(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live answer in which the connector rejected an enrollment takes no enrollment for
    gone (docs/sources.md: "or an enrollment was rejected, nothing of that kind is dropped"):
    the rejected one may be the teacher's own, by which the class was theirs, so a class
    missing from that answer stays the teacher's until the next full sync decides (a sync
    keeps a rejected record's row). The live apply kept the students then, but took the
    class for gone, and the teacher lost its group."""
    settings = make_settings()
    await sync(settings, store, _school())
    live = _school()
    live.enrollments = [e for e in live.enrollments if e.sourced_id != "e1"]
    rejected = [Rejected("enrollment", "e1", "bad status")]
    await live_resync(store, settings, live, email="t1@example.org", rejected=rejected)
    assert _enrollment_status(store, "e1") == "active"
    assert groups(store)["c1"]["owners"] == ["t1@example.org"]


async def test_a_failed_jobs_marked_members_are_read_when_the_next_run_queues_it_again(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Resyncs that failed for good are queued again by the next run (8659900) and must
    leave the groups what the mirror says. A run makes t2 a co-teacher of c1 and enrolls s2
    there (the class's owners changed: s2 is marked for the resyncs, not written by the
    sync); t1's and t2's resyncs fail for good. The next run, nothing changed, queues both
    again: c1 gets t2 as owner, and must get s2 as member. mark_dirty had dropped the marks
    once no job waited for them: the owners came right, s2 stayed out (fixed in 04d083b:
    the users are queued to re-read their groups' members whole)."""
    settings = make_settings()
    roster = _school()
    roster.persons.append(RosterPerson("t2", "teacher", "Alan", "Turing", "t2@example.org"))
    await sync(settings, store, roster)
    roster.persons.append(RosterPerson("s2", "student", "Stu", "Two", "s2@example.org"))
    roster.enrollments += [
        RosterEnrollment("e3", "c1", "t2", "teacher"),
        RosterEnrollment("e4", "c1", "s2", "student"),
    ]
    await sync(settings, store, roster, drain=False)
    await drain_failing(store, make_settings(resync={"max_attempts": 1}), roster)
    report = await sync(settings, store, roster)
    assert any("last resync job failed for good" in w for w in report.warnings)
    assert sorted(groups(store)["c1"]["owners"]) == ["t1@example.org", "t2@example.org"]
    assert _members(store, "c1") == {"s1", "s2"}


async def test_full_and_delta_runs_agree_on_the_removals_of_a_failed_job_they_queue_again(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The safety limits count the removals a run makes itself (README: "A run is held when
    ..."): a removal an earlier run decided, whose job failed for good and which the run
    queues again (8659900), is not its own. t1 stops teaching c2 and the resync that was to
    remove c2 fails for good; under `max_removals: 0` a full dry run was held for c2 and a
    delta dry run was not (the model found the two disagreeing). Neither is now (04d083b),
    and the next run removes c2."""
    roster = _school()
    day = datetime(2026, 9, 1, tzinfo=UTC)
    roster.classes.append(RosterClass("c2", "Geometry", date_last_modified=day))
    roster.enrollments += [
        RosterEnrollment("e3", "c2", "t1", "teacher", date_last_modified=day),
        RosterEnrollment("e4", "c2", "s1", "student", date_last_modified=day),
    ]

    def engine(settings: Settings) -> SyncEngine:
        return SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster, delta=True)})

    await engine(make_settings()).sync("mem", mode="full")
    await engine(make_settings()).drain()
    roster.enrollments[2] = replace(
        roster.enrollments[2], status="tobedeleted", date_last_modified=day.replace(day=2)
    )
    await engine(make_settings()).sync("mem", mode="delta")
    await drain_failing(store, make_settings(resync={"max_attempts": 1}), roster)
    assert sorted(groups(store)) == ["c1", "c2"]
    strict = engine(make_settings(safety={"max_removals": 0}))
    full = await strict.sync("mem", mode="full", dry_run=True)
    assert (full.mode, full.status) == ("full", "succeeded"), full.hold_reason
    delta = await strict.sync("mem", mode="delta", dry_run=True)
    assert (delta.mode, delta.status) == ("delta", "succeeded"), delta.hold_reason
    await strict.sync("mem", mode="delta")
    await strict.drain()
    assert sorted(groups(store)) == ["c1"]


@pytest.mark.parametrize("change", ["students", "rename", "class_gone"])
async def test_a_group_an_import_owner_keeps_follows_its_class(
    store: Store, make_settings: Callable[..., Settings], change: str
) -> None:
    """A group an import owner keeps when its teachers go (docs/import.md, "Owners added by
    import") is still its class's group: its members are the class's active students (README:
    "its active students are its members") and its name the class's title. Here t1 stops
    teaching c1, whose group admin@example.org keeps; then c1 loses its only student, is
    renamed, or leaves the source: the group must follow (no member; the new title; no
    member), not keep what it had for good. (No ratio check: the class's last enrollments
    going would hold the run.)"""
    settings = make_settings(safety={"min_source_ratio": 0})
    roster = _school()
    await sync(settings, store, roster)
    sheet = parse_bytes(b"Email,Groups\nadmin@example.org,Algebra I\n", "g.csv", max_rows=10)
    assert [str(r.status) for r in run_import(store, settings, sheet).rows] == ["Success"]
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e1"]
    await sync(settings, store, roster)
    assert groups(store)["c1"]["owners"] == ["admin@example.org"]
    assert _members(store, "c1") == {"s1"}
    if change == "students":
        roster.enrollments = []
    elif change == "rename":
        roster.classes = [replace(c, title="Geometry") for c in roster.classes]
    else:
        roster.classes, roster.enrollments = [], []
    report = await sync(settings, store, roster)
    assert report.status == "succeeded", report.hold_reason
    group = groups(store)["c1"]
    assert group["owners"] == ["admin@example.org"]
    expected = ("Geometry", {"s1"}) if change == "rename" else ("Algebra I", set())
    assert (group["name"], _members(store, "c1")) == expected


@pytest.mark.parametrize("change", ["title", "student"])
async def test_a_group_import_owners_alone_keep_follows_a_live_answer_of_its_class(
    store: Store, make_settings: Callable[..., Settings], change: str
) -> None:
    """A group that import owners alone keep follows its class in the mirror, also when a
    live resync's answer changes the class (docs/import.md, "Owners added by import"): c1's
    group is admin@example.org's alone, and t1's answer renames c1 (in the answer by t1's
    tobedeleted teacher enrollment) or renames s1, a student of c1 and of t1's c2. The group
    kept its old name or member until a sync read the class (the model's long profile found
    the engine and the oracle disagreeing on its name once the class left the source); once
    c1 has left the source, the group keeps the name it had."""
    settings = make_settings(safety={"min_source_ratio": 0})
    roster = _school()
    roster.classes.append(RosterClass("c2", "Geometry"))
    roster.enrollments += [
        RosterEnrollment("e3", "c2", "t1", "teacher"),
        RosterEnrollment("e4", "c2", "s1", "student"),
    ]
    await sync(settings, store, roster)
    sheet = parse_bytes(b"Email,Groups\nadmin@example.org,Algebra I\n", "g.csv", max_rows=10)
    assert [str(r.status) for r in run_import(store, settings, sheet).rows] == ["Success"]
    if change == "title":
        roster.enrollments[0] = replace(roster.enrollments[0], status="tobedeleted")
    else:
        del roster.enrollments[0]
    await sync(settings, store, roster)
    assert groups(store)["c1"]["owners"] == ["admin@example.org"]
    if change == "title":
        roster.classes[0] = replace(roster.classes[0], title="Study Hall")
    else:
        roster.persons[1] = replace(roster.persons[1], given_name="Renamed")
    await live_resync(store, settings, roster, email="t1@example.org")
    group = groups(store)["c1"]
    if change == "student":
        assert [m["name"] for m in group["members"]] == ["Renamed One"]
        return
    assert group["name"] == "Study Hall"
    roster.classes = roster.classes[1:]
    await sync(settings, store, roster)
    assert groups(store)["c1"]["name"] == "Study Hall"
