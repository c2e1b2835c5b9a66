"""A sync's provisioning: who is created, linked, archived, and their groups, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, text

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, RosterEnrollment, RosterPerson
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import provisioning
from rostersync.sync import runs as runs_module
from rostersync.sync.engine import SyncEngine
from tests.sync.helpers import ZERO, add_user, counts, groups, snapshot, sync, users


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
        [replace(r, date_last_modified=when) for r in base.orgs],
        [replace(r, date_last_modified=when) for r in base.persons],
        [replace(r, date_last_modified=when) for r in base.classes],
        [replace(r, date_last_modified=when) for r in base.enrollments],
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


async def test_two_person_records_with_one_email_make_one_user(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Two eligible persons of one name whose emails differ only in case (a teacher with a
    record per school) share one account."""
    roster = small_roster()
    roster.persons.append(RosterPerson("t-9", "teacher", "ADA ", "lovelace", "ADA@example.org"))
    roster.enrollments.append(RosterEnrollment("e-t9c1", "c-1", "t-9", "teacher"))
    await sync(make_settings(), store, roster)
    assert len([e for e in users(store) if e == "ada@example.org"]) == 1
    assert groups(store)["c-1"]["owners"] == ["ada@example.org"]


@pytest.mark.parametrize("linked_first", [False, True], ids=["together", "ada-linked-first"])
async def test_persons_of_other_names_never_share_an_account(
    store: Store, make_settings: Callable[..., Settings], linked_first: bool
) -> None:
    """A placeholder address (or a look-alike of a colleague's) given to two teachers of other
    names: neither is merged into the other's account. Arriving together, both are rejected
    naming the other; arriving after Ada has her account, Bob is rejected and Ada keeps it.
    Once the source gives Bob his own address, a delta run gives him his own account."""
    settings = make_settings()
    roster = small_roster()
    if linked_first:
        await sync(settings, store, roster)
    # A full-width look-alike: NFKC makes it Ada's address.
    bob = RosterPerson("t-9", "teacher", "Bob", "Brown", "\uff41\uff44\uff41@example.org")
    roster.persons.append(bob)
    roster.enrollments.append(RosterEnrollment("e-t9c2", "c-2", "t-9", "teacher"))
    report = await sync(settings, store, roster)
    rejected = {r["sourced_id"]: r["reason"] for r in report.rejected if r["entity"] == "user"}
    why_t9 = rejected.get("t-9")
    assert why_t9 is not None and "t-1 (Ada Lovelace)" in why_t9
    assert why_t9.startswith("email shared under another name: ada@example.org")
    if linked_first:
        assert "t-1" not in rejected  # linked: the account is hers
        assert users(store)["ada@example.org"]["display_name"] == "Ada Lovelace"
        assert "bob@example.org" not in users(store)
    else:
        why_t1 = rejected.get("t-1")
        assert why_t1 is not None and "t-9 (Bob Brown)" in why_t1
        assert "ada@example.org" not in users(store)
    roster.persons[-1] = replace(bob, email="bob@example.org")
    fixed = await sync(settings, store, roster, mode="delta")
    assert not {r["sourced_id"] for r in fixed.rejected} & {"t-1", "t-9"}
    assert "bob@example.org" in users(store) and "ada@example.org" in users(store)
    assert "bob@example.org" in groups(store)["c-2"]["owners"]


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


async def test_the_owner_count_of_a_few_groups_probes_each_on_postgresql(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The groups a delta may leave without an owner are counted with a probe of each
    group's teacher enrollments (a fenced subquery), never an anti-join that hashes every
    teacher enrollment of the source; the count over all groups may hash. Either way the
    answer is the same."""
    settings = make_settings()
    await sync(settings, pg_store, small_roster())
    roles = settings.provisioning.teacher_roles
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM groups g" in statement and "roster_enrollment" in statement:
            statements.append((statement, parameters))

    with pg_store.write() as conn:
        gids = set(conn.execute(text("SELECT id FROM groups")).scalars())
        ada = conn.execute(text("SELECT id FROM \"user\" WHERE email = 'ada@example.org'")).scalar()
        assert ada is not None
        event.listen(conn, "before_cursor_execute", seen)
        few = provisioning._without_owner(conn, "mem", roles, [ada], [], gids)
        every = provisioning._without_owner(conn, "mem", roles, [ada], [], None)
        event.remove(conn, "before_cursor_execute", seen)
        plans = [
            "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}", params))
            for sql, params in statements
        ]
    assert few == every == {"c-1"}  # Ada archived: c-2 keeps Alan
    fenced, whole = (sql.count("OFFSET 0") for sql, _ in statements)
    assert fenced == whole + 1  # the populated test's own fence in both
    assert "Anti Join" not in plans[0]


async def test_eligibility_probes_each_teachers_enrollments_on_postgresql(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Who is eligible is asked with a probe of each teacher's enrollments (a fenced
    subquery, stopping at the first populated class), never a semi-join that first tests
    every teacher enrollment of the source: for everyone (a full run) and for a few (a
    delta). The teachers found are those of the unfenced question."""
    settings = make_settings()
    await sync(settings, pg_store, small_roster())
    roles = settings.provisioning.teacher_roles
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM roster_person tp" in statement:
            statements.append((statement, parameters))

    with pg_store.write() as conn:
        event.listen(conn, "before_cursor_execute", seen)
        every = provisioning.eligible_teachers(conn, "mem", roles)
        few = provisioning.eligible_teachers(conn, "mem", roles, {"t-1", "s-1"})
        event.remove(conn, "before_cursor_execute", seen)
        plans = [
            "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}", params))
            for sql, params in statements
        ]
        unfenced = {
            r[0]
            for r in conn.exec_driver_sql(
                statements[0][0].replace(" OFFSET 0)", ")"), statements[0][1]
            )
        }
    assert sorted(t.sourced_id for t in every) == sorted(unfenced) == ["t-1", "t-2"]
    assert [t.sourced_id for t in few] == ["t-1"]
    assert len(plans) == 2
    for plan in plans:
        assert "Semi Join" not in plan and "SubPlan" in plan, plan
