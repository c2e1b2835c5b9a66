"""Source leases: a dead holder on this host loses its lease at once, a live one keeps it, a
holder elsewhere keeps it while it beats; a run whose lease was taken can no longer apply."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from rostersync.config.models import Settings
from rostersync.daemon import procs
from rostersync.daemon.recovery import hold_lease, interrupt_runs
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.records import MemoryRoster, RosterRecord
from rostersync.source.rows import sort_batch
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store, as_utc, utcnow
from rostersync.sync.engine import SyncEngine
from rostersync.sync.leasing import SourceBusy
from tests.daemon.conftest import wait_until
from tests.recovery.conftest import (
    Holder,
    dead_pid,
    lease,
    lease_owner,
    local_holder,
    register,
    remote_holder,
    run_row,
    running_run,
    staged_rows,
)
from tests.sync.helpers import users


class GatedConnector(MemoryConnector):
    """Serves its first batch, then waits for ``gate`` before the rest (a run caught mid-fetch)."""

    def __init__(self, roster: MemoryRoster) -> None:
        super().__init__(roster, batch_size=5)
        self.gate = asyncio.Event()
        self.fetching = asyncio.Event()

    async def fetch(
        self, mode: FetchMode, since: datetime | None
    ) -> AsyncIterator[Sequence[RosterRecord]]:
        first = True
        async for batch in super().fetch(mode, since):
            yield batch
            if first:
                first = False
                self.fetching.set()
                await self.gate.wait()


def engine(
    settings: Settings,
    store: Store,
    *,
    owner: str | None = None,
    connector: Connector | None = None,
    **kw: Any,
) -> SyncEngine:
    connector = connector or MemoryConnector(small_roster())
    return SyncEngine(settings, store, connectors={"mem": connector}, owner=owner, **kw)


def lease_expiry(store: Store, source: str = "mem") -> datetime | None:
    with store.read() as conn:
        return as_utc(
            conn.execute(
                text("SELECT expires_at FROM source_lease WHERE source = :s"), {"s": source}
            ).scalar()
        )


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "unregistered"])
async def test_a_dead_local_holder_loses_its_lease_at_once_and_its_run_fails(
    store: Store, make_settings: Callable[..., Settings], registered: bool
) -> None:
    """A lease held by a process of this host that is gone is taken over at once (logged); its run
    fails as interrupted, its staging is cleared, and the new run succeeds."""
    gone = local_holder(dead_pid(), started=1)
    if registered:
        register(store, gone)
    lease(store, "mem", gone.owner, timedelta(minutes=30))
    old = running_run(store, "mem")
    with capture_logs() as logs:
        report = await engine(make_settings(), store).sync("mem")
    assert report.status == "succeeded"
    status, error = run_row(store, old)
    assert status == "failed" and error is not None and error.startswith("interrupted")
    assert gone.owner in error
    assert staged_rows(store, old) == 0
    taken = [e for e in logs if e["event"] == "sync_lease_taken_over"]
    assert taken and taken[0]["previous_owner"] == gone.owner
    assert taken[0]["interrupted_runs"] == [old]
    assert lease_owner(store, "mem") is None  # given back after the run


async def test_a_live_local_holder_keeps_its_lease_even_when_it_has_expired(
    store: Store, make_settings: Callable[..., Settings], sleeper: subprocess.Popen[bytes]
) -> None:
    """A process of this host that still runs is never overtaken, however late its renewal."""
    alive = local_holder(sleeper.pid)
    register(store, alive)
    lease(store, "mem", alive.owner, timedelta(minutes=-10))
    old = running_run(store, "mem")
    with pytest.raises(SourceBusy, match=f"being synced by {alive.owner}"):
        await engine(make_settings(), store).sync("mem")
    assert run_row(store, old) == ("running", None)
    assert staged_rows(store, old) == 3


async def test_a_reused_pid_does_not_keep_the_dead_holders_lease(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The holder's pid runs again, but as a process that started later: the holder is gone."""
    me = procs.ProcessId.current()
    assert me.started is not None
    recycled = Holder("old-owner", socket.gethostname(), me.pid, me.started - 1, me.scope)
    register(store, recycled)
    lease(store, "mem", recycled.owner, timedelta(minutes=30))
    old = running_run(store, "mem")
    report = await engine(make_settings(), store).sync("mem")
    assert report.status == "succeeded"
    assert run_row(store, old)[0] == "failed"


async def test_a_remote_holder_keeps_its_lease_until_it_expires_then_loses_it(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A lease of another host blocks the source while it is fresh and is taken over once expired."""
    far = remote_holder()
    register(store, far)
    lease(store, "mem", far.owner, timedelta(minutes=1))
    old = running_run(store, "mem")
    with pytest.raises(SourceBusy, match="being synced by far-away:4242"):
        await engine(make_settings(), store).sync("mem")
    with store.write() as conn:
        conn.execute(
            text("UPDATE source_lease SET expires_at = :e"), {"e": utcnow() - timedelta(seconds=1)}
        )
    with capture_logs() as logs:
        report = await engine(make_settings(), store).sync("mem")
    assert report.status == "succeeded"
    status, error = run_row(store, old)
    assert status == "failed" and error is not None and error.startswith("interrupted: far-away")
    taken = next(e for e in logs if e["event"] == "sync_lease_taken_over")
    assert "expired" in taken["reason"]


async def test_a_running_sync_beats_so_another_host_cannot_take_it_and_a_taken_run_never_applies(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """While a run lives its lease is renewed every quarter of leases.expire_after; once the beats
    stop it expires, another process takes the source over, and the first run, resumed, fails
    as interrupted without applying anything."""
    settings = make_settings(leases={"expire_after": "1s"})
    gated = GatedConnector(small_roster())
    first = engine(settings, store, owner="far-away:7", connector=gated)
    task = asyncio.create_task(first.sync("mem"))
    await asyncio.wait_for(gated.fetching.wait(), 30)
    # The first engine runs in this process; make its registry row say "another host".
    with store.write() as conn:
        conn.execute(
            text("UPDATE instance SET host = 'far-away', pid_scope = 'elsewhere' WHERE id = :o"),
            {"o": "far-away:7"},
        )
    taken_at = lease_expiry(store)
    assert taken_at is not None
    await asyncio.to_thread(
        wait_until, lambda: (lease_expiry(store) or taken_at) > taken_at, 10, "a heartbeat"
    )
    with pytest.raises(SourceBusy, match="being synced by far-away:7"):
        await engine(settings, store).sync("mem")

    first._keepers["mem"].stop()  # the first host hangs: no more beats
    await asyncio.to_thread(
        wait_until, lambda: (lease_expiry(store) or utcnow()) < utcnow(), 10, "the lease to expire"
    )
    second = await engine(settings, store, connector=MemoryConnector(MemoryRoster())).sync("mem")
    assert second.status in ("held", "succeeded")  # an empty pull: nothing to apply either way
    assert users(store) == {}

    gated.gate.set()
    report = await asyncio.wait_for(task, 60)
    assert report.status == "failed"
    assert report.error is not None and report.error.startswith("interrupted")
    assert users(store) == {}  # the first run's fetch was never applied


async def test_a_cancelled_sync_fails_its_run_as_interrupted_and_frees_the_source(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A sync cancelled mid-fetch (the daemon's stop cutting it off) records why and leaves no staging."""
    gated = GatedConnector(small_roster())
    cut = engine(make_settings(), store, connector=gated, interrupted_by="the daemon stopped")
    task = asyncio.create_task(cut.sync("mem"))
    await asyncio.wait_for(gated.fetching.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with store.read() as conn:
        run_id = conn.execute(text("SELECT max(id) FROM sync_run")).scalar_one()
    assert run_row(store, run_id) == ("failed", "interrupted: the daemon stopped")
    assert staged_rows(store, run_id) == 0
    assert lease_owner(store, "mem") is None
    assert (await engine(make_settings(), store).sync("mem")).status == "succeeded"


@pytest.mark.postgres
async def test_postgres_a_source_whose_holder_is_applying_is_busy_at_once(
    pg_store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An apply keeps its lease row locked: another process is told the source is busy, without waiting."""
    gone = local_holder(dead_pid())
    lease(pg_store, "mem", gone.owner, timedelta(minutes=-1))
    with pg_store.engine.connect() as conn, conn.begin():
        assert hold_lease(conn, "mem", gone.owner, timedelta(minutes=2))
        other = engine(make_settings(), pg_store)
        with pytest.raises(SourceBusy, match=f"being synced by {gone.owner}"):
            # In a thread with its own loop: a taker that waited for the lock would wait for
            # this very transaction, and the timeout ends the test instead.
            await asyncio.wait_for(asyncio.to_thread(asyncio.run, other.sync("mem")), 30)


def test_a_staging_write_of_a_run_failed_meanwhile_adds_nothing(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A batch whose write starts after its run was failed (cut off, taken over) is dropped, so
    no staged row outlives the run."""
    run_id = running_run(store, "mem", staged=0)
    with store.write() as conn:
        assert interrupt_runs(conn, "interrupted: test", run_ids=[run_id]) == [run_id]
    batch = sort_batch(small_roster().records())
    engine(make_settings(), store)._stage(run_id, [batch])
    assert staged_rows(store, run_id) == 0
