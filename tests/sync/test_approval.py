"""Rejections, failures, held runs, their approval, and dry runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import structlog.testing
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.errors import RunStateError
from rostersync.source.records import MemoryRoster, Rejected
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import load_report
from tests.sync.helpers import add_import_owner, groups, snapshot, sync, users


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


async def test_a_rejection_naming_a_record_past_the_columns_is_reported_cut_to_them(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A connector's rejection whose id or location is longer than the report's columns is
    stored cut to them; on PostgreSQL the insert failed the whole run."""
    roster = small_roster()
    roster.rejected.append(Rejected("user", "x" * 300, "unknown status 'zombie'", "l" * 600))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded_with_errors"
    (rejected,) = report.rejected
    assert (rejected["sourced_id"], rejected["location"]) == ("x" * 256, "l" * 512)


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


def _without_t2_and_c2_students() -> MemoryRoster:
    """The small roster without teacher t-2 and the students of c-2: more removals than
    ``max_removals: 1`` allows, so a run is held."""
    roster = small_roster()
    roster.enrollments = [
        e
        for e in roster.enrollments
        if (e.role == "teacher" or e.class_id != "c-2") and e.user_id != "t-2"
    ]
    return roster


async def test_removals_over_threshold_hold_the_run_until_approved(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A run removing more than max_removals is held with nothing applied; approval applies it."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = _without_t2_and_c2_students()
    report = await sync(settings, store, roster)
    assert report.status == "held"
    assert "max_removals" in (report.hold_reason or "")
    assert snapshot(store) == before
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    # A logger of its own: the global configuration (a CLI test's) may filter by level.
    capture = structlog.testing.LogCapture()
    engine.log = structlog.wrap_logger(
        structlog.PrintLogger(), processors=[capture], wrapper_class=structlog.BoundLogger
    )
    approved = await engine.approve(report.id)
    logged = capture.entries
    await engine.drain()
    assert approved.status == "succeeded"
    assert users(store)["alan.turing@example.org"]["status"] == "archived"
    assert "c-2" not in groups(store)
    # The log brackets the apply: an operator (and the kill test) sees it start and end.
    events = [(e["event"], e.get("run_id")) for e in logged if e["event"].startswith("held_run")]
    assert events == [
        ("held_run_approval_started", report.id),
        ("held_run_approved", report.id),
    ]


def _jobs(store: Store) -> list[tuple[Any, ...]]:
    """Every resync job row, to see that a run queued none."""
    with store.read() as conn:
        rows = conn.execute(text("SELECT id, user_id, state, run_id FROM resync_job ORDER BY id"))
        return [tuple(r) for r in rows]


async def test_a_held_or_dry_run_counts_the_resyncs_its_approval_queues(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The counts of a held or dry run are what it would have done (README, "Run reports"):
    its ``resync_queued`` is the number of resync jobs the approval then queues, though it
    queues none itself. It said 0, and the approval of the same run said 2 (a dry run a real
    run would hold, without --changes, said 0 too). A dry run, held-like or not, with or
    without --changes, counts the same and writes nothing."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    before, jobs = snapshot(store), _jobs(store)
    roster = _without_t2_and_c2_students()
    dry_counts = []
    for dry_settings, changes in (
        (settings, False),  # "a real run would be held", the plain way
        (settings, True),
        (make_settings(), False),  # within the default limits: not held
        (make_settings(), True),
    ):
        dry = await sync(dry_settings, store, roster, dry_run=True, changes=changes)
        assert dry.status == ("held" if dry_settings is settings else "succeeded")
        dry_counts.append(dry.counts["resync_queued"])
        assert (snapshot(store), _jobs(store)) == (before, jobs)
    held = await sync(settings, store, roster)
    assert held.status == "held" and "max_removals" in (held.hold_reason or "")
    assert (snapshot(store), _jobs(store)) == (before, jobs)  # it queued nothing
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    approved = await engine.approve(held.id)
    assert approved.status == "succeeded"
    queued = approved.counts["resync_queued"]
    assert queued > 0
    assert held.counts["resync_queued"] == queued
    assert dry_counts == [queued] * 4
    with store.read() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM resync_job WHERE run_id = :r"), {"r": held.id}
        ).scalar_one()
    assert n == queued  # the approval queued them, one job per user


@pytest.mark.parametrize("coach", [True, False], ids=["import-owner", "roster-only"])
async def test_a_group_an_import_owner_keeps_is_no_removal_for_the_safety_rules(
    store: Store, make_settings: Callable[..., Settings], coach: bool
) -> None:
    """A group an admin gave an owner by import keeps that owner when its class loses its
    last teacher (resyncs release roster ownerships alone), so the group stays and the run
    removes nothing: with ``max_removals: 0`` it is not held. Without that owner the same
    run removes the group, and is held for it."""
    settings = make_settings(safety={"max_removals": 0})
    await sync(settings, store, small_roster())
    if coach:
        with store.write() as conn:
            add_import_owner(conn, "coach@example.org", "c-1")
    roster = small_roster()  # Ada no longer teaches c-1; she still co-teaches c-2
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c1"]
    report = await sync(settings, store, roster)
    if not coach:
        assert report.status == "held" and report.counts["groups_removed"] == 1
        assert "max_removals" in (report.hold_reason or "")
        return
    assert report.status == "succeeded", report.hold_reason
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.drain()
    assert groups(store)["c-1"]["owners"] == ["coach@example.org"]
    assert users(store)["ada@example.org"]["status"] == "active"


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


@pytest.mark.parametrize("applied", [True, False], ids=["apply ends well", "apply fails"])
async def test_an_approval_stopped_while_its_apply_runs_ends_as_the_apply_does(
    store: Store,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    applied: bool,
) -> None:
    """Ctrl-C or a stopping daemon cancels an approval whose apply runs in its thread, where
    it cannot be cut off: the approval waits for it, and the run is what the apply made it
    (applied, or held again with nothing changed), never held with its changes applied."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _without_t2_and_c2_students()
    held = await sync(settings, store, roster)
    assert held.status == "held"
    before = snapshot(store)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    inside, go_on = threading.Event(), threading.Event()
    original = engine._apply_in

    def slow_apply_in(conn: Any, ctx: Any) -> Any:
        inside.set()  # inside the apply's transaction, holding the write lock
        go_on.wait(10)
        if not applied:
            raise RuntimeError("the apply failed")
        return original(conn, ctx)

    monkeypatch.setattr(engine, "_apply_in", slow_apply_in)
    approval = asyncio.create_task(engine.approve(held.id))
    await asyncio.to_thread(inside.wait, 10)
    approval.cancel()
    await asyncio.sleep(0.2)  # the cancelled approval reacts before the apply ends
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await approval
    with store.read() as conn:
        report = load_report(conn, held.id)
    if applied:
        assert report.status == "succeeded"
        assert users(store)["alan.turing@example.org"]["status"] == "archived"
    else:
        assert report.status == "held"
        assert report.approved_at is None
        assert snapshot(store) == before
