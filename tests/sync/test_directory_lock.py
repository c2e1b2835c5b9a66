"""PostgreSQL: a sync's apply and the resync batches take turns on the group directory.

Under READ COMMITTED a sync committing between a resync's statements could have its change
marks cleared, or its member updates undone, by a resync working from an older read
(see rostersync.store.db.lock_directory). These tests hold the lock the way the other side
would and check that the sync, or the resync batch, waits for it and then does its work.
SQLite has no such test: its writers take turns by design (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from sqlalchemy import Connection, text

from rostersync.config.models import Settings
from rostersync.resync.members import sync_members
from rostersync.resync.queue import queue_resync
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store, lock_directory
from rostersync.sync.engine import SyncEngine
from tests.sync.helpers import groups, sync, user_id

pytestmark = pytest.mark.postgres

WAITING = (
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = :kind AND NOT l.granted AND a.datname = current_database()"
)


async def waits_for_lock(store: Store, task: asyncio.Task[Any], kind: str = "advisory") -> None:
    """Return once another backend waits for a lock of this kind (fail if `task` ends first)."""
    for _ in range(400):
        if task.done():
            pytest.fail(f"the task did not wait for a {kind} lock: {task.result()!r}")
        with store.read() as conn:
            if conn.execute(text(WAITING), {"kind": kind}).scalar_one() > 0:
                return
        await asyncio.sleep(0.05)
    pytest.fail(f"nobody waited for a {kind} lock within 20 s")


async def while_locked(
    store: Store,
    exclusive: bool,
    work: Callable[[], Coroutine[Any, Any, Any]],
    *,
    prepare: Callable[[Connection], object] = lambda conn: None,
    kind: str = "advisory",
) -> tuple[Any, Any]:
    """Run `work` while this test holds the directory lock (and has run `prepare` in the same
    open transaction); what `work` saw while blocked on a `kind` lock (the groups), and its
    result once the test commits."""
    with store.engine.connect() as holder:
        transaction = holder.begin()
        lock_directory(holder, exclusive=exclusive)
        prepare(holder)
        task = asyncio.create_task(work())
        await waits_for_lock(store, task, kind)
        seen = groups(store)
        transaction.commit()
    return seen, await asyncio.wait_for(task, timeout=60)


async def queued(settings: Settings, store: Store) -> SyncEngine:
    """The small roster synced with its resync jobs left queued; an engine to drain them."""
    await sync(settings, store, small_roster(), drain=False)
    return SyncEngine(settings, store, connectors={"mem": MemoryConnector(small_roster())})


async def test_resync_batch_waits_for_a_sync_applying(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    engine = await queued(make_settings(), pg_store)
    seen, done = await while_locked(pg_store, True, engine.drain)
    assert seen == {}  # nothing materialised while the sync held the lock
    assert done == 2
    assert set(groups(pg_store)) == {"c-1", "c-2"}


async def test_sync_apply_waits_for_a_resync_batch(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    await sync(settings, pg_store, small_roster())
    roster = small_roster()
    roster.replace_person("s-1", given_name="Renamed")

    async def second_sync() -> Any:
        return await sync(settings, pg_store, roster)

    seen, report = await while_locked(pg_store, False, second_sync)
    names = {m["sourced_id"]: m["name"] for m in seen["c-1"]["members"]}
    assert names["s-1"] != "Renamed Dent"  # the apply had not run yet
    assert report.status == "succeeded" and report.counts["groups_updated"] == 1
    names = {m["sourced_id"]: m["name"] for m in groups(pg_store)["c-1"]["members"]}
    assert names["s-1"] == "Renamed Dent"


async def test_resync_batches_do_not_wait_for_each_other(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The shared lock of one batch lets another batch through (several workers drain)."""
    engine = await queued(make_settings(), pg_store)
    with pg_store.engine.connect() as holder, holder.begin():
        lock_directory(holder, exclusive=False)
        assert await asyncio.wait_for(engine.drain(), timeout=60) == 2
    assert set(groups(pg_store)) == {"c-1", "c-2"}


async def test_two_batches_creating_one_group_both_succeed(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Resync batches run side by side on PostgreSQL. When another batch is creating the group
    of a co-taught class (c-2) at the same time, this one waits for it, takes the group as it
    is (members included) and adds its owner, instead of failing on the unique key."""
    engine = await queued(make_settings(), pg_store)

    def other_batch_creates_c2(conn: Connection) -> None:  # committed after the drain waits
        gid = conn.execute(
            text(
                "INSERT INTO groups (source, external_id, name, created_at, updated_at) "
                "VALUES ('mem', 'c-2', 'Geometry', now(), now()) RETURNING id"
            )
        ).scalar_one()
        sync_members(conn, [gid], new=True)

    _, done = await while_locked(
        pg_store, False, engine.drain, prepare=other_batch_creates_c2, kind="transactionid"
    )
    assert done == 2
    with pg_store.read() as conn:
        jobs = conn.execute(text("SELECT state, attempts FROM resync_job")).all()
    assert [tuple(j) for j in jobs] == [("succeeded", 1), ("succeeded", 1)]  # one attempt each
    got = groups(pg_store)
    assert set(got) == {"c-1", "c-2"}
    assert got["c-2"]["owners"] == ["ada@example.org", "alan.turing@example.org"]
    assert got["c-2"]["members"] and got["c-1"]["members"]


async def test_two_batches_adding_one_member_both_succeed(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Two batches re-reading the members of one co-taught group may both find a student
    missing. When the other batch is adding that member at the same time, this one waits
    for it and leaves the row as the other wrote it, instead of failing on the key."""
    settings = make_settings()
    await sync(settings, pg_store, small_roster())
    with pg_store.write() as conn:
        gid = conn.execute(text("SELECT id FROM groups WHERE external_id = 'c-2'")).scalar_one()
        member = conn.execute(
            text("SELECT sourced_id, email, name FROM group_member WHERE group_id = :g LIMIT 1"),
            {"g": gid},
        ).one()
        conn.execute(
            text("DELETE FROM group_member WHERE group_id = :g AND sourced_id = :s"),
            {"g": gid, "s": member.sourced_id},
        )
        queue_resync(conn, [user_id(conn, "ada@example.org")], reason="manual", run_id=None)
    engine = SyncEngine(settings, pg_store, connectors={"mem": MemoryConnector(small_roster())})

    def other_batch_adds_it(conn: Connection) -> None:  # committed after the drain waits
        conn.execute(
            text(
                "INSERT INTO group_member (group_id, sourced_id, email, name) VALUES (:g, :s, :e, :n)"
            ),
            {"g": gid, "s": member.sourced_id, "e": member.email, "n": member.name},
        )

    _, done = await while_locked(
        pg_store, False, engine.drain, prepare=other_batch_adds_it, kind="transactionid"
    )
    assert done == 1
    with pg_store.read() as conn:
        jobs = conn.execute(
            text("SELECT state, attempts FROM resync_job WHERE run_id IS NULL")
        ).all()
    assert [tuple(j) for j in jobs] == [("succeeded", 1)]  # no unique violation, no retry
    members = [m["sourced_id"] for m in groups(pg_store)["c-2"]["members"]]
    assert members.count(member.sourced_id) == 1
