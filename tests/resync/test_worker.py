"""The resync workers' batches and drain after a sync, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.resync import worker as worker_module
from rostersync.resync.groups import rebuild_groups
from rostersync.resync.queue import queue_resync
from rostersync.source.records import (
    MemoryRoster,
    Rejected,
    RosterEnrollment,
    TeacherRef,
    TeacherRoster,
)
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import merge as merging
from rostersync.sync.engine import SyncEngine
from tests.sync.helpers import add_import_owner, add_user, groups, live_resync, sync, user_id


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


def enrollment_status(store: Store, sourced_id: str) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT status FROM roster_enrollment WHERE source = 'mem' AND sourced_id = :s"
                ),
                {"s": sourced_id},
            ).scalar_one()
        )


async def test_a_full_sync_replaces_what_a_live_resync_marked_tobedeleted(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live resync marks a student missing from the teacher's live roster, and a class the
    teacher no longer teaches, ``tobedeleted``; the next full sync of the unchanged source
    brings both enrollments back, and the group's members and owners with them. The marked
    rows used to keep the source's fingerprint, so the full sync took them for unchanged and the
    live view stayed for ever."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    live = small_roster()
    live.enrollments = [e for e in live.enrollments if e.sourced_id not in ("e-s1c1", "e-t1c2")]
    await live_resync(store, settings, live)
    assert enrollment_status(store, "e-s1c1") == "tobedeleted"
    assert enrollment_status(store, "e-t1c2") == "tobedeleted"
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-2", "s-3"}
    assert groups(store)["c-2"]["owners"] == ["alan.turing@example.org"]
    await sync(settings, store, small_roster())
    assert enrollment_status(store, "e-s1c1") == "active"
    assert enrollment_status(store, "e-t1c2") == "active"
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
    assert groups(store)["c-2"]["owners"] == ["ada@example.org", "alan.turing@example.org"]


async def test_a_full_sync_replaces_what_a_live_resync_reactivated(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An enrollment the source's feed has ``tobedeleted`` but its live answer has again is
    re-activated by the live resync, and ``tobedeleted`` again after the next full sync of the
    unchanged feed."""
    settings = make_settings()
    feed = small_roster()
    feed.enrollments = [
        replace(e, status="tobedeleted") if e.sourced_id == "e-s1c1" else e
        for e in feed.enrollments
    ]
    await sync(settings, store, feed)
    assert enrollment_status(store, "e-s1c1") == "tobedeleted"
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-2", "s-3"}
    await live_resync(store, settings, small_roster())
    assert enrollment_status(store, "e-s1c1") == "active"
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
    await sync(settings, store, feed)
    assert enrollment_status(store, "e-s1c1") == "tobedeleted"
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-2", "s-3"}


async def test_live_resync_failure_is_retried_then_failed(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live fetch that fails leaves the job queued with its error, then failed after max_attempts."""

    settings = make_settings(resync={"max_attempts": 2, "backoff": 0})
    await sync(settings, store, small_roster())

    class Broken(MemoryConnector):
        async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
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


@pytest.mark.parametrize("same_run", [True, False], ids=["teacher-leaves-too", "afterwards"])
async def test_a_group_import_owners_alone_keep_follows_its_class(
    store: Store, make_settings: Callable[..., Settings], same_run: bool
) -> None:
    """Once its teachers are gone, a group an admin gave an owner by import still takes its
    class's title and students: from the resync that releases its last teacher when the class
    changed in that run, and from each later sync that changes the class (no teacher's resync
    reads it any more)."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    with store.write() as conn:
        add_import_owner(conn, "coach@example.org", "c-1")
    roster = small_roster()  # Ada stops teaching c-1 (she keeps c-2)
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c1"]
    before = {m["sourced_id"] for m in groups(store)["c-1"]["members"]}
    if not same_run:
        await sync(settings, store, roster)
        assert groups(store)["c-1"]["owners"] == ["coach@example.org"]
    gone = sorted(before)[0]
    roster.enrollments = [e for e in roster.enrollments if (e.class_id, e.user_id) != ("c-1", gone)]
    roster.classes = [
        replace(c, title="Algebra II") if c.sourced_id == "c-1" else c for c in roster.classes
    ]
    report = await sync(settings, store, roster)
    assert report.status == "succeeded"
    group = groups(store)["c-1"]
    assert group["owners"] == ["coach@example.org"]
    assert group["name"] == "Algebra II"
    assert {m["sourced_id"] for m in group["members"]} == before - {gone}
    assert report.counts["groups_updated"] >= 1


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
    and reaches the caller as it was raised. (The first batch runs alone, then the workers
    side by side.)"""
    settings = make_settings(resync={"batch_size": 1, "workers": 3})
    await sync(settings, store, small_roster(), drain=False)
    engine = SyncEngine(settings, store)
    calls = 0
    cancelled: list[bool] = []

    async def failing() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return [("a job", "succeeded")]
        if calls == 2:
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


@pytest.mark.postgres
async def test_batches_side_by_side_releasing_a_groups_last_owners_remove_it(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Ada and Alan both leave Computing, which they co-teach; their resyncs run in two
    batches at once. Each batch saw the other's ownership, not yet deleted for it, and kept
    the group: Computing stayed with no owner (every time, on PostgreSQL). Now the second
    waits for the first and removes it."""
    settings = make_settings(resync={"batch_size": 1, "workers": 2})
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id not in ("t-1", "t-2")]
    await sync(settings, store, roster, drain=False)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    outcomes = await asyncio.gather(engine.process_batch(), engine.process_batch())
    assert [o for batch in outcomes for _, o in batch] == ["succeeded", "succeeded"]
    await engine.drain()
    assert groups(store) == {}


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
    real_refresh, real_rebuild = merging.refresh_directory_statistics, rebuild_groups

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


class _Unreadable(MemoryConnector):
    """A live answer in which the connector could not read some records: they are missing
    from it and listed as rejected, as OneRoster's connector answers for a malformed class or
    user."""

    def __init__(
        self, roster: MemoryRoster, rejected: list[Rejected], *, drop: tuple[str, ...] = ()
    ) -> None:
        super().__init__(roster)
        self.rejected = rejected
        self.drop = set(drop)  # the ids of the classes, persons and enrollments not read

    async def fetch_teacher(self, teacher: TeacherRef) -> TeacherRoster:
        answer = await super().fetch_teacher(teacher)
        kept = [
            e for e in answer.enrollments if not {e.class_id, e.user_id, e.sourced_id} & self.drop
        ]
        return TeacherRoster(
            teacher=answer.teacher,
            classes=[c for c in answer.classes if c.sourced_id not in self.drop],
            enrollments=kept,
            persons=[p for p in answer.persons if p.sourced_id not in self.drop],
            rejected=list(self.rejected),
        )


UNREADABLE = {
    "a class, by id": ([Rejected("class", "c-2", "no title")], ("c-2",)),
    "a class without its id": ([Rejected("class", None, "not a JSON object")], ("c-2",)),
    "a student, by id": ([Rejected("user", "s-1", "no role")], ("s-1",)),
    "a student without its id": ([Rejected("user", None, "not a JSON object")], ("s-1",)),
    "an enrollment": ([Rejected("enrollment", "e-s1c1", "bad status")], ("e-s1c1",)),
    "an enrollment naming its user": (
        [Rejected("enrollment", "e-s1c1", "no class", user_id="s-1")],
        ("e-s1c1",),
    ),
    "an enrollment naming its class": (
        [Rejected("enrollment", "e-s1c1", "no user", class_id="c-1")],
        ("e-s1c1",),
    ),
    "the teacher's enrollment naming its user": (
        [Rejected("enrollment", "e-t1c2", "bad primary", user_id="t-1")],
        ("e-t1c2",),
    ),
}


@pytest.mark.parametrize("case", UNREADABLE)
async def test_a_live_answer_takes_no_record_it_could_not_read_for_gone(
    store: Store, make_settings: Callable[..., Settings], case: str
) -> None:
    """A record the connector rejects in a live answer is not one the source dropped: the
    teacher keeps the class, the student stays a member (a sync keeps a rejected record's
    rows too; the next full run decides). The live apply took every record missing from the
    answer for gone, so one malformed class removed its group from the teacher."""
    rejected, drop = UNREADABLE[case]
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = {c: (set(g["owners"]), len(g["members"])) for c, g in groups(store).items()}
    with store.write() as conn:
        queue_resync(
            conn, [user_id(conn, "ada@example.org")], reason="manual", run_id=None, live=True
        )
    connector = _Unreadable(small_roster(), rejected, drop=drop)
    engine = SyncEngine(settings, store, connectors={"mem": connector})
    assert [o for _, o in await engine.process_batch()] == ["succeeded"]
    after = {c: (set(g["owners"]), len(g["members"])) for c, g in groups(store).items()}
    assert after == before


@pytest.mark.parametrize("drop", ["c-2", "s-1"])
async def test_a_record_missing_from_a_live_answer_without_a_rejection_is_gone(
    store: Store, make_settings: Callable[..., Settings], drop: str
) -> None:
    """The other side: a class or student simply absent from the answer is gone from the
    teacher's groups."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    await live_resync(store, settings, small_roster())  # nothing changed: nothing moves
    before = groups(store)
    with store.write() as conn:
        queue_resync(
            conn, [user_id(conn, "ada@example.org")], reason="manual", run_id=None, live=True
        )
    connector = _Unreadable(small_roster(), [], drop=(drop,))
    engine = SyncEngine(settings, store, connectors={"mem": connector})
    assert [o for _, o in await engine.process_batch()] == ["succeeded"]
    after = groups(store)
    if drop == "c-2":
        assert len(after["c-2"]["owners"]) == len(before["c-2"]["owners"]) - 1
    else:
        assert {m["sourced_id"] for m in after["c-1"]["members"]} == {
            m["sourced_id"] for m in before["c-1"]["members"]
        } - {"s-1"}


@pytest.mark.parametrize("drop", ["e-s1c1", "e-t1c2"])
async def test_a_rejected_enrollment_keeps_only_the_rows_it_may_be(
    store: Store, make_settings: Callable[..., Settings], drop: str
) -> None:
    """A rejected enrollment that names its class or user (another student's row without a
    class; a row of another class) is not one of the rows the answer lacks: Ada's answer
    without s-1's enrollment in Algebra I, or without her own in Computing, drops them. One
    rejected row anywhere used to stop every live resync from dropping anything."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = groups(store)
    with store.write() as conn:
        queue_resync(
            conn, [user_id(conn, "ada@example.org")], reason="manual", run_id=None, live=True
        )
    elsewhere = [
        Rejected("enrollment", "e-x1", "no class", user_id="s-5"),
        Rejected("enrollment", "e-x2", "bad role", class_id="c-3", user_id="s-1"),
        Rejected("enrollment", "e-x3", "no user", class_id="c-3"),
    ]
    connector = _Unreadable(small_roster(), elsewhere, drop=(drop,))
    engine = SyncEngine(settings, store, connectors={"mem": connector})
    assert [o for _, o in await engine.process_batch()] == ["succeeded"]
    after = groups(store)
    if drop == "e-s1c1":
        assert {m["sourced_id"] for m in after["c-1"]["members"]} == {
            m["sourced_id"] for m in before["c-1"]["members"]
        } - {"s-1"}
    else:
        assert after["c-2"]["owners"] == ["alan.turing@example.org"]
        assert "ada@example.org" in before["c-2"]["owners"]


def job_results(store: Store) -> list[dict[str, Any]]:
    from rostersync import directory

    with store.read() as conn:
        return [j["result"] for j in sorted(directory.list_jobs(conn), key=lambda j: j["id"])]


async def test_a_live_jobs_result_counts_the_records_its_answer_rejected(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A live job's result says how many records the connector rejected in its answer (0 when
    none); a resync without --live keeps the result it had. The rejections were reported
    nowhere."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    reasons = [Rejected("user", f"s-{i}", "no role", f"users.csv line {i}") for i in range(7)]
    await live_resync(store, settings, small_roster(), rejected=reasons)
    await live_resync(store, settings, small_roster())
    with store.write() as conn:
        queue_resync(conn, [user_id(conn, "ada@example.org")], reason="manual", run_id=None)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(small_roster())})
    assert [o for _, o in await engine.process_batch()] == ["succeeded"]
    live_rejected, live_clean, plain = job_results(store)[-3:]
    assert live_rejected["records_rejected"] == 7
    assert live_clean["records_rejected"] == 0
    assert "records_rejected" not in plain and "groups_created" in plain


async def test_a_live_answer_with_rejections_logs_a_scrubbed_warning(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """`live_answer_rejected` names the user, the source, the count and the first few
    reasons with their locations, with secrets scrubbed; an answer without rejections logs
    none."""
    from structlog.testing import capture_logs

    settings = make_settings()
    await sync(settings, store, small_roster())
    reasons = [
        Rejected("class", "c-2", "bad href ?password=hunter22x", "classes.csv line 3"),
        *[Rejected("enrollment", None, "no role") for _ in range(9)],
    ]
    with capture_logs() as logs:
        await live_resync(store, settings, small_roster())
    assert not [e for e in logs if e["event"] == "live_answer_rejected"]
    with capture_logs() as logs:
        await live_resync(store, settings, small_roster(), rejected=reasons)
    [event] = [e for e in logs if e["event"] == "live_answer_rejected"]
    with store.read() as conn:
        assert event["user_id"] == user_id(conn, "ada@example.org")
    assert (event["log_level"], event["source"], event["count"]) == ("warning", "mem", 10)
    assert event["reasons"][0] == ("class c-2: bad href ?password=[redacted] (classes.csv line 3)")
    assert event["reasons"][1:] == ["enrollment (no id): no role"] * 4
    assert "hunter22x" not in repr(logs)


async def test_postgresql_fills_new_groups_costing_pages_as_in_memory(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The member fill of new groups runs at a random_page_cost of 1.1, so that PostgreSQL
    finds a batch's classes through the class index instead of hashing every enrollment of
    the source (at district L, once per batch of a first load's drain), and puts the setting
    back for the rest of the batch's transaction; the members are the classes' students."""
    from sqlalchemy import event

    from rostersync.resync.members import MEMBER_FILL_PAGE_COST

    sent: list[str] = []
    event.listen(pg_store.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    report = await sync(make_settings(), pg_store, small_roster())
    assert report.status == "succeeded"
    fills = [i for i, sql in enumerate(sent) if sql.startswith("INSERT INTO group_member")]
    assert fills
    for i in fills:
        assert sent[i - 1] == f"SET LOCAL random_page_cost = {MEMBER_FILL_PAGE_COST}"
        assert sent[i + 1] == "SET LOCAL random_page_cost TO DEFAULT"
    with pg_store.write() as conn:
        default = conn.execute(text("SHOW random_page_cost")).scalar_one()
        conn.execute(text(f"SET LOCAL random_page_cost = {MEMBER_FILL_PAGE_COST}"))
        conn.execute(text("SET LOCAL random_page_cost TO DEFAULT"))
        assert conn.execute(text("SHOW random_page_cost")).scalar_one() == default
    assert {m["sourced_id"] for m in groups(pg_store)["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
