"""Who holds work, whether it still runs, and what dead processes left behind.

Work is held through two kinds of lease, each naming its owner (``HOST:PID`` by default, or
``--instance-id``):

* a **source lease** (``source_lease``): one process syncs or approves a source at a time;
* a **job lease** (``resync_job.lease_owner``): a resync job is being processed.

Each process that takes leases keeps a row in ``instance`` (:func:`register`) with its host,
pid, the pid's start time and the scope the pid is valid in (see
:mod:`rostersync.daemon.procs`). That is what lets a process decide about another one:

* on **this machine** (same pid scope) an owner is dead when its pid is gone or now belongs
  to a process that started later; a dead owner's leases are taken back at once;
* on **another machine** the only sign of life is the heartbeat: a source lease is renewed
  every quarter of ``leases.expire_after`` while its run lives (:class:`LeaseKeeper`) and may
  be taken over once it has expired; job leases return to the queue after ``resync.lease``.

A run is ``running`` only while its owner holds the source's lease, and its apply commits only
if the lease is still its own (:func:`hold_lease`, inside the apply's transaction). So whoever
takes a lease over, or finds a run without one, may fail that run as interrupted and clear its
staging: nothing it fetched can be applied any more. :func:`recover` does that for every dead
owner on this machine; every command that syncs or processes jobs calls it first.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select, text, update
from sqlalchemy.exc import DBAPIError

from rostersync.daemon import procs
from rostersync.errors import InstanceInUse
from rostersync.logs import scrub
from rostersync.resync.queue import requeue_owned
from rostersync.store.db import Store, as_utc, dialect_insert, utcnow
from rostersync.store.tables import instance, source_lease
from rostersync.sync import runs
from rostersync.sync.staging import LOCK_NOT_AVAILABLE, clear_staging

#: A registry row of another machine that has not beaten for this long is dropped.
FORGET_AFTER = timedelta(days=1)


def hostname() -> str:
    return socket.gethostname()


def _format_time(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ") if when else "?"


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holder:
    """One ``instance`` row: a process that takes leases."""

    id: str
    kind: str
    host: str
    pid: int
    pid_started: int | None
    pid_scope: str | None
    heartbeat_at: datetime | None


def load_registry(conn: Connection, ids: Collection[str] | None = None) -> dict[str, Holder]:
    query = select(instance)
    if ids is not None:
        if not ids:
            return {}
        query = query.where(instance.c.id.in_(list(ids)))
    return {
        r.id: Holder(
            r.id, r.kind, r.host, r.pid, r.pid_started, r.pid_scope, as_utc(r.heartbeat_at)
        )
        for r in conn.execute(query)
    }


def register(store: Store, owner: str, kind: str, *, keep_kind: bool = False) -> None:
    """Record (or refresh) ``owner`` as this process. ``keep_kind``: an existing row keeps its
    kind (the engine registers its owner lazily; the daemon's row must stay ``daemon``)."""
    me = procs.ProcessId.current()
    now = utcnow()
    values = {
        "host": hostname()[:255],
        "pid": me.pid,
        "pid_started": me.started,
        "pid_scope": me.scope,
        "started_at": now,
        "heartbeat_at": now,
    }
    with store.write() as conn:
        stmt = dialect_insert(store.dialect)(instance).values(id=owner, kind=kind, **values)
        update_set = dict(values) if keep_kind else {**values, "kind": kind}
        conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=update_set))


def unregister(store: Store, owner: str) -> None:
    """This process is done: forget its row (its leases are released by their holders)."""
    with store.write() as conn:
        conn.execute(delete(instance).where(instance.c.id == owner))


def heartbeat(store: Store, owner: str) -> None:
    """Tell other processes that ``owner`` (a daemon) is still alive."""
    with store.write() as conn:
        conn.execute(update(instance).where(instance.c.id == owner).values(heartbeat_at=utcnow()))


class Liveness:
    """Whether lease owners still run, judged from this process: by pid on this machine, not
    at all elsewhere (other machines are judged by their leases' expiry)."""

    def __init__(self, registry: Mapping[str, Holder], *, previous_self: str | None = None):
        self.registry = registry
        # An id this process now uses: rows under it are from a process that used it before
        # (live instances must have distinct ids), so that one is gone.
        self.previous_self = previous_self
        self.host = hostname()
        self.scope = procs.pid_scope()

    def local_pid(self, owner: str) -> tuple[int, int | None] | None:
        """(pid, start time) if ``owner`` runs, or ran, on this machine; else None."""
        holder = self.registry.get(owner)
        if holder is not None:
            if holder.pid_scope is not None and self.scope is not None:
                same = holder.pid_scope == self.scope
            else:
                same = holder.host == self.host
            return (holder.pid, holder.pid_started) if same else None
        # Not registered (a process of an older version, or one that used the engine
        # directly): the default name HOST:PID still says where it ran.
        host, sep, pid = owner.rpartition(":")
        if sep and host == self.host and pid.isdigit():
            return int(pid), None
        return None

    def dead(self, owner: str) -> bool:
        """True if ``owner`` ran on this machine and no longer does."""
        if self.previous_self is not None and owner == self.previous_self:
            return True
        local = self.local_pid(owner)
        return local is not None and not procs.alive(*local)

    def describe(self, owner: str) -> str:
        local = self.local_pid(owner)
        return f"process {local[0]} on this host" if local else owner


# -- source leases ------------------------------------------------------------------------------


class LeaseLocked(Exception):
    """PostgreSQL: the lease row is locked right now (its holder is applying)."""


@dataclass(frozen=True, slots=True)
class Taken:
    """The outcome of :func:`take_lease`: who holds the lease now, and whom it was taken from."""

    holder: str
    previous: str | None = None
    reason: str | None = None
    interrupted: list[int] = field(default_factory=list)


def interrupt_runs(
    conn: Connection, error: str, *, sources: Iterable[str] = (), run_ids: Iterable[int] = ()
) -> list[int]:
    """Fail with ``error`` the runs still ``running`` among ``run_ids`` and of ``sources``
    (only for sources whose lease this transaction holds or has just dropped: nobody else can
    be running them), and clear their staging. Returns their ids.

    An interrupted approval is no failed run: its apply rolled back, so it goes back to
    ``held`` with the staged rows the admin reviewed, to be approved again."""
    names, ids = sorted(set(sources)), sorted(set(run_ids))
    if not names and not ids:
        return []
    rows = runs.running_runs(conn, sources=names, run_ids=ids)
    approvals = [run_id for run_id, approving in rows if approving]
    found = [run_id for run_id, approving in rows if not approving]
    if approvals:
        runs.back_to_held(conn, approvals)
    if not found:
        return sorted(approvals)
    # The status first: a staging write of the run checks it (and on PostgreSQL holds the row
    # shared until it commits), so once this update is through, none can add rows after the
    # clearing below.
    runs.fail_running(conn, found, error)
    for run_id in found:
        clear_staging(conn, run_id)
    return sorted(found + approvals)


def still_running(conn: Connection, run_id: int) -> bool:
    """For a staging write, in its transaction: is the run still going? A run failed meanwhile
    (cut off, its lease taken over) has had its staging cleared and must get no more rows.
    On PostgreSQL the row is held shared until the write commits (see interrupt_runs)."""
    return runs.locked_status(conn, run_id) == "running"


def _locked(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def _lock_lease(conn: Connection, source: str) -> Any:
    """The lease row, locked for this transaction; LeaseLocked if someone else holds the lock
    (NOWAIT: an apply holds it until it commits, see hold_lease, and its source is busy)."""
    try:
        return conn.execute(
            select(source_lease.c.owner, source_lease.c.expires_at)
            .where(source_lease.c.source == source)
            .with_for_update(nowait=True)
        ).first()
    except DBAPIError as exc:
        if _locked(exc):
            raise LeaseLocked(source) from None
        raise


def take_lease(conn: Connection, source: str, me: str, expire_after: timedelta) -> Taken:
    """Take ``source``'s lease for ``me`` if it is free, ours already, held by a dead process
    of this machine, or expired (its holder elsewhere stopped renewing it). Whatever run the
    previous holder left ``running`` is failed as interrupted, its staging cleared.

    Raises :class:`LeaseLocked` (PostgreSQL) when the holder is in its apply right now."""
    now = utcnow()
    row = _lock_lease(conn, source)
    if row is None:
        fresh = conn.execute(
            dialect_insert(conn.dialect.name)(source_lease)
            .values(source=source, owner=me, expires_at=now + expire_after)
            .on_conflict_do_nothing(index_elements=["source"])
        )
        if fresh.rowcount == 1:
            # Nobody held it, so no run of the source can still be going (a run lives inside
            # its lease): one left `running` was cut off where its lease went too.
            lost = interrupt_runs(
                conn,
                "interrupted: the process running it stopped before it finished",
                sources=[source],
            )
            return Taken(me, interrupted=lost)
        row = _lock_lease(conn, source)  # another process took it a moment ago
        if row is None:
            raise LeaseLocked(source)
    holder, expires = row[0], as_utc(row[1])
    if holder != me:
        liveness = Liveness(load_registry(conn, [holder]))
        if liveness.dead(holder):
            reason = f"{liveness.describe(holder)} is gone"
        elif liveness.local_pid(holder) is None and (expires is None or expires < now):
            reason = f"its lease expired at {_format_time(expires)} without a heartbeat"
        else:
            return Taken(holder)
    conn.execute(
        update(source_lease)
        .where(source_lease.c.source == source)
        .values(owner=me, expires_at=now + expire_after)
    )
    if holder == me:
        return Taken(me)
    lost = interrupt_runs(conn, f"interrupted: {holder} stopped ({reason})", sources=[source])
    return Taken(me, previous=holder, reason=reason, interrupted=lost)


def lease_holder(conn: Connection, source: str) -> str | None:
    return conn.execute(
        select(source_lease.c.owner).where(source_lease.c.source == source)
    ).scalar()


def hold_lease(conn: Connection, source: str, me: str, expire_after: timedelta) -> bool:
    """Renew ``me``'s lease of ``source``; False if it is no longer ours (taken over).

    Inside an apply's transaction this also keeps the row locked (PostgreSQL) until the
    commit, so nobody can take the lease over while the apply is under way."""
    res = conn.execute(
        update(source_lease)
        .where(source_lease.c.source == source, source_lease.c.owner == me)
        .values(expires_at=utcnow() + expire_after)
    )
    return bool(res.rowcount)


def release_lease(conn: Connection, source: str, me: str, error: str) -> list[int]:
    """Give ``source``'s lease back. A run of it still ``running`` was cut off (cancelled, or
    ended by an error before its outcome was recorded): it fails with ``error``, its staging
    is cleared. Nothing is done if someone else holds the lease by now (they dealt with it)."""
    holder = conn.execute(
        select(source_lease.c.owner).where(source_lease.c.source == source).with_for_update()
    ).scalar()
    if holder != me:
        return []
    lost = interrupt_runs(conn, error, sources=[source])
    conn.execute(delete(source_lease).where(source_lease.c.source == source))
    return lost


class LeaseKeeper:
    """Renews one source lease from a thread of its own every quarter of ``expire_after``,
    for as long as the run holds it (a thread: a busy event loop must not look like a dead
    process to another machine). Stops by itself if the lease was taken over."""

    def __init__(
        self, store: Store, source: str, owner: str, expire_after: timedelta, log: Any
    ) -> None:
        self.store = store
        self.source = source
        self.owner = owner
        self.expire_after = expire_after
        self.log = log
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"rostersync-lease-{source}", daemon=True
        )

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        every = self.expire_after.total_seconds() / 4
        renewed = utcnow()
        warned = False
        while not self._stop.wait(every):
            try:
                with self.store.write() as conn:
                    ours = hold_lease(conn, self.source, self.owner, self.expire_after)
                    conn.execute(
                        update(instance)
                        .where(instance.c.id == self.owner)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as exc:
                # A write lock held by a long transaction (SQLite), a database that is down:
                # try again at the next beat; say so once the lease could have run out.
                self.log.debug("sync_lease_renewal_failed", error=scrub(str(exc)))
                if not warned and utcnow() - renewed >= self.expire_after:
                    warned = True
                    self.log.warning(
                        "sync_lease_renewal_late",
                        source=self.source,
                        since=_format_time(renewed),
                        error=scrub(str(exc)),
                    )
                continue
            if not ours:
                self.lost = True
                self.log.error("sync_lease_lost", source=self.source, owner=self.owner)
                return
            renewed, warned = utcnow(), False

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# -- recovery -----------------------------------------------------------------------------------


@dataclass
class Recovered:
    """What :func:`recover` (or :func:`release_owner`) put right."""

    dead_owners: list[str] = field(default_factory=list)
    interrupted_runs: list[int] = field(default_factory=list)
    requeued_jobs: int = 0
    #: jobs failed for good: interrupted MAX_INTERRUPTIONS times (rostersync.resync.queue)
    abandoned_jobs: int = 0

    def __bool__(self) -> bool:
        return bool(
            self.dead_owners or self.interrupted_runs or self.requeued_jobs or self.abandoned_jobs
        )

    def as_log(self) -> dict[str, Any]:
        return {
            "dead_owners": self.dead_owners,
            "interrupted_runs": self.interrupted_runs,
            "requeued_jobs": self.requeued_jobs,
            "abandoned_jobs": self.abandoned_jobs,
        }


def _interrupted_by(owner: str, liveness: Liveness) -> str:
    return f"interrupted: {owner} ({liveness.describe(owner)}) stopped before it finished"


def _refuse_an_id_in_use(conn: Connection, me: str) -> None:
    """Taken as an earlier process's, the id's leases would be recovered from under the live
    process that holds them: its runs failed as interrupted, its jobs run twice."""
    holder = load_registry(conn, [me]).get(me)
    if holder is None:
        return
    local = Liveness({me: holder}).local_pid(me)
    if local is None or local[0] == os.getpid() or not procs.alive(*local):
        return
    raise InstanceInUse(
        f"instance id {me!r} is in use by process {local[0]} on this host, which is running: "
        "give this one another --instance-id (each running instance needs its own), or stop "
        "that process first"
    )


def _find_dead(conn: Connection, previous_self: str | None) -> tuple[Liveness, list[str]]:
    lease_owners = {r[0] for r in conn.execute(select(source_lease.c.owner))}
    job_owners = {
        r[0]
        for r in conn.execute(
            text(
                "SELECT DISTINCT lease_owner FROM resync_job "
                "WHERE state = 'running' AND lease_owner IS NOT NULL"
            )
        )
    }
    registry = load_registry(conn)
    liveness = Liveness(registry, previous_self=previous_self)
    candidates = lease_owners | job_owners | set(registry)
    return liveness, sorted(o for o in candidates if liveness.dead(o))


#: What becomes of a job whose process stopped, as :func:`stopped_jobs` says it.
PUT_BACK = "the next sync or the daemon puts it back in the queue"


def stopped_jobs(conn: Connection) -> dict[int, str]:
    """The ``running`` jobs whose process has stopped, with why they are known to have: their
    owner is dead on this host (:class:`Liveness`), or their lease ran out. They stay running
    in the table until a process that leases jobs or recovers puts them back; this only reads,
    so that read-only commands can tell them apart meanwhile."""
    rows = conn.execute(
        text("SELECT id, lease_owner, lease_expires FROM resync_job WHERE state = 'running'")
    ).all()
    if not rows:
        return {}
    owners = {r[1] for r in rows if r[1] is not None}
    liveness = Liveness(load_registry(conn, owners))
    now = utcnow()
    # Once per owner: a batch of a few hundred jobs shares one, and each look is a /proc read.
    dead = {owner: liveness.dead(owner) for owner in owners}
    out: dict[int, str] = {}
    for job_id, owner, expires_at in rows:
        expires = as_utc(expires_at)
        if owner is not None and dead[owner]:
            out[int(job_id)] = (
                f"its process {owner} ({liveness.describe(owner)}) stopped; {PUT_BACK}"
            )
        elif expires is not None and expires < now:
            who = f"its process {owner}" if owner else "its process"
            out[int(job_id)] = (
                f"its lease ran out at {_format_time(expires)} ({who} stopped or is stuck); "
                f"{PUT_BACK}"
            )
    return out


def recover(store: Store, me: str, *, previous_self: bool = True) -> Recovered:
    """Put right what dead processes of this machine left: their runs fail as interrupted and
    their staging is cleared, their source leases are dropped, and the jobs they had leased
    go back to the queue at once (the attempt not counted: the job did not fail, its process
    did), to be leased alone from then on, except those whose process has now died
    ``MAX_INTERRUPTIONS`` times running them, which fail. Also fails runs left ``running``
    without any lease.

    ``previous_self``: ``me`` is being taken into use now, so anything held under it belongs
    to an earlier process (at the start of a daemon or command; not in a running daemon's
    periodic sweep): unless a process of this host that is still running has it (two
    daemons given one --instance-id), which raises InstanceInUse and changes nothing. Cheap
    when there is nothing to do: one read, no write."""
    with store.read() as conn:
        if previous_self:
            _refuse_an_id_in_use(conn, me)
        _, dead = _find_dead(conn, me if previous_self else None)
        orphans = runs.orphan_runs(conn)
    if not dead and not orphans:
        return Recovered()
    found = Recovered()
    with store.write() as conn:
        # Again under the write lock: the picture may have changed since the read.
        liveness, dead = _find_dead(conn, me if previous_self else None)
        found.dead_owners = dead
        if dead:
            # Locked: a process taking one of these leases over right now (PostgreSQL) waits
            # for this transaction, or has already put its own name in and the row is skipped;
            # either way no run it starts can be taken for the dead one's.
            leased = conn.execute(
                select(source_lease.c.source, source_lease.c.owner)
                .where(source_lease.c.owner.in_(dead))
                .with_for_update()
            ).all()
            for source, owner in leased:
                found.interrupted_runs += interrupt_runs(
                    conn, _interrupted_by(owner, liveness), sources=[source]
                )
            conn.execute(delete(source_lease).where(source_lease.c.owner.in_(dead)))
            found.requeued_jobs, found.abandoned_jobs = requeue_owned(conn, dead, died=True)
            conn.execute(delete(instance).where(instance.c.id.in_(dead)))
        # By id: a run started under a fresh lease since then is not an orphan.
        found.interrupted_runs += interrupt_runs(
            conn,
            "interrupted: the process running it stopped before it finished",
            run_ids=[run_id for run_id, _ in runs.orphan_runs(conn)],
        )
        conn.execute(
            delete(instance).where(
                instance.c.heartbeat_at < utcnow() - FORGET_AFTER,
                instance.c.host != hostname(),
            )
        )
    found.interrupted_runs.sort()
    return found


def release_owner(store: Store, owner: str, error: str) -> Recovered:
    """``owner`` stops for good (a daemon's shutdown): runs still ``running`` under its source
    leases fail with ``error`` and their staging is cleared, the leases are dropped, its leased
    jobs go back to the queue untouched, and its registry row is removed."""
    found = Recovered()
    with store.write() as conn:
        sources = [
            r[0]
            for r in conn.execute(
                select(source_lease.c.source).where(source_lease.c.owner == owner).with_for_update()
            )
        ]
        found.interrupted_runs = interrupt_runs(conn, error, sources=sources)
        conn.execute(delete(source_lease).where(source_lease.c.owner == owner))
        found.requeued_jobs, _ = requeue_owned(conn, [owner])
        conn.execute(delete(instance).where(instance.c.id == owner))
    return found


def live_daemons(store: Store, expire_after: timedelta) -> list[str]:
    """The daemons that run against this database: on this machine by their pid, elsewhere
    by a heartbeat within ``expire_after``."""
    with store.read() as conn:
        registry = load_registry(conn)
    liveness = Liveness(registry)
    cutoff = utcnow() - expire_after
    out = []
    for owner, holder in sorted(registry.items()):
        if holder.kind != "daemon":
            continue
        local = liveness.local_pid(owner)
        if local is not None:
            if procs.alive(*local):
                out.append(owner)
        elif holder.heartbeat_at is not None and holder.heartbeat_at >= cutoff:
            out.append(owner)
    return out
