"""One sync run of one source: fetch -> stage -> apply, and the resync workers' batch step.

The run is thin glue around :mod:`rostersync.sync.plan` (rules), :mod:`rostersync.sync.apply`
(SQL) and :mod:`rostersync.groups` (materialisation). Failure rules:

* anything that fails before the apply transaction commits changes nothing but the run's own
  record (status ``failed``, with the error);
* a run the safety rules stop is recorded ``held`` with its staged data kept, and
  ``runs approve`` applies exactly that data later;
* a rejected record is counted and reported; it never sinks the run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import structlog
from sqlalchemy import Connection, delete, insert, select, text, update
from sqlmodel import col

from rostersync import recovery
from rostersync.config.models import Settings
from rostersync.connector import (
    Connector,
    ConnectorContext,
    ConnectorPlugin,
    FetchMode,
    load_plugins,
)
from rostersync.errors import (
    DeltaUnsupportedError,
    RostersyncError,
    RunNotFound,
    RunStateError,
    SourceError,
)
from rostersync.groups import rebuild_groups, update_members
from rostersync.logs import scrub
from rostersync.queue import GROUP_COUNTS, LeasedJob, complete, fail, lease
from rostersync.records import Rejected, TeacherRef, TeacherRoster
from rostersync.store.db import Store, as_utc, lock_directory, utcnow
from rostersync.store.tables import RunRejection, SourceState, SyncRun
from rostersync.sync import apply as sql
from rostersync.sync.live import apply_teacher_roster
from rostersync.sync.plan import check_safety, plan_provisioning
from rostersync.sync.staging import (
    StagedBatch,
    clear_staging,
    prepare_staging,
    sort_batch,
    stage,
    staging_lost,
)

COUNT_KEYS = (
    "users_created",
    "users_linked",
    "users_archived",
    "users_skipped_license",
    "groups_created",
    "groups_updated",
    "groups_removed",
    "resync_queued",
    "records_rejected",
)
EXTRA_COUNT_KEYS = ("users_restored", "users_not_created")

#: Seconds between statistics refreshes of the directory tables by the resync workers.
ANALYZE_EVERY = 30.0

#: Rows a fetch may hold back while a staging write is under way before it waits for it.
STAGE_BUFFER_ROWS = 50_000

ProgressFn = Callable[[str, str, Mapping[str, int]], None]  # (source, phase, figures)


class SourceBusy(RostersyncError):
    """Another process holds this source's lease."""


class LeaseLost(RostersyncError):
    """The source's lease was taken over while this run held it (its holder looked dead)."""


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def empty_counts() -> dict[str, int]:
    return dict.fromkeys((*COUNT_KEYS, *EXTRA_COUNT_KEYS), 0)


@dataclass
class RunReport:
    id: int
    source: str
    mode: str
    status: str
    counts: dict[str, int]
    rejected: list[dict[str, str | None]] = field(default_factory=list)
    error: str | None = None
    hold_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    fetched: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    trigger: str = "cli"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "mode": self.mode,
            "status": self.status,
            "counts": {k: self.counts.get(k, 0) for k in (*COUNT_KEYS, *EXTRA_COUNT_KEYS)},
            "rejected": self.rejected,
            "error": self.error,
            "hold_reason": self.hold_reason,
            "warnings": self.warnings,
            "fetched": self.fetched,
            "dry_run": self.dry_run,
            "trigger": self.trigger,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


class _Held(Exception):
    def __init__(self, reasons: tuple[str, ...], counts: dict[str, int]) -> None:
        self.reasons = reasons
        self.counts = counts


class _DryRun(Exception):
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts


def load_report(conn: Connection, run_id: int) -> RunReport:
    row = conn.execute(select(SyncRun).where(col(SyncRun.id) == run_id)).first()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist")
    run = row._mapping
    rejected = [
        Rejected(r.entity, r.sourced_id, r.reason, r.location).as_dict()
        for r in conn.execute(
            select(RunRejection)
            .where(col(RunRejection.run_id) == run_id)
            .order_by(col(RunRejection.id))
        )
    ]
    return RunReport(
        id=run["id"],
        source=run["source"],
        mode=run["mode"],
        status=run["status"],
        counts={**empty_counts(), **(run["counts"] or {})},
        rejected=rejected,
        error=run["error"],
        hold_reason=run["hold_reason"],
        warnings=list(run["warnings"] or []),
        fetched=dict(run["fetched"] or {}),
        dry_run=bool(run["dry_run"]),
        started_at=as_utc(run["started_at"]),
        finished_at=as_utc(run["finished_at"]),
        trigger=run["trigger"],
    )


class SyncEngine:
    """Runs syncs and resync batches for one configuration and one database."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        connectors: Mapping[str, Connector] | None = None,
        owner: str | None = None,
        progress: ProgressFn | None = None,
        http_event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
        interrupted_by: str = "the process running it was stopped before it finished",
    ) -> None:
        self.settings = settings
        self.http_event_hooks = {k: list(v) for k, v in (http_event_hooks or {}).items()}
        self.store = store
        self.transport = transport  # tests swap the network here
        self._fixed_connectors = dict(connectors or {})
        self.owner = owner or instance_id()
        self.progress = progress
        # Why a run cut off by cancellation (a daemon stopping, Ctrl-C) failed, after "interrupted: ".
        self.interrupted_by = interrupted_by
        self._keepers: dict[str, recovery.LeaseKeeper] = {}
        self._registered = False
        self.log = structlog.get_logger()
        self._plugins: dict[str, ConnectorPlugin] | None = None
        self._analyzed_at = float("-inf")
        self._created_unanalyzed = 0  # groups created since the last refresh, and before it
        self._created_analyzed = 0
        # Batches run in threads, several at once on PostgreSQL: one claims each refresh.
        self._stats_lock = threading.Lock()

    # -- connectors -----------------------------------------------------------------------

    @asynccontextmanager
    async def connector(self, source: str) -> AsyncIterator[Connector]:
        if source in self._fixed_connectors:
            yield self._fixed_connectors[source]
            return
        cfg = self.settings.sources[source]
        if self._plugins is None:
            self._plugins = load_plugins()
        plugin = self._plugins.get(cfg.type)
        if plugin is None:
            raise SourceError(source, f"no connector installed for type {cfg.type!r}")
        options = cfg.http_client_options()
        if self.transport is not None:
            options["transport"] = self.transport
        if self.http_event_hooks:
            # The daemon's metrics time every request and count responses by status here.
            options["event_hooks"] = self.http_event_hooks
        async with httpx.AsyncClient(**options) as http:
            conn = plugin.create(ConnectorContext(source, cfg, http, self.log.bind(source=source)))
            try:
                yield conn
            finally:
                await conn.aclose()

    # -- leases ---------------------------------------------------------------------------

    def _register(self) -> None:
        """Put this engine's owner in the instance registry (once), so that other processes
        can tell whether the holder of its leases still runs. The CLI and the daemon register
        it first, with their own kind."""
        if not self._registered:
            recovery.register(self.store, self.owner, "engine", keep_kind=True)
            self._registered = True

    def _take_lease(self, source: str) -> None:
        """Take the source's lease (see rostersync.recovery) and keep it renewed; a lease of
        a dead process of this host, or an expired one, is taken over and its run failed."""
        self._register()
        expire_after = self.settings.leases.expire_after
        try:
            with self.store.write() as conn:
                taken = recovery.take_lease(conn, source, self.owner, expire_after)
        except recovery.LeaseLocked:
            with self.store.read() as conn:
                holder = recovery.lease_holder(conn, source) or "another process"
            raise SourceBusy(f"source {source!r} is being synced by {holder}") from None
        if taken.holder != self.owner:
            raise SourceBusy(f"source {source!r} is being synced by {taken.holder}")
        log = self.log.bind(source=source)
        if taken.previous is not None:
            log.warning(
                "sync_lease_taken_over",
                previous_owner=taken.previous,
                reason=taken.reason,
                interrupted_runs=taken.interrupted,
            )
        elif taken.interrupted:
            log.warning("sync_orphans_interrupted", interrupted_runs=taken.interrupted)
        self._keepers[source] = recovery.LeaseKeeper(
            self.store, source, self.owner, expire_after, log
        ).start()

    def _drop_lease(self, source: str, error: str | None = None) -> None:
        """Give the lease back. A run of the source still `running` now was cut off: it is
        failed with ``error`` (default: this engine's ``interrupted_by``), its staging cleared."""
        keeper = self._keepers.pop(source, None)
        if keeper is not None:
            keeper.stop()  # before the lease row is locked below: it may be renewing it
        error = error or f"interrupted: {self.interrupted_by}"
        with self.store.write() as conn:
            lost = recovery.release_lease(conn, source, self.owner, error)
        if lost:
            self.log.warning("sync_interrupted", source=source, run_ids=lost, error=error)

    def _hold_lease(self, conn: Connection, source: str) -> None:
        """In the apply's transaction: go on only if the lease is still ours, and keep it
        (the row stays locked until the commit on PostgreSQL). A run whose lease was taken
        over has been failed by the taker; applying it now would apply a stale fetch."""
        if not recovery.hold_lease(conn, source, self.owner, self.settings.leases.expire_after):
            raise LeaseLost(
                f"interrupted: source {source!r} was taken over by another process before "
                "this run applied; nothing of it was applied"
            )

    # -- sync -----------------------------------------------------------------------------

    def _source_state(self, conn: Connection, source: str) -> Mapping[str, Any] | None:
        row = conn.execute(select(SourceState).where(col(SourceState.source) == source)).first()
        return dict(row._mapping) if row is not None else None

    def _choose_mode(
        self, source: str, requested: str | None
    ) -> tuple[FetchMode, datetime | None, list[str]]:
        cfg = self.settings.sources[source]
        want = requested or cfg.mode
        warnings: list[str] = []
        if want != "delta":
            return FetchMode.FULL, None, warnings
        with self.store.read() as conn:
            state = self._source_state(conn, source)
        hwm = as_utc(state["high_water_mark"]) if state else None
        last_full = as_utc(state["last_full_at"]) if state else None
        if hwm is None or last_full is None:
            warnings.append("delta requested but no earlier full run: running full")
            return FetchMode.FULL, None, warnings
        if requested is None and utcnow() - last_full >= cfg.full_every:
            # Scheduled delta runs turn into the periodic full run (full_every).
            return FetchMode.FULL, None, warnings
        return FetchMode.DELTA, hwm, warnings

    async def sync(
        self,
        source: str,
        *,
        mode: str | None = None,
        dry_run: bool = False,
        trigger: str = "cli",
    ) -> RunReport:
        """Sync one source now. Never raises for source or data problems: the report says."""
        if source not in self.settings.sources:
            raise RostersyncError(f"no source named {source!r} in the config")
        fetch_mode, since, warnings = self._choose_mode(source, mode)
        self._take_lease(source)
        error = None
        try:
            return await self._sync_leased(
                source, fetch_mode, since, warnings, dry_run, trigger, mode
            )
        except Exception as exc:
            # Source and data problems end in the run's report; what escapes is a bug or a
            # lost database, and the run must not stay `running`.
            error = f"interrupted: {scrub(str(exc)) or type(exc).__name__}"
            raise
        finally:
            # Also when cancelled (the daemon stopping, Ctrl-C): shielded, so that the run
            # still records that it stopped; if an apply is still committing in its thread,
            # this waits for it and then finds the run finished.
            await asyncio.shield(asyncio.to_thread(self._drop_lease, source, error))

    async def _sync_leased(
        self,
        source: str,
        fetch_mode: FetchMode,
        since: datetime | None,
        warnings: list[str],
        dry_run: bool,
        trigger: str,
        requested: str | None,
    ) -> RunReport:
        with self.store.write() as conn:
            sql.sync_catalog(conn, self.settings)
            new_id = conn.execute(
                insert(SyncRun)
                .values(
                    source=source,
                    mode=fetch_mode.value,
                    requested_mode=requested or self.settings.sources[source].mode,
                    trigger=trigger,
                    status="running",
                    dry_run=dry_run,
                    started_at=utcnow(),
                    counts=empty_counts(),
                    fetched={},
                    warnings=warnings,
                )
                .returning(col(SyncRun.id))
            ).scalar_one()
            assert new_id is not None
            run_id: int = new_id
        log = self.log.bind(source=source, run_id=run_id)
        log.info("sync_started", mode=fetch_mode.value, dry_run=dry_run)
        try:
            fetched, newest = await self._fetch(source, run_id, fetch_mode, since, log)
        except DeltaUnsupportedError as exc:
            msg = f"source rejected the delta filter ({exc}); ran a full sync instead"
            log.warning("delta_fallback", reason=str(exc))
            warnings.append(msg)
            await asyncio.to_thread(self._reset_run, run_id, FetchMode.FULL, warnings)
            fetch_mode = FetchMode.FULL
            try:
                fetched, newest = await self._fetch(source, run_id, fetch_mode, None, log)
            except Exception as exc2:
                return await asyncio.to_thread(self._fail, run_id, exc2, log)
        except Exception as exc:
            return await asyncio.to_thread(self._fail, run_id, exc, log)
        try:
            return await asyncio.to_thread(
                self._apply, source, run_id, fetch_mode, fetched, newest, dry_run, False, log
            )
        except Exception as exc:
            return await asyncio.to_thread(self._fail, run_id, exc, log)

    def _reset_run(self, run_id: int, mode: FetchMode, warnings: list[str]) -> None:
        with self.store.write() as conn:
            clear_staging(conn, run_id)
            conn.execute(delete(RunRejection).where(col(RunRejection.run_id) == run_id))
            conn.execute(
                update(SyncRun)
                .where(col(SyncRun.id) == run_id)
                .values(mode=mode.value, warnings=warnings)
            )

    async def _fetch(
        self, source: str, run_id: int, mode: FetchMode, since: datetime | None, log: Any
    ) -> tuple[dict[str, int], datetime | None]:
        fetched: Counter[str] = Counter()
        # Staging runs in a worker thread while the connector fetches on. Batches that arrive
        # while a write is under way wait in `buffer` and go in the next write together, so
        # the fetch never stalls on the database unless the buffer is full.
        buffer = StagedBatch()
        pending: asyncio.Task[None] | None = None
        try:
            async with self.connector(source) as connector:
                async for records in connector.fetch(mode, since):
                    batch = records if isinstance(records, StagedBatch) else sort_batch(records)
                    fetched.update(
                        {
                            "orgs": len(batch.rows["org"]),
                            "persons": len(batch.rows["person"]),
                            "classes": len(batch.rows["class"]),
                            "enrollments": len(batch.rows["enrollment"]),
                            "rejected": len(batch.rejected),
                        }
                    )
                    buffer.extend(batch)
                    if pending is not None:
                        if not pending.done() and len(buffer) < STAGE_BUFFER_ROWS:
                            continue
                        await pending
                    pending = asyncio.create_task(asyncio.to_thread(self._stage, run_id, buffer))
                    buffer = StagedBatch(newest=buffer.newest)
                    if self.progress:
                        self.progress(source, "fetch", dict(fetched))
                if pending is not None:
                    await pending
                if len(buffer):
                    pending = asyncio.create_task(asyncio.to_thread(self._stage, run_id, buffer))
        finally:
            # Even when the fetch fails, let the last staging write land before the caller
            # clears staging, or its rows would outlive the failed run.
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        if pending is not None and (error := pending.exception()) is not None:
            raise error
        log.info("fetch_done", **dict(fetched))
        return dict(fetched), buffer.newest

    def _stage(self, run_id: int, batch: StagedBatch) -> None:
        with self.store.write() as conn:
            if not recovery.still_running(conn, run_id):
                return  # cut off or taken over meanwhile: its staging was cleared for good
            stage(conn, run_id, batch)
            if batch.rejected:
                conn.execute(
                    insert(RunRejection),
                    [
                        {
                            "run_id": run_id,
                            "entity": r.entity,
                            "sourced_id": r.sourced_id,
                            "reason": r.reason[:1000],
                            "location": r.location,
                        }
                        for r in batch.rejected
                    ],
                )

    def _fail(self, run_id: int, exc: BaseException, log: Any) -> RunReport:
        message = scrub(str(exc)) or type(exc).__name__
        # Source and data errors explain themselves; anything else is a bug worth a traceback.
        log.error(
            "sync_failed",
            error=message,
            error_type=type(exc).__name__,
            exc_info=exc if not isinstance(exc, RostersyncError) else None,
        )
        with self.store.write() as conn:
            clear_staging(conn, run_id)
            conn.execute(
                update(SyncRun)
                .where(col(SyncRun.id) == run_id)
                .values(status="failed", error=message[:4000], finished_at=utcnow())
            )
        with self.store.read() as conn:
            return load_report(conn, run_id)

    def _apply(
        self,
        source: str,
        run_id: int,
        mode: FetchMode,
        fetched: Mapping[str, int],
        newest: datetime | None,
        dry_run: bool,
        approved: bool,
        log: Any,
    ) -> RunReport:
        full = mode is FetchMode.FULL
        try:
            with self.store.write(bulk=True) as conn:
                result = self._apply_in(
                    conn, source, run_id, full, fetched, newest, dry_run, approved
                )
        except _Held as held:
            reason = "; ".join(held.reasons)
            log.warning("sync_held", reason=reason, **held.counts)
            with self.store.write() as conn:
                conn.execute(
                    update(SyncRun)
                    .where(col(SyncRun.id) == run_id)
                    .values(
                        status="held",
                        hold_reason=reason,
                        counts=held.counts,
                        fetched=dict(fetched),
                        finished_at=utcnow(),
                        high_water_mark=newest,
                    )
                )
        except _DryRun as dry:
            with self.store.write() as conn:
                clear_staging(conn, run_id)
                status = "succeeded_with_errors" if dry.counts["records_rejected"] else "succeeded"
                conn.execute(
                    update(SyncRun)
                    .where(col(SyncRun.id) == run_id)
                    .values(
                        status=status,
                        counts=dry.counts,
                        fetched=dict(fetched),
                        finished_at=utcnow(),
                    )
                )
        else:
            log.info("sync_applied", **result)
        with self.store.read() as conn:
            return load_report(conn, run_id)

    def _apply_in(
        self,
        conn: Connection,
        source: str,
        run_id: int,
        full: bool,
        fetched: Mapping[str, int],
        newest: datetime | None,
        dry_run: bool,
        approved: bool,
    ) -> dict[str, int]:
        lock_directory(conn, exclusive=True)  # before any read: see lock_directory
        self._hold_lease(conn, source)  # still ours, and nobody takes it until the commit
        prepare_staging(conn)  # SQLite: repeated ids settled, key index built
        settings = self.settings
        counts = empty_counts()
        grouped = sql.group_ids(conn, source)
        changes = sql.find_changes(conn, source, run_id, full, grouped)
        changed_people = changes.persons
        # Classes whose changes touch only their students' rows keep their owners; if they
        # have a group and still a student after the merge, the sync updates just those
        # members itself and nobody's groups need rebuilding (a renamed student in a large
        # district no longer queues every teacher). The other dirty classes go to resyncs.
        student_side = (changes.dirty_classes - changes.owner_classes) & grouped.keys()
        # Student-side classes keep their teachers through the merge: asking after it is enough.
        teachers_before = sql.teachers_of_classes(
            conn, source, changes.dirty_classes - student_side
        )
        written = sql.merge(
            conn, source, run_id, changes.missing, changes.in_place, changes.to_write
        )
        sql.refresh_statistics(conn, written)
        members_only = sql.populated_classes(conn, source, student_side)
        dirty = changes.dirty_classes - members_only
        teachers_after = sql.teachers_of_classes(conn, source, dirty)
        affected_people = teachers_before | teachers_after | changed_people
        sql.mark_dirty(
            conn,
            source,
            changes.refresh_classes,
            {(c, p) for c, p in changes.member_pairs if c not in members_only},
            grouped,
        )

        # A delta run decides only for the people its changes can concern: a teacher's
        # eligibility depends on their own row, their teacher enrollments, those classes and
        # those classes' students, and each of those changes marks the teacher affected.
        # Everyone else is as the last run left them; the periodic full run re-decides all,
        # and so does a delta run that finds the provisioning settings changed since.
        state = self._source_state(conn, source)
        decided_with = settings.provisioning_fingerprint()
        redecide = not full and state is not None and state["decided_with"] != decided_with
        only = None if full or redecide else affected_people
        eligible = sql.eligible_teachers(conn, source, only)
        linked = sql.linked_users(conn, source, only)
        unlinked_emails = [t.email for t in eligible if t.email and t.sourced_id not in linked]
        plan = plan_provisioning(
            source,
            eligible,
            linked,
            sql.users_by_email(conn, unlinked_emails),
            prov=settings.provisioning,
            active_users=sql.count_active_users(conn),
            license_limit=settings.license_limit,
        )
        no_email = [
            Rejected(
                "user", sid, "no email: teaches classes with students but has no email address"
            )
            for sid in plan.no_email
        ]
        if no_email:
            conn.execute(
                delete(RunRejection).where(
                    col(RunRejection.run_id) == run_id,
                    col(RunRejection.reason).startswith("no email:"),
                )
            )
            conn.execute(
                insert(RunRejection),
                [
                    {
                        "run_id": run_id,
                        "entity": r.entity,
                        "sourced_id": r.sourced_id,
                        "reason": r.reason,
                    }
                    for r in no_email
                ],
            )
        rejected_total = conn.execute(
            text("SELECT count(*) FROM run_rejection WHERE run_id = :r"), {"r": run_id}
        ).scalar_one()

        managed_users, managed_groups = sql.managed_counts(conn, source)
        groups_removed = sql.groups_to_remove(
            conn, source, plan.archive, None if full or redecide else dirty
        )
        counts.update(
            users_created=len(plan.create),
            users_linked=len(plan.link),
            users_archived=len(plan.archive),
            users_restored=len(plan.restore),
            users_skipped_license=len(plan.skipped_license),
            users_not_created=len(plan.not_created),
            records_rejected=int(rejected_total),
        )
        if not approved:
            verdict = check_safety(
                safety=settings.safety_for(source),
                users_archived=len(plan.archive),
                groups_removed=groups_removed,
                managed_users=managed_users,
                managed_groups=managed_groups,
                fetched=fetched if full else None,
                last_fetched=(state["last_counts"] if state else None),
                emails_lost=changes.emails_lost,
                emails_before=changes.emails_before,
            )
            if verdict.hold:
                counts["groups_removed"] = groups_removed
                raise _Held(verdict.reasons, counts)

        created = sql.apply_provisioning(conn, source, plan)
        if len(created) > 1000:
            sql.refresh_directory_statistics(conn)
        resync_users = (
            sql.users_of_persons(conn, source, affected_people) | plan.touched_users | created
        )
        counts["resync_queued"] = len(resync_users)
        if dry_run:
            counts["groups_removed"] = groups_removed
            raise _DryRun(counts)
        sql.queue_resync(conn, resync_users, reason=f"sync run {run_id}", run_id=run_id)
        counts["groups_updated"] += update_members(
            conn, source, {(c, p) for c, p in changes.member_pairs if c in members_only}, grouped
        )

        now = utcnow()
        old_hwm = as_utc(state["high_water_mark"]) if state else None
        hwm = max((d for d in (newest, old_hwm) if d is not None), default=None)
        values: dict[str, Any] = {
            "high_water_mark": hwm,
            "last_success_at": now,
            "last_run_id": run_id,
            "decided_with": decided_with,
        }
        if full:
            values["last_full_at"] = now
            values["last_counts"] = {
                k: int(fetched.get(k, 0)) for k in ("persons", "classes", "enrollments")
            }
        if state is None:
            conn.execute(insert(SourceState).values(source=source, **{"last_counts": {}, **values}))
        else:
            conn.execute(
                update(SourceState).where(col(SourceState.source) == source).values(**values)
            )

        status = "succeeded_with_errors" if rejected_total else "succeeded"
        extra: dict[str, Any] = {}
        if redecide:
            warnings = conn.execute(
                select(col(SyncRun.warnings)).where(col(SyncRun.id) == run_id)
            ).scalar_one()
            extra["warnings"] = [
                *(warnings or []),
                "provisioning settings or license_limit changed since the last run: this delta "
                "run decided for every teacher of the source, not only those its changes touched",
            ]
        conn.execute(
            update(SyncRun)
            .where(col(SyncRun.id) == run_id)
            .values(
                status=status,
                counts=counts,
                fetched=dict(fetched),
                finished_at=now,
                high_water_mark=newest,
                **extra,
            )
        )
        # This run's staging, and that of older held runs it supersedes, is no longer needed.
        older = [
            r[0]
            for r in conn.execute(
                text("SELECT id FROM sync_run WHERE source = :s AND status = 'held' AND id < :r"),
                {"s": source, "r": run_id},
            )
        ]
        for rid in (run_id, *older):
            clear_staging(conn, rid)
        return counts

    # -- approval -----------------------------------------------------------------------------

    async def approve(self, run_id: int) -> RunReport:
        """Apply a held run's staged data, bypassing the safety rules that held it."""
        with self.store.read() as conn:
            report = load_report(conn, run_id)
            if report.status != "held":
                raise RunStateError(
                    f"run {run_id} is {report.status}, not held: nothing to approve"
                )
            newer = conn.execute(
                text(
                    "SELECT id FROM sync_run WHERE source = :s AND id > :r "
                    "AND status IN ('succeeded', 'succeeded_with_errors') ORDER BY id LIMIT 1"
                ),
                {"s": report.source, "r": run_id},
            ).scalar()
        if newer is not None:
            raise RunStateError(
                f"run {run_id} is out of date: run {newer} of {report.source!r} has succeeded since; "
                "its data would roll the directory back"
            )
        if report.source not in self.settings.sources:
            raise RunStateError(f"source {report.source!r} of run {run_id} is no longer configured")
        with self.store.read() as conn:
            lost = staging_lost(conn, run_id, report.fetched)
        if lost:
            # Approval bypasses the safety rules: applying a full run whose staged rows are
            # gone would sweep every record of the source, and archive every user with them.
            raise RunStateError(
                f"run {run_id}'s staged data is gone ({', '.join(lost)} fetched but no longer "
                "staged); it cannot be approved: run a new sync of the source"
            )
        self._take_lease(report.source)
        try:
            with self.store.read() as conn:
                hwm = conn.execute(
                    select(col(SyncRun.high_water_mark)).where(col(SyncRun.id) == run_id)
                ).scalar()
            log = self.log.bind(source=report.source, run_id=run_id)
            mode = FetchMode(report.mode)
            with self.store.write() as conn:
                conn.execute(
                    update(SyncRun)
                    .where(col(SyncRun.id) == run_id)
                    .values(status="running", approved_at=utcnow())
                )
            out = await asyncio.to_thread(
                self._apply,
                report.source,
                run_id,
                mode,
                report.fetched,
                as_utc(hwm),
                False,
                True,
                log,
            )
            log.info("held_run_approved")
            return out
        finally:
            self._drop_lease(report.source)

    # -- resync ---------------------------------------------------------------------------

    async def process_batch(self) -> list[tuple[LeasedJob, str]]:
        """Lease one batch of due jobs and process it; returns (job, outcome) pairs."""
        jobs = await asyncio.to_thread(self._lease_jobs)
        if not jobs:
            return []
        outcomes: list[tuple[LeasedJob, str]] = []
        live_rosters: dict[int, list[tuple[str, str, TeacherRoster]]] = {}
        ready: list[LeasedJob] = []
        for job in jobs:
            if not job.live:
                ready.append(job)
                continue
            try:
                live_rosters[job.id] = await self._fetch_live(job)
                ready.append(job)
            except Exception as exc:
                outcomes.append((job, await self._fail_job(job, exc)))
        if ready:
            try:
                await asyncio.to_thread(self._materialise, ready, live_rosters)
                outcomes += [(j, "succeeded") for j in ready]
            except Exception as exc:
                for job in ready:
                    outcomes.append((job, await self._fail_job(job, exc)))
                self.log.error("resync_batch_failed", jobs=len(ready), error=scrub(str(exc)))
        return outcomes

    def _lease_jobs(self) -> list[LeasedJob]:
        self._register()
        rs = self.settings.resync
        return lease(self.store, self.owner, limit=rs.batch_size, lease_for=rs.lease)

    async def _fail_job(self, job: LeasedJob, exc: BaseException) -> str:
        """Record a job's failure (retry later, or failed for good); returns its new state."""
        rs = self.settings.resync
        error = scrub(str(exc)) or type(exc).__name__
        state = await asyncio.to_thread(
            fail, self.store, job, error, max_attempts=rs.max_attempts, backoff=rs.backoff
        )
        self.log.warning(
            "resync_failed", job_id=job.id, user_id=job.user_id, error=error, state=state
        )
        return state

    async def _fetch_live(self, job: LeasedJob) -> list[tuple[str, str, TeacherRoster]]:
        with self.store.read() as conn:
            rows = conn.execute(
                text(
                    'SELECT i.source, i.external_id, u.email FROM user_identity i JOIN "user" u '
                    "ON u.id = i.user_id WHERE i.user_id = :u"
                ),
                {"u": job.user_id},
            ).all()
        out = []
        for source, ext, email in rows:
            if source not in self.settings.sources or not self.settings.sources[source].enabled:
                continue
            async with self.connector(source) as connector:
                roster = await connector.fetch_teacher(TeacherRef(ext, email))
            out.append((source, ext, roster))
        return out

    def _materialise(
        self, jobs: list[LeasedJob], live: Mapping[int, list[tuple[str, str, TeacherRoster]]]
    ) -> None:
        # The drain after a first sync grows the group tables from nothing; plans made for
        # empty tables turn into scans (see refresh_directory_statistics). The small tables are
        # re-sampled once the groups created since their last sample are at least 100 and at
        # least as many as were created before it: PostgreSQL scales sampled statistics to a
        # table's current size, so only a table that has doubled needs them again. (Before
        # every batch, a first drain of district L ran ANALYZE 40 times, 4.6 s on 2 cores.)
        # All of them every ANALYZE_EVERY seconds while groups are being created. A drain
        # that creates none (a delta's) leaves the statistics to autovacuum: re-sampling a
        # million member rows cost it a third of a second.
        now = time.monotonic()
        with self._stats_lock:
            every = bool(self._created_unanalyzed) and now - self._analyzed_at >= ANALYZE_EVERY
            small = not every and self._created_unanalyzed >= max(100, self._created_analyzed)
            if every:
                self._analyzed_at = now
            if every or small:
                self._created_analyzed += self._created_unanalyzed
                self._created_unanalyzed = 0
        if (every or small) and self.store.is_postgres:
            # In a transaction of its own: ANALYZE keeps its table lock until commit, and
            # inside the batch it made every other batch's ANALYZE wait for that batch to end
            # (concurrent batches ran one at a time).
            with self.store.write() as conn:
                sql.refresh_directory_statistics(conn, members=every)
        with self.store.write() as conn:
            lock_directory(conn, exclusive=False)  # no sync applies meanwhile
            for job in jobs:
                for source, ext, roster in live.get(job.id, []):
                    apply_teacher_roster(conn, source, ext, roster)
            # Manual and live resyncs re-read every member; sync-queued ones only what changed.
            results = rebuild_groups(
                conn,
                [j.user_id for j in jobs],
                refresh_all=[j.user_id for j in jobs if j.run_id is None or j.live],
            )
            totals = {k: sum(r[k] for r in results.values()) for k in GROUP_COUNTS}
            complete(conn, jobs, results)
        with self._stats_lock:  # committed: the next refresh samples these groups
            self._created_unanalyzed += totals.get("groups_created", 0)
        self.log.info("resync_batch_done", jobs=len(jobs), **totals)

    async def drain(self, on_batch: Callable[[int], None] | None = None) -> int:
        """Process due jobs until none is left; returns how many were processed, and tells
        ``on_batch`` the running total after each batch.

        On PostgreSQL ``resync.workers`` batches run at once, as the daemon's workers do: the
        database does most of the work, on as many cores (a first drain of district L took
        20 s one batch at a time). SQLite's writers take turns, so one runs there."""
        done = 0

        async def worker() -> None:
            nonlocal done
            while outcomes := await self.process_batch():
                done += len(outcomes)
                if on_batch is not None:
                    on_batch(done)

        workers = self.settings.resync.workers if self.store.is_postgres else 1
        if workers == 1:
            await worker()
            return done
        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return done
