"""The safety net: dry runs are previews, emails are identities only when valid, and only
persons of a teacher role are teachers (issue: the safety net holds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.errors import RunStateError
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.sync.helpers import console_down, drain_failing, groups, snapshot, sync, users


def _without_alan_and_computing(roster: MemoryRoster) -> MemoryRoster:
    """Alan leaves and Computing loses its students: one user archived, a group removed."""
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    roster.enrollments = [
        e for e in roster.enrollments if e.role == "teacher" or e.class_id != "c-2"
    ]
    return roster


def _without_ada() -> MemoryRoster:
    """The small roster after Ada (t-1) left: Algebra I (hers alone) loses its teacher and
    Computing its co-teacher."""
    roster = small_roster()
    roster.persons = [p for p in roster.persons if p.sourced_id != "t-1"]
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-1"]
    return roster


def _status(store: Store, run_id: int) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                text("SELECT status FROM sync_run WHERE id = :r"), {"r": run_id}
            ).scalar_one()
        )


# -- removals already decided -----------------------------------------------------------------


async def test_removals_an_earlier_run_decided_do_not_hold_the_next_run(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A run archived Ada; the resync job that removes her group (Algebra I, hers alone) has
    not run yet: its drain was cut short, or a scheduled sync came first. The next run
    removes nothing itself: it is not held for her group (it was, by every limit), and its
    drain still removes it."""
    strict = make_settings(safety={"max_removals": 0})
    await sync(make_settings(), store, small_roster())
    roster = _without_ada()
    first = await sync(make_settings(), store, roster, drain=False)
    assert (first.status, first.counts["users_archived"]) == ("succeeded", 1)
    assert "c-1" in groups(store)  # its removal waits in the queue
    report = await sync(strict, store, roster)
    assert report.status == "succeeded", report.hold_reason
    assert users(store)["ada@example.org"]["status"] == "archived"
    assert sorted(groups(store)) == ["c-2"]
    # With that job done, a removal of the run's own holds it, as before.
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    assert (await sync(strict, store, roster)).status == "held"


@pytest.mark.parametrize("mode", ["full", "delta"])
async def test_removals_an_earlier_run_decided_under_keep_do_not_hold_the_next_run(
    store: Store, make_settings: Callable[..., Settings], mode: str
) -> None:
    """Under ``on_teacher_removed: keep`` Ada leaves and keeps an active account; the resync
    that takes Algebra I (hers alone) away waits, its drain cut short. The next run, full or
    delta, changes nothing: it is not held for that group under a limit of no removal (the
    full run was), and its drain removes it."""
    keep = {"provisioning": {"on_teacher_removed": "keep"}}
    strict = make_settings(**keep, safety={"max_removals": 0})
    await sync(make_settings(**keep), store, small_roster())
    roster = _without_ada()
    first = await sync(make_settings(**keep), store, roster, drain=False)
    assert (first.status, first.counts["users_archived"]) == ("succeeded", 0)
    assert "c-1" in groups(store)  # its removal waits in the queue
    report = await sync(strict, store, roster, mode=mode)
    assert report.status == "succeeded", report.hold_reason
    assert users(store)["ada@example.org"]["status"] == "active"
    assert sorted(groups(store)) == ["c-2"]
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    # A removal of the run's own still holds it.
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    assert (await sync(strict, store, roster, mode=mode)).status == "held"


async def test_groups_a_failed_job_left_are_removed_by_the_next_run_without_holding_it(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A run archived Ada and the resync that was to take her groups away failed for good
    (the directory could not be written, max_attempts 1): Algebra I, hers alone, stayed, and
    she stayed an owner of Computing beside Alan. The next run queues her resync again (with
    a warning saying why) and is not held for Algebra I under a limit of no removal: its
    drain removes it and her ownership. Before, every later run was held for that group, or
    (within the limits) left it there for good."""
    strict = make_settings(safety={"max_removals": 0})
    await sync(make_settings(), store, small_roster())
    roster = _without_ada()
    first = await sync(make_settings(), store, roster, drain=False)
    assert first.counts["users_archived"] == 1

    await drain_failing(store, make_settings(resync={"max_attempts": 1}), roster)
    with store.read() as conn:
        states = conn.execute(
            text("SELECT state FROM resync_job WHERE run_id = :r"), {"r": first.id}
        )
        assert {s for (s,) in states} == {"failed"}
    assert sorted(groups(store)) == ["c-1", "c-2"]
    assert "ada@example.org" in groups(store)["c-2"]["owners"]

    report = await sync(strict, store, roster)
    assert report.status == "succeeded", report.hold_reason
    # Ada, and Alan, whose job (his co-taught Computing changed) failed as well.
    assert report.counts["resync_queued"] == 2
    assert [w.split(" (")[0] for w in report.warnings] == [
        "1 archived users still owned groups of this source",
        "1 users' last resync job failed for good",
    ]
    assert sorted(groups(store)) == ["c-2"]
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    # Done once: the run after queues nothing and says nothing of it.
    again = await sync(strict, store, roster)
    assert (again.status, again.counts["resync_queued"], again.warnings) == ("succeeded", 0, [])


async def test_a_resync_that_failed_for_good_is_queued_again_by_the_next_run(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console was down through every retry of the first load's resyncs: the accounts
    exist, the groups do not, and the jobs failed for good. Nothing changes in the roster,
    yet the next run queues those users again (with a warning) and its drain builds their
    groups; the run after that queues nobody. Before, the groups waited for an operator's
    `resync` or for a change in each teacher's classes."""

    with monkeypatch.context() as patched:
        patched.setattr("rostersync.resync.worker.rebuild_groups", console_down)
        first = await sync(make_settings(resync={"max_attempts": 1}), store, small_roster())
    assert first.counts["users_created"] == 2
    assert groups(store) == {}
    report = await sync(make_settings(), store, small_roster())
    assert report.status == "succeeded"
    assert report.counts["resync_queued"] == 2
    assert any("2 users' last resync job failed for good" in w for w in report.warnings)
    assert sorted(groups(store)) == ["c-1", "c-2"]
    again = await sync(make_settings(), store, small_roster())
    assert (again.counts["resync_queued"], again.warnings) == (0, [])


async def test_a_dry_run_a_real_run_would_hold_warns_of_failed_resyncs_as_the_real_run_does(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load's resyncs failed for good, then Ada left and the run would be held
    (no removal allowed). A plain dry run (no --changes) stops at the hold, but its report
    still says that two users' resyncs failed for good and would be queued again, as the real
    run's report does: an operator previewing the run hears of it before approving."""
    with monkeypatch.context() as patched:
        patched.setattr("rostersync.resync.worker.rebuild_groups", console_down)
        await sync(make_settings(resync={"max_attempts": 1}), store, small_roster())
    before = snapshot(store)
    strict = make_settings(safety={"max_removals": 0})
    dry = await sync(strict, store, _without_ada(), dry_run=True)
    assert dry.hold_reason is not None and "max_removals" in dry.hold_reason
    warned = [w for w in dry.warnings if "resync job failed for good" in w]
    assert warned and warned[0].startswith("2 users' last resync job failed for good"), dry
    assert snapshot(store) == before
    real = await sync(strict, store, _without_ada())
    assert real.status == "held"
    assert [w for w in real.warnings if "resync job failed for good" in w] == warned


async def test_an_account_an_import_archives_or_reactivates_has_its_groups_resynced(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An admin archives Ada's account with an import (Overwrite, Current Status Archived):
    the import queues her resync, which takes her groups away (Algebra I, hers alone, goes);
    a sync after it does not restore her (rostersync did not archive her). Reactivated by
    another import, her resync gives them back. Imports queued no resync for a status
    change: her groups stayed hers, or stayed gone, until something resynced her."""
    from rostersync.importer import run_import
    from rostersync.importer.reader import parse_bytes

    def set_status(status: str) -> int:
        header = "Email,Display Name,Role,Site,Groups,SendVerification,DataSync,Overwrite,"
        row = f"ada@example.org,Ada Lovelace,Teacher,North High,,,,TRUE,,{status}\n"
        body = f"{header}Delegated,Current Status\n{row}".encode()
        imported = run_import(store, make_settings(), parse_bytes(body, "u.csv", max_rows=9))
        assert [r.status.value for r in imported.rows] == ["Updated"]
        return imported.resyncs_queued

    engine = SyncEngine(make_settings(), store, connectors={"mem": MemoryConnector(small_roster())})
    await sync(make_settings(), store, small_roster())
    everything = groups(store)
    assert set_status("Archived") == 1
    await engine.drain()
    assert sorted(groups(store)) == ["c-2"]
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    report = await sync(make_settings(safety={"max_removals": 0}), store, small_roster())
    assert (report.status, report.counts["users_restored"]) == ("succeeded", 0)
    assert users(store)["ada@example.org"]["status"] == "archived"
    assert sorted(groups(store)) == ["c-2"]
    assert set_status("Active") == 1
    await engine.drain()
    assert groups(store) == everything


async def test_an_archived_owner_whose_resync_was_lost_loses_the_groups_at_the_next_run(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Ada's account is archived and her resync never ran (its job deleted, as a database
    restored from a backup may have it): the next run queues it, is not held for her group
    under a limit of no removal, and its drain removes it."""
    await sync(make_settings(), store, small_roster())
    with store.write() as conn:
        conn.execute(
            text("UPDATE \"user\" SET status = 'archived' WHERE email = 'ada@example.org'")
        )
    report = await sync(make_settings(safety={"max_removals": 0}), store, small_roster())
    assert report.status == "succeeded", report.hold_reason
    assert any("archived users still owned groups" in w for w in report.warnings)
    assert sorted(groups(store)) == ["c-2"]


# -- dry runs ---------------------------------------------------------------------------------


async def test_a_dry_run_that_a_real_run_would_hold_is_never_approvable(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A dry run over the safety limits reports that a real run would be held, but it is a
    dry run: approving it is refused and changes nothing (it used to archive users)."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = _without_alan_and_computing(small_roster())
    report = await sync(settings, store, roster, dry_run=True)
    assert report.dry_run
    assert report.status == "held"
    assert "max_removals" in (report.hold_reason or "")
    assert report.counts["users_archived"] == 1
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    with pytest.raises(RunStateError, match="dry run"):
        await engine.approve(report.id)
    await engine.drain()
    assert snapshot(store) == before
    assert users(store)["alan.turing@example.org"]["status"] == "active"
    assert _status(store, report.id) == "held"


async def test_a_dry_run_keeps_no_staged_rows(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Nothing of a dry run is kept for later: its staged rows go, held or not."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    await sync(settings, store, _without_alan_and_computing(small_roster()), dry_run=True)
    with store.read() as conn:
        for table in ("staging_person", "staging_class", "staging_enrollment"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0


async def test_a_dry_run_is_never_the_baseline_of_min_source_ratio(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The shrink check compares with the last real run: a smaller dry run in between does not
    lower the bar."""
    settings = make_settings(safety={"min_source_ratio": 0.5, "max_removals": 100})
    await sync(settings, store, small_roster())  # 10 enrollments
    smaller = small_roster()
    smaller.enrollments = smaller.enrollments[:6]
    dry = await sync(settings, store, smaller, dry_run=True)
    assert dry.status != "held"
    smallest = small_roster()
    smallest.enrollments = smallest.enrollments[:4]  # 4 < 0.5 * 10, though not < 0.5 * 6
    report = await sync(settings, store, smallest)
    assert report.status == "held"
    assert "4 enrollments against 10" in (report.hold_reason or "")


async def test_a_dry_run_does_not_out_date_a_held_run(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A held run stays approvable after a dry run succeeds: only a real run overtakes it."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _without_alan_and_computing(small_roster())
    held = await sync(settings, store, roster)
    assert held.status == "held"
    dry = await sync(settings, store, small_roster(), dry_run=True)
    assert dry.status == "succeeded"
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    approved = await engine.approve(held.id)
    await engine.drain()
    assert approved.status == "succeeded"
    assert users(store)["alan.turing@example.org"]["status"] == "archived"


async def test_a_dry_run_reports_the_rejections_a_real_run_would(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The provisioning rules' rejections are part of a dry run's report (they used to be
    rolled back with it, leaving `rejected: []` beside `records_rejected: 1`)."""
    settings = make_settings()
    roster = small_roster()
    roster.replace_person("t-1", email=None)
    roster.replace_person("t-2", email="N/A")
    dry = await sync(settings, store, roster, dry_run=True)
    real = await sync(settings, store, roster)
    assert dry.counts["records_rejected"] == len(dry.rejected) == 2
    assert sorted(map(str, dry.rejected)) == sorted(map(str, real.rejected))
    assert dry.status == real.status == "succeeded_with_errors"


async def test_a_held_run_keeps_its_rejections_and_approval_does_not_repeat_them(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A held run's report lists what the rules rejected; approving it (a second apply of the
    same run) lists each once."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _without_alan_and_computing(small_roster())
    roster.persons.append(RosterPerson("t-8", "teacher", "No", "Mail", None))
    roster.enrollments.append(RosterEnrollment("e-t8c1", "c-1", "t-8", "teacher"))
    held = await sync(settings, store, roster)
    assert held.status == "held"
    assert [r["sourced_id"] for r in held.rejected] == ["t-8"]
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    approved = await engine.approve(held.id)
    assert [r["sourced_id"] for r in approved.rejected] == ["t-8"]
    assert approved.counts["records_rejected"] == 1


# -- emails are identities only when valid ---------------------------------------------------


def _teaching(
    roster: MemoryRoster,
    sid: str,
    email: str | None,
    cls: str = "c-1",
    name: tuple[str, str] | None = None,
) -> None:
    given, family = name or ("T", sid.upper())
    roster.persons.append(RosterPerson(sid, "teacher", given, family, email))
    roster.enrollments.append(RosterEnrollment(f"e-{sid}-{cls}", cls, sid, "teacher"))


@pytest.mark.parametrize("placeholder", ["N/A", "none", "n/a ", "-", "ada at example.org"])
async def test_placeholder_emails_create_no_account_and_merge_nobody(
    store: Store, make_settings: Callable[..., Settings], placeholder: str
) -> None:
    """Two teachers whose email is a placeholder get no account (they used to become ONE user
    owning both teachers' classes); each is rejected with the value and the reason."""
    roster = small_roster()
    roster.replace_person("t-1", email=placeholder)
    roster.replace_person("t-3", email=placeholder)
    roster.enrollments.append(RosterEnrollment("e-s1c3", "c-3", "s-1", "student"))
    report = await sync(make_settings(), store, roster)
    assert set(users(store)) == {"alan.turing@example.org"}
    reasons = {r["sourced_id"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {"t-1", "t-3"}
    for reason in reasons.values():
        assert (
            reason is not None
            and reason.startswith("invalid email:")
            and repr(placeholder.strip()) in reason
        )
    assert report.status == "succeeded_with_errors"
    assert report.counts["records_rejected"] == 2
    assert "c-1" not in groups(store) and "c-3" not in groups(store)
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]


async def test_look_alike_characters_are_folded_before_an_email_is_compared(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """NFKC first: the Kelvin sign and full-width letters become their ASCII letters, so an
    address that renders like another is the same account (for a person of the same name);
    a Cyrillic look-alike is not an address at all."""
    roster = small_roster()
    roster.replace_person("t-1", email="\u212aATE@EXAMPLE.ORG")  # Kelvin sign K
    _teaching(roster, "t-7", "kate@example.org", name=("Ada", "Lovelace"))
    _teaching(roster, "t-8", "\uff47race@example.org")  # full-width g
    _teaching(roster, "t-9", "\u0430lan.turing@example.org")  # Cyrillic a
    report = await sync(make_settings(), store, roster)
    assert set(users(store)) == {
        "kate@example.org",
        "grace@example.org",
        "alan.turing@example.org",
    }
    assert [r["sourced_id"] for r in report.rejected] == ["t-9"]
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org", "kate@example.org"]
    assert any("kate@example.org" in w and "t-1" in w and "t-7" in w for w in report.warnings)


async def test_email_domains_reject_teachers_outside_them(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """With provisioning.email_domains set, a teacher elsewhere is rejected with that reason;
    a subdomain is another domain."""
    settings = make_settings(provisioning={"email_domains": ["Example.org"]})
    roster = small_roster()
    roster.replace_person("t-2", email="alan@gmail.com")
    _teaching(roster, "t-8", "hs@sub.example.org")
    report = await sync(settings, store, roster)
    assert set(users(store)) == {"ada@example.org"}
    reasons = {r["sourced_id"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {"t-2", "t-8"}
    why_t2 = reasons["t-2"]
    assert why_t2 is not None and "alan@gmail.com" in why_t2 and "email_domains" in why_t2


async def test_shared_email_is_one_account_and_every_merge_is_reported(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Persons of one name sharing an email (one record per school) are one account; the
    report names the email with every sourcedId and name."""
    roster = small_roster()
    _teaching(roster, "t-8", "ADA@example.org", cls="c-2", name=("ada", "LOVELACE"))
    report = await sync(make_settings(), store, roster)
    assert "ada@example.org" in users(store)
    assert len(users(store)) == 2
    warning = next(w for w in report.warnings if "ada@example.org" in w)
    assert "t-1 (Ada Lovelace)" in warning and "t-8 (ada LOVELACE)" in warning


async def test_a_person_linked_later_to_a_shared_account_is_reported(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A second person that a later run links to an account already linked to another person
    of the source is a merge too, and the report says so."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    _teaching(roster, "t-8", "ada@example.org", name=("Ada", "Lovelace"))
    report = await sync(settings, store, roster)
    assert report.counts["users_linked"] == 1
    assert any("t-1" in w and "t-8" in w and "ada@example.org" in w for w in report.warnings)


async def test_a_linked_teacher_whose_email_turns_invalid_keeps_the_account(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An account belongs to its person: a placeholder typed over a linked teacher's address is
    reported, but archives nothing and removes no group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = small_roster()
    roster.replace_person("t-1", email="N/A")
    report = await sync(settings, store, roster)
    assert report.counts["users_archived"] == 0 and report.counts["groups_removed"] == 0
    assert [r["sourced_id"] for r in report.rejected] == ["t-1"]
    assert users(store)["ada@example.org"]["status"] == "active"
    assert groups(store)["c-1"]["owners"] == ["ada@example.org"]
    assert snapshot(store)[:2] == before[:2]


# -- who counts as a teacher -------------------------------------------------------------------


async def test_an_administrator_teaching_a_class_is_not_a_teacher_by_default(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Eligibility needs a teacher role: an administrator with a teacher enrollment in a
    populated class gets no account, unless teacher_roles says administrators count."""
    roster = small_roster()
    roster.replace_person("t-1", role="administrator")
    await sync(make_settings(), store, roster)
    assert "ada@example.org" not in users(store)
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    assert "c-1" not in groups(store)
    wider = make_settings(provisioning={"teacher_roles": ["Teacher", "Administrator"]})
    await sync(wider, store, roster)
    assert users(store)["ada@example.org"]["status"] == "active"
    assert groups(store)["c-1"]["owners"] == ["ada@example.org"]


async def test_any_of_a_persons_roles_counts(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """OneRoster 1.2 roles[]: a person whose primary role is administrator but who also holds
    the teacher role (secondary) is a teacher."""
    roster = small_roster()
    roster.persons = [
        replace(p, role="administrator", other_roles=("teacher",)) if p.sourced_id == "t-1" else p
        for p in roster.persons
    ]
    await sync(make_settings(), store, roster)
    assert users(store)["ada@example.org"]["status"] == "active"
    assert groups(store)["c-1"]["owners"] == ["ada@example.org"]


async def test_a_teacher_who_becomes_an_administrator_is_archived_and_loses_groups(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A role change out of teacher_roles ends eligibility like leaving does."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.replace_person("t-1", role="administrator")
    report = await sync(settings, store, roster)
    assert report.counts["users_archived"] == 1
    assert users(store)["ada@example.org"]["status"] == "archived"
    assert "c-1" not in groups(store)
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]


async def test_narrowing_teacher_roles_takes_groups_from_users_it_keeps(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """With on_teacher_removed: keep, a config change that makes someone no longer a teacher
    keeps their account but not their groups: every linked user is resynced after a change of
    the provisioning settings, though the roster did not change."""
    roster = small_roster()
    roster.replace_person("t-1", role="administrator")
    wide = make_settings(
        provisioning={"teacher_roles": ["teacher", "administrator"], "on_teacher_removed": "keep"}
    )
    await sync(wide, store, roster)
    assert groups(store)["c-1"]["owners"] == ["ada@example.org"]
    narrow = make_settings(provisioning={"on_teacher_removed": "keep"})
    report = await sync(narrow, store, roster)
    assert users(store)["ada@example.org"]["status"] == "active"
    assert "c-1" not in groups(store)
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    assert report.counts["groups_removed"] == 1


async def test_teacher_roles_and_domains_decide_manual_teacher_import_too(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """`teachers list` offers only those the sync would accept: a teacher role and a valid
    address in the allowed domains."""
    from rostersync.importer.teachers import candidates

    settings = make_settings(
        provisioning={"auto_create_users": False, "email_domains": ["example.org"]}
    )
    roster = small_roster()
    roster.replace_person("t-1", role="administrator")
    roster.replace_person("t-3", email="grace@elsewhere.org")
    roster.enrollments.append(RosterEnrollment("e-s1c3", "c-3", "s-1", "student"))
    _teaching(roster, "t-8", "N/A")
    await sync(settings, store, roster)
    with store.read() as conn:
        assert [t.sourced_id for t in candidates(conn, "mem", settings)] == ["t-2"]


async def test_a_delta_run_keeps_a_shared_account_whose_other_person_still_teaches(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A delta run decides only for the persons it touched, yet an account shared with an
    untouched person who still teaches is not archived when the touched one stops."""
    day, later = datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 9, 2, tzinfo=UTC)
    roster = MemoryRoster(
        persons=[
            RosterPerson("t-1", "teacher", "Ada", "L", "ada@example.org", date_last_modified=day),
            RosterPerson("t-2", "teacher", "Ada", "L", "ADA@example.org", date_last_modified=day),
            RosterPerson("s-1", "student", "S", "One", None, date_last_modified=day),
        ],
        classes=[],
        enrollments=[
            RosterEnrollment("e-1", "c-1", "t-1", "teacher", date_last_modified=day),
            RosterEnrollment("e-2", "c-2", "t-2", "teacher", date_last_modified=day),
            RosterEnrollment("e-3", "c-1", "s-1", "student", date_last_modified=day),
            RosterEnrollment("e-4", "c-2", "s-1", "student", date_last_modified=day),
        ],
    )
    roster.classes = [
        RosterClass("c-1", "Algebra", date_last_modified=day),
        RosterClass("c-2", "Geometry", date_last_modified=day),
    ]
    settings = make_settings()
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster, delta=True)})
    await engine.sync("mem", mode="full")
    await engine.drain()
    assert set(groups(store)) == {"c-1", "c-2"}
    roster.enrollments = [
        replace(e, status="tobedeleted", date_last_modified=later) if e.sourced_id == "e-2" else e
        for e in roster.enrollments
    ]
    report = await engine.sync("mem", mode="delta")
    await engine.drain()
    assert report.mode == "delta" and report.counts["users_archived"] == 0
    assert users(store)["ada@example.org"]["status"] == "active"
    assert set(groups(store)) == {"c-1"}


async def test_a_value_too_long_for_its_column_rejects_its_record_alone(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A 300-character email, or a class title over 512, is one bad record: rejected with the
    column named, the same on both stores (PostgreSQL refused the value, failing the run)."""
    roster = small_roster()
    roster.replace_person("s-1", email="x" * 300 + "@example.org")
    roster.classes = [
        replace(c, title="T" * 600) if c.sourced_id == "c-2" else c for c in roster.classes
    ]
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded_with_errors"
    reasons = {r["sourced_id"]: r["reason"] for r in report.rejected}
    assert reasons == {
        "s-1": "email is longer than 256 characters",
        "c-2": "title is longer than 512 characters",
    }
    assert set(groups(store)) == {"c-1"}
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-2", "s-3"}


def test_the_row_limits_are_the_store_columns() -> None:
    """rows.MAX_CHARS (checked while rows are built) says what the staging and mirror columns
    hold, so a value that fits the check fits the store."""
    from rostersync.source.rows import MAX_CHARS
    from rostersync.store.tables import metadata
    from rostersync.sync.staging import STAGING

    for kind, limits in MAX_CHARS.items():
        for table in (STAGING[kind], metadata.tables[f"roster_{kind}"]):
            sized = {
                c.name: length
                for c in table.columns
                if (length := getattr(c.type, "length", None))
                and c.name not in ("status", "row_hash", "source")
            }
            assert sized == limits, (table.name, sized)


async def test_a_seat_freed_by_another_source_goes_to_a_teacher_waiting_in_a_delta_source(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A teacher skipped for want of a license seat gets one at the next run of their source
    once a seat is free, though that run is a delta that touches nobody."""
    day = datetime(2026, 9, 1, tzinfo=UTC)

    def school(prefix: str, teachers: int) -> MemoryRoster:
        return MemoryRoster(
            persons=[
                RosterPerson(f"{prefix}t{n}", "teacher", "T", str(n), f"{prefix}t{n}@example.org",
                             date_last_modified=day)
                for n in range(teachers)
            ] + [RosterPerson(f"{prefix}s", "student", "S", "S", None, date_last_modified=day)],
            classes=[RosterClass(f"{prefix}c", "Class", date_last_modified=day)],
            enrollments=[
                RosterEnrollment(f"{prefix}e{n}", f"{prefix}c", f"{prefix}t{n}", "teacher",
                                 date_last_modified=day)
                for n in range(teachers)
            ] + [RosterEnrollment(f"{prefix}es", f"{prefix}c", f"{prefix}s", "student",
                                  date_last_modified=day)],
        )  # fmt: skip

    settings = make_settings(
        memory_sources=("mem", "other"),
        license_limit=2,
        safety={"min_source_ratio": 0, "max_removal_percent": 100},
    )
    mine, theirs = school("m", 2), school("o", 1)
    engine = SyncEngine(
        settings,
        store,
        connectors={
            "mem": MemoryConnector(mine, delta=True),
            "other": MemoryConnector(theirs),
        },
    )
    await engine.sync("other")
    first = await engine.sync("mem", mode="full")
    assert first.counts["users_skipped_license"] == 1
    theirs.enrollments = []
    await engine.sync("other", mode="full")
    assert users(store)["ot0@example.org"]["status"] == "archived"
    report = await engine.sync("mem", mode="delta")
    assert report.mode == "delta" and report.counts["users_created"] == 1
    assert any("license seats are free" in w for w in report.warnings)
    assert {e for e, u in users(store).items() if u["status"] == "active"} == {
        "mt0@example.org",
        "mt1@example.org",
    }
