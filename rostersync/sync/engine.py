"""One sync run of one source: fetch -> stage -> apply, and the resync workers' batch step.

The run is thin glue around :mod:`rostersync.sync.rules` (rules), the SQL of
:mod:`~rostersync.sync.detect`, :mod:`~rostersync.sync.merge` and
:mod:`~rostersync.sync.provisioning`, and :mod:`rostersync.resync.groups` (materialisation). Failure rules:

* anything that fails before the apply transaction commits changes nothing but the run's own
  record (status ``failed``, with the error);
* a run the safety rules stop is recorded ``held`` with its staged data kept, and
  ``runs approve`` applies exactly that data later;
* rollback by exception, the key invariant: the apply writes the directory and the mirror
  only inside one ``store.write()`` transaction, and a held or dry run undoes all of it by
  raising :class:`_RollBack` inside that transaction (never by deleting what it wrote). Its
  findings travel out with the exception and are recorded with the run alone, in a second
  transaction. So nothing inside the apply may commit, open its own transaction, or catch
  and swallow :class:`_RollBack`;
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
from datetime import date, datetime
from typing import Any

import httpx
import structlog
from sqlalchemy import Connection, delete, insert, select, text, update
from sqlmodel import col

from rostersync import directory, recovery
from rostersync.config.models import Settings
from rostersync.connector import (
    Connector,
    ConnectorContext,
    ConnectorPlugin,
    FetchMode,
    load_plugins,
)
from rostersync.errors import (
    ChangesOnlyError,
    DeltaUnsupportedError,
    RostersyncError,
    RunNotFound,
    RunStateError,
    SourceError,
)
from rostersync.logs import scrub
from rostersync.records import AcademicSession, Rejected, TeacherRef, TeacherRoster
from rostersync.resync.groups import rebuild_groups, update_members
from rostersync.resync.live import apply_teacher_roster
from rostersync.resync.queue import GROUP_COUNTS, LeasedJob, complete, fail, lease, queue_resync
from rostersync.store.db import Store, as_utc, in_text, lock_directory, utcnow
from rostersync.store.tables import RunRejection, SourceState, SyncRun
from rostersync.sync import changes as changeset
from rostersync.sync import detect, provisioning
from rostersync.sync import merge as merging
from rostersync.sync.rules import (
    EMAIL_REJECTIONS,
    ProvisionPlan,
    check_safety,
    chunks,
    plan_provisioning,
)
from rostersync.sync.scope import (
    SCOPE_COUNT_KEYS,
    Scope,
    apply_scope,
    fingerprint_of,
    keep_mirrored_classes,
    last_counts,
    ratio_counts,
    scope_for,
)
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
EXTRA_COUNT_KEYS = ("users_restored", "users_not_created", *SCOPE_COUNT_KEYS)

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
    approved_at: datetime | None = None
    #: a held run that a later real run of its source overtook (it can no longer be approved)
    superseded_by: int | None = None

    @property
    def shown_status(self) -> str:
        """The status a person is shown: ``superseded`` for an overtaken held run (derived,
        never stored: the stored ``held`` is what approval checks)."""
        return "superseded" if self.superseded_by is not None else self.status

    @property
    def duration(self) -> float | None:
        """Seconds the run took (an approved run: its approval's apply), None while running."""
        return directory.run_duration(self.started_at, self.approved_at, self.finished_at)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "mode": self.mode,
            "status": self.shown_status,
            "superseded_by": self.superseded_by,
            "duration_seconds": self.duration,
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
            "approved_at": self.approved_at.isoformat() if self.approved_at else None,
        }


@dataclass(frozen=True, slots=True)
class RunContext:
    """What one apply works on: the run, what it fetched, and how it was asked for."""

    source: str
    run_id: int
    mode: FetchMode
    fetched: Mapping[str, int]
    newest: datetime | None
    log: Any
    #: a preview: rolled back at the end, whatever it found
    dry_run: bool = False
    #: an admin approved this held run: the safety checks that held it are not asked again
    approved: bool = False
    #: a dry run records its change set (a held run always does)
    changes: bool = False

    @property
    def full(self) -> bool:
        return self.mode is FetchMode.FULL


@dataclass
class Outcome:
    """What an apply decided, kept outside its transaction: a held or dry run rolls the
    transaction back, and its report must still say what it found."""

    counts: dict[str, int]
    #: candidates refused by the provisioning rules (their email), for the run's report
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hold_reasons: tuple[str, ...] = ()
    #: a held or dry run's change set (what applying it does), stored after the rollback
    changes: changeset.ChangeSet | None = None


@dataclass
class _Fetched:
    """What a fetch gives the scope step besides staged rows (see rostersync.sync.scope)."""

    #: the academic sessions of the classes that name any, by class (terms: current only)
    class_terms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the connector's ``academic_sessions``, if it has them
    sessions: Mapping[str, AcademicSession] | None = None


class _RollBack(Exception):
    """Raised inside the apply's transaction to undo all of it (a held or a dry run); the
    :class:`Outcome` travels with it to the report. ``store.write()`` rolls back on any
    exception, so this must reach it: see "rollback by exception" in the module docstring."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


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
    superseded_by = None
    if run["status"] == "held" and not run["dry_run"]:
        superseded_by = directory.superseded_by(conn, run_id)
    return RunReport(
        superseded_by=superseded_by,
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
        approved_at=as_utc(run["approved_at"]),
    )


def is_plan_rejection(reason: str) -> bool:
    """A rejection by the provisioning rules (a teacher's email), not by the connector."""
    return reason.startswith(EMAIL_REJECTIONS)


def _source_rejections(conn: Connection, run_id: int) -> int:
    """The run's rejections by its source (records refused while fetching), not counting the
    provisioning rules' own, which an apply (re)writes."""
    reasons = conn.execute(
        select(col(RunRejection.reason)).where(col(RunRejection.run_id) == run_id)
    ).scalars()
    return sum(1 for reason in reasons if not is_plan_rejection(reason))


def _record_outcome(conn: Connection, run_id: int, outcome: Outcome) -> None:
    """Store an apply's own rejections (replacing those of an earlier apply of the run: a held
    run that is approved is applied twice) and add its warnings to the run's."""
    ids = [
        rid
        for rid, reason in conn.execute(
            select(col(RunRejection.id), col(RunRejection.reason)).where(
                col(RunRejection.run_id) == run_id
            )
        )
        if is_plan_rejection(reason)
    ]
    if ids:
        conn.execute(delete(RunRejection).where(col(RunRejection.id).in_(ids)))
    if outcome.rejected:
        conn.execute(
            insert(RunRejection),
            [
                {
                    "run_id": run_id,
                    "entity": r.entity,
                    "sourced_id": r.sourced_id,
                    "reason": r.reason,
                }
                for r in outcome.rejected
            ],
        )
    if outcome.warnings:
        current = conn.execute(
            select(col(SyncRun.warnings)).where(col(SyncRun.id) == run_id)
        ).scalar_one()
        merged = list(current or [])
        merged += [w for w in outcome.warnings if w not in merged]
        conn.execute(update(SyncRun).where(col(SyncRun.id) == run_id).values(warnings=merged))


def _shared_email_warnings(conn: Connection, source: str, plan: ProvisionPlan) -> list[str]:
    """One warning per email that several persons of the source share after this run: they
    map to one account, and an admin should see every such merge."""
    people: dict[str, dict[str, str]] = {
        email: {t.sourced_id: t.display_name for t in teachers}
        for email, teachers in plan.shared.items()
    }
    linked_before = provisioning.source_identities(
        conn, source, {link.user_id for link in plan.link}
    )
    for link in plan.link:
        others = linked_before.get(link.user_id, [])
        if others:
            merged = people.setdefault(link.email, {})
            merged.update(others)
            merged.setdefault(link.sourced_id, link.display_name)
    out = []
    for email, who in sorted(people.items()):
        if len(who) > 1:
            named = ", ".join(f"{sid} ({name or 'no name'})" for sid, name in sorted(who.items()))
            out.append(
                f"email {email} is shared by {len(who)} persons of the source, who map to one "
                f"account: {named}"
            )
    return out


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
        #: the day the terms rules judge by (tests fix it)
        self.today: Callable[[], date] = lambda: utcnow().date()

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
        if last_full is None:
            warnings.append("delta requested but no earlier full run: running full")
            return FetchMode.FULL, None, warnings
        if hwm is None:
            # A full run happened, but its records carried no date to start a filter from
            # (a CSV bulk drop leaves dateLastModified blank).
            warnings.append(
                "delta requested but no record so far carried a dateLastModified to start "
                "from: running full"
            )
            return FetchMode.FULL, None, warnings
        if requested is None and utcnow() - last_full >= cfg.full_every:
            # Scheduled delta runs turn into the periodic full run (full_every).
            return FetchMode.FULL, None, warnings
        last = (state["last_counts"] if state else None) or {}
        if int(last.get("scope", 0)) != fingerprint_of(cfg):
            # The mirror holds what the old scope kept: only a full run can re-judge all of it.
            warnings.append(
                "the source's schools or terms settings changed since the last full run: "
                "running full"
            )
            return FetchMode.FULL, None, warnings
        return FetchMode.DELTA, hwm, warnings

    async def sync(
        self,
        source: str,
        *,
        mode: str | None = None,
        dry_run: bool = False,
        trigger: str = "cli",
        changes: bool = False,
    ) -> RunReport:
        """Sync one source now. Never raises for source or data problems: the report says.
        ``changes``: a dry run records its change set too (a held run always does)."""
        if source not in self.settings.sources:
            raise RostersyncError(f"no source named {source!r} in the config")
        fetch_mode, since, warnings = self._choose_mode(source, mode)
        self._take_lease(source)
        error = None
        try:
            return await self._sync_leased(
                source,
                fetch_mode,
                since,
                warnings,
                dry_run=dry_run,
                trigger=trigger,
                requested=mode,
                changes=changes,
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
        *,
        dry_run: bool,
        trigger: str,
        requested: str | None,
        changes: bool = False,
    ) -> RunReport:
        with self.store.write() as conn:
            provisioning.sync_catalog(conn, self.settings)
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
        scope = scope_for(self.settings.sources[source])
        extras = _Fetched()
        try:
            fetched, newest, notes = await self._fetch(
                source, run_id, fetch_mode, since, log, extras, scope
            )
        except (DeltaUnsupportedError, ChangesOnlyError) as exc:
            if isinstance(exc, DeltaUnsupportedError):
                msg = f"source rejected the delta filter ({exc}); ran a full sync instead"
                log.warning("delta_fallback", reason=str(exc))
                fetch_mode, since = FetchMode.FULL, None
            else:
                refusal, since = await asyncio.to_thread(self._delta_instead, source, requested)
                if refusal is not None:
                    error = ChangesOnlyError(source, f"{exc.detail}; {refusal}")
                    return await asyncio.to_thread(self._fail, run_id, error, log)
                msg = f"{exc.detail}: ran a delta run instead"
                log.warning("delta_instead", reason=exc.detail)
                fetch_mode = FetchMode.DELTA
            warnings.append(msg)
            await asyncio.to_thread(self._reset_run, run_id, fetch_mode, warnings)
            extras = _Fetched()
            try:
                fetched, newest, notes = await self._fetch(
                    source, run_id, fetch_mode, since, log, extras, scope
                )
            except Exception as exc2:
                return await asyncio.to_thread(self._fail, run_id, exc2, log)
        except Exception as exc:
            return await asyncio.to_thread(self._fail, run_id, exc, log)
        if scope is not None:
            try:
                counts, scoped = await asyncio.to_thread(
                    self._scope, source, run_id, fetch_mode, scope, extras
                )
            except Exception as exc:
                return await asyncio.to_thread(self._fail, run_id, exc, log)
            fetched.update(counts)
            notes.extend(scoped)
        if notes:
            warnings.extend(notes)
            await asyncio.to_thread(self._set_warnings, run_id, warnings)
        try:
            ctx = RunContext(
                source,
                run_id,
                fetch_mode,
                fetched,
                newest,
                log,
                dry_run=dry_run,
                changes=changes and dry_run,
            )
            return await asyncio.to_thread(self._apply, ctx)
        except Exception as exc:
            return await asyncio.to_thread(self._fail, run_id, exc, log)

    def _scope(
        self, source: str, run_id: int, mode: FetchMode, scope: Scope, extras: _Fetched
    ) -> tuple[dict[str, int], list[str]]:
        """Leave the staged records out of scope out (rostersync.sync.scope), once, right
        after the fetch: a held run keeps its scoped rows, and its approval applies them."""
        with self.store.write() as conn:
            if not recovery.still_running(conn, run_id):
                return {}, []  # cut off meanwhile: its staging was cleared for good
            result = apply_scope(
                conn,
                source,
                run_id,
                full=mode is FetchMode.FULL,
                scope=scope,
                class_terms=extras.class_terms,
                sessions=extras.sessions,
                today=self.today(),
            )
        return result.counts, result.warnings

    def _delta_instead(
        self, source: str, requested: str | None
    ) -> tuple[str | None, datetime | None]:
        """Whether a full run of a source that holds changes only (a CSV delta drop) may run
        as a delta run instead: (why not, or None; the delta's starting point). Not when an
        admin asked for a full run, nor before a full run has given the changes a base."""
        if requested == "full":
            return (
                "a full run was asked for (--full): sync without --full to apply the changes "
                "as a delta run, or provide a full export",
                None,
            )
        with self.store.read() as conn:
            state = self._source_state(conn, source)
        if state is None or state["last_full_at"] is None:
            return (
                "no full run of this source has succeeded yet, and changes need one to apply "
                "to: the first sync needs a full export (a bulk drop)",
                None,
            )
        return None, as_utc(state["high_water_mark"])

    def _set_warnings(self, run_id: int, warnings: list[str]) -> None:
        with self.store.write() as conn:
            conn.execute(update(SyncRun).where(col(SyncRun.id) == run_id).values(warnings=warnings))

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
        self,
        source: str,
        run_id: int,
        mode: FetchMode,
        since: datetime | None,
        log: Any,
        extras: _Fetched | None = None,
        scope: Scope | None = None,
    ) -> tuple[dict[str, int], datetime | None, list[str]]:
        """Stage everything the connector yields; returns the counts, the newest
        dateLastModified, and the connector's warnings (its optional ``warnings``: what it
        accepted but an admin should hear of, such as a CSV row read without a bad date).
        With terms to judge, ``extras`` collects the classes' terms and the sessions."""
        collect = extras if scope is not None and scope.current_terms else None
        fetched: Counter[str] = Counter()
        notes: list[str] = []
        # Staging runs in a worker thread while the connector fetches on. Batches that arrive
        # while a write is under way wait in `buffer` and go in the next write together, so
        # the fetch never stalls on the database unless the buffer is full.
        buffer = StagedBatch()
        pending: asyncio.Task[None] | None = None
        try:
            async with self.connector(source) as connector:
                async for records in connector.fetch(mode, since):
                    batch = records if isinstance(records, StagedBatch) else sort_batch(records)
                    if collect is not None and batch.terms:
                        collect.class_terms.update(batch.terms)
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
                notes = [scrub(str(w))[:1000] for w in getattr(connector, "warnings", ())]
                if collect is not None:
                    collect.sessions = getattr(connector, "academic_sessions", None)
        finally:
            # Even when the fetch fails, let the last staging write land before the caller
            # clears staging, or its rows would outlive the failed run.
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        if pending is not None and (error := pending.exception()) is not None:
            raise error
        log.info("fetch_done", warnings=len(notes), **dict(fetched))
        return dict(fetched), buffer.newest, notes

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

    def _apply(self, ctx: RunContext) -> RunReport:
        """Apply a fetched run in one transaction. A held or dry run raises :class:`_RollBack`
        inside it, so that everything it wrote is undone (the engine's key invariant: the
        directory and the mirror change only when the transaction commits); its findings are
        then recorded with the run alone."""
        try:
            with self.store.write(bulk=True) as conn:
                outcome = self._apply_in(conn, ctx)
        except _RollBack as stop:
            self._record_rolled_back(ctx, stop.outcome)
        else:
            ctx.log.info("sync_applied", **outcome.counts)
        with self.store.read() as conn:
            return load_report(conn, ctx.run_id)

    def _record_rolled_back(self, ctx: RunContext, outcome: Outcome) -> None:
        """The report of a held or dry run: its status, counts, rejections and warnings. A
        held run keeps its staged rows for ``runs approve``; a dry run is never approved and
        lets them go."""
        held = bool(outcome.hold_reasons)
        reason = "; ".join(outcome.hold_reasons) or None
        if held:
            event = "dry_run_would_hold" if ctx.dry_run else "sync_held"
            ctx.log.warning(event, reason=reason, **outcome.counts)
        if held:
            status = "held"
        else:
            status = "succeeded_with_errors" if outcome.counts["records_rejected"] else "succeeded"
        with self.store.write() as conn:
            if not recovery.still_running(conn, ctx.run_id):
                return  # cut off meanwhile: failed as interrupted, its staging cleared
            if ctx.dry_run:
                clear_staging(conn, ctx.run_id)
            _record_outcome(conn, ctx.run_id, outcome)
            if outcome.changes is not None:
                changeset.save(conn, outcome.changes)
            conn.execute(
                update(SyncRun)
                .where(col(SyncRun.id) == ctx.run_id)
                .values(
                    status=status,
                    hold_reason=reason,
                    counts=outcome.counts,
                    fetched=dict(ctx.fetched),
                    finished_at=utcnow(),
                    high_water_mark=ctx.newest,
                )
            )

    def _apply_in(self, conn: Connection, ctx: RunContext) -> Outcome:
        lock_directory(conn, exclusive=True)  # before any read: see lock_directory
        self._hold_lease(conn, ctx.source)  # still ours, and nobody takes it until the commit
        prepare_staging(conn)  # SQLite: repeated ids settled, key index built
        source, run_id, full = ctx.source, ctx.run_id, ctx.full
        settings = self.settings
        counts = empty_counts()
        grouped = detect.group_ids(conn, source)
        changes = detect.find_changes(conn, source, run_id, full=full, grouped=grouped)
        changed_people = changes.persons
        # Classes whose changes touch only their students' rows keep their owners; if they
        # have a group and still a student after the merge, the sync updates just those
        # members itself and nobody's groups need rebuilding (a renamed student in a large
        # district no longer queues every teacher). The other dirty classes go to resyncs.
        student_side = (changes.dirty_classes - changes.owner_classes) & grouped.keys()
        # Student-side classes keep their teachers through the merge: asking after it is enough.
        teachers_before = detect.teachers_of_classes(
            conn, source, changes.dirty_classes - student_side
        )
        written = merging.merge(
            conn, source, run_id, changes.missing, changes.in_place, changes.to_write
        )
        merging.refresh_statistics(conn, written)
        members_only = detect.populated_classes(conn, source, student_side)
        dirty = changes.dirty_classes - members_only
        teachers_after = detect.teachers_of_classes(conn, source, dirty)
        affected_people = teachers_before | teachers_after | changed_people
        detect.mark_dirty(
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
        # and so does a run that finds the provisioning settings changed since: who counts as
        # a teacher, and whose address may be an account, may have changed for anyone.
        state = self._source_state(conn, source)
        decided_with = settings.provisioning_fingerprint()
        stored = (state["decided_with"] if state else None) or ""
        directory_changed = stored.startswith(provisioning.DIRECTORY_CHANGED)
        settings_changed = (
            state is not None
            and stored.removeprefix(provisioning.DIRECTORY_CHANGED) != decided_with
        )
        active_users = provisioning.count_active_users(conn)
        limit = settings.license_limit
        seats_freed = bool(
            state and state["license_waiting"] and limit is not None and active_users < limit
        )
        redecide = not full and (settings_changed or directory_changed or seats_freed)
        only = None if full or redecide else affected_people
        roles = settings.provisioning.teacher_roles
        candidates = provisioning.eligible_teachers(conn, source, roles, only)
        linked = provisioning.linked_users(conn, source, only)
        teaching_elsewhere: set[int] = set()
        if only is not None:
            # The other persons of the accounts decided here (one record per school): an
            # account is archived only when none of its persons teaches.
            others = provisioning.source_identities(
                conn, source, {u.user_id for u in linked.values()}
            )
            siblings = {sid: uid for uid, ps in others.items() for sid, _ in ps}
            outside = set(siblings) - only
            if outside:
                teaching_elsewhere = {
                    siblings[t.sourced_id]
                    for t in provisioning.eligible_teachers(conn, source, roles, outside)
                }
        unlinked_emails = [t.email for t in candidates if t.email and t.sourced_id not in linked]
        plan = plan_provisioning(
            source,
            candidates,
            linked,
            provisioning.users_by_email(conn, unlinked_emails),
            prov=settings.provisioning,
            active_users=active_users,
            license_limit=limit,
            teaching_elsewhere=teaching_elsewhere,
        )
        outcome = Outcome(
            counts,
            rejected=[Rejected("user", sid, reason) for sid, reason in plan.rejected],
            warnings=_shared_email_warnings(conn, source, plan),
        )
        if redecide:
            if settings_changed:
                why = "provisioning settings or license_limit changed"
            elif directory_changed:
                why = "users were imported or changed by an import"
            else:
                why = "license seats are free for teachers who waited for one"
            outcome.warnings.append(
                f"{why} since the last run: this delta run decided for every teacher of the "
                "source, not only those its changes touched"
            )
        managed_users, managed_groups = provisioning.managed_counts(conn, source)
        groups_removed = provisioning.groups_to_remove(
            conn,
            source,
            roles,
            plan.archive,
            None if full or redecide else dirty,
            restored=plan.restore,
            new_owners={link.sourced_id for link in plan.link}
            | {sid for new in plan.create for sid, _ in new.identities},
        )
        # What the scope step left out right after the fetch (kept with the run's fetched).
        counts.update({k: int(ctx.fetched.get(k, 0)) for k in SCOPE_COUNT_KEYS})
        counts.update(
            users_created=len(plan.create),
            users_linked=len({link.user_id for link in plan.link}),  # accounts, not persons
            users_archived=len(plan.archive),
            users_restored=len(plan.restore),
            users_skipped_license=len(plan.skipped_license),
            users_not_created=len(plan.not_created),
            records_rejected=_source_rejections(conn, run_id) + len(plan.rejected),
        )
        if not ctx.approved:
            fingerprint = fingerprint_of(settings.sources[source])
            now_counts, last = ratio_counts(
                ctx.fetched, state["last_counts"] if state else None, fingerprint
            )
            verdict = check_safety(
                safety=settings.safety_for(source),
                users_archived=len(plan.archive),
                groups_removed=groups_removed,
                managed_users=managed_users,
                managed_groups=managed_groups,
                fetched=now_counts if full else None,
                last_fetched=last,
                emails_lost=changes.emails_lost,
                emails_before=changes.emails_before,
            )
            if verdict.hold:
                counts["groups_removed"] = groups_removed
                outcome.hold_reasons = verdict.reasons
        held = bool(outcome.hold_reasons)
        # A held run always records its change set (the admin who approves it reads it); a
        # dry run only when asked (--changes): it costs the resync work of the run.
        preview = held or ctx.dry_run
        record = ctx.changes if ctx.dry_run else held
        before = changeset.snapshot(conn) if record else None
        if held and before is None:
            raise _RollBack(outcome)  # a dry run a real run would hold: its report is made

        created = provisioning.apply_provisioning(conn, source, plan)
        if len(created) > 1000:
            merging.refresh_directory_statistics(conn)
        resync_users = (
            provisioning.users_of_persons(conn, source, affected_people)
            | plan.touched_users
            | created
        )
        if settings_changed:
            # Group ownership follows the same rules (teacher_roles), for every linked user.
            resync_users |= provisioning.source_users(conn, source)
        if not held:
            counts["resync_queued"] = len(resync_users)
        if preview and before is None:
            counts["groups_removed"] = groups_removed
            raise _RollBack(outcome)
        if not preview:
            queue_resync(conn, resync_users, reason=f"sync run {run_id}", run_id=run_id)
        members_updated = update_members(
            conn, source, {(c, p) for c, p in changes.member_pairs if c in members_only}, grouped
        )
        if before is not None:
            counts["groups_removed"] = groups_removed
            outcome.changes = self._preview_changes(conn, ctx, before, plan, resync_users)
            raise _RollBack(outcome)
        counts["groups_updated"] += members_updated
        # Who waits for a seat is known exactly when everyone was decided; a delta run that
        # decided for some only adds its own.
        waiting = bool(plan.skipped_license) or (
            only is not None and bool(state and state["license_waiting"])
        )
        self._record_success(conn, ctx, outcome, state, decided_with, license_waiting=waiting)
        return outcome

    def _preview_changes(
        self,
        conn: Connection,
        ctx: RunContext,
        before: changeset.Snapshot,
        plan: ProvisionPlan,
        resync_users: set[int],
    ) -> changeset.ChangeSet:
        """A held or dry run, applied but not committed: do what the resync workers would do
        for its users after it (from the mirror, as their jobs would: a user's queued manual
        or live job re-reads every member), then diff the directory with the snapshot."""
        queued: list[tuple[int, bool, bool]] = []
        for chunk in chunks(sorted(resync_users)):
            queued += [
                (int(uid), bool(refresh), bool(live))
                for uid, refresh, live in conn.execute(
                    in_text(
                        "SELECT user_id, refresh, live FROM resync_job "
                        "WHERE state = 'queued' AND user_id IN :ids",
                        "ids",
                    ),
                    {"ids": chunk},
                )
            ]
        roles = self.settings.provisioning.teacher_roles
        rebuild_groups(
            conn,
            resync_users,
            teacher_roles=roles,
            refresh_all=[uid for uid, refresh, live in queued if refresh or live],
        )
        notes = []
        live_users = sum(1 for _, _, live in queued if live)
        if live_users:
            notes.append(
                f"{live_users} of the users have a live resync queued: their groups are shown "
                "as the mirror has them, and the resync re-reads their classes from the source"
            )
        return changeset.collect(
            conn, ctx.source, ctx.run_id, before, plan, teacher_roles=roles, notes=notes
        )

    def _record_success(
        self,
        conn: Connection,
        ctx: RunContext,
        outcome: Outcome,
        state: Mapping[str, Any] | None,
        decided_with: str,
        *,
        license_waiting: bool,
    ) -> None:
        """The applied run's source state, report and staging, in its own transaction."""
        source, run_id = ctx.source, ctx.run_id
        now = utcnow()
        old_hwm = as_utc(state["high_water_mark"]) if state else None
        hwm = max((d for d in (ctx.newest, old_hwm) if d is not None), default=None)
        values: dict[str, Any] = {
            "high_water_mark": hwm,
            "last_success_at": now,
            "last_run_id": run_id,
            "decided_with": decided_with,
            "license_waiting": license_waiting,
        }
        if ctx.full:
            values["last_full_at"] = now
            config = self.settings.sources.get(source)
            fingerprint = fingerprint_of(config) if config is not None else 0
            values["last_counts"] = last_counts(ctx.fetched, fingerprint)
        if state is None:
            conn.execute(insert(SourceState).values(source=source, **{"last_counts": {}, **values}))
        else:
            conn.execute(
                update(SourceState).where(col(SourceState.source) == source).values(**values)
            )
        _record_outcome(conn, run_id, outcome)
        status = "succeeded_with_errors" if outcome.counts["records_rejected"] else "succeeded"
        conn.execute(
            update(SyncRun)
            .where(col(SyncRun.id) == run_id)
            .values(
                status=status,
                counts=outcome.counts,
                fetched=dict(ctx.fetched),
                finished_at=now,
                high_water_mark=ctx.newest,
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
        changeset.forget(conn, source, run_id)

    # -- approval -----------------------------------------------------------------------------

    async def approve(self, run_id: int) -> RunReport:
        """Apply a held run's staged data, bypassing the safety rules that held it.

        Refused (:class:`RunStateError`, nothing changes) for a dry run (a preview, never
        applied), a run that is not held, one a later run of its source has overtaken, one
        whose source is gone from the config, and one whose staged rows are gone. The checks
        are made under the source's lease, so that two approvals, or an approval and a sync,
        cannot both pass them."""
        with self.store.read() as conn:
            report = load_report(conn, run_id)
        self._take_lease(report.source)
        try:
            with self.store.read() as conn:
                report = load_report(conn, run_id)
                self._check_approvable(conn, report)
                hwm = conn.execute(
                    select(col(SyncRun.high_water_mark)).where(col(SyncRun.id) == run_id)
                ).scalar()
            log = self.log.bind(source=report.source, run_id=run_id)
            with self.store.write() as conn:
                conn.execute(
                    update(SyncRun)
                    .where(col(SyncRun.id) == run_id)
                    .values(status="running", approved_at=utcnow(), trigger="approval")
                )
            ctx = RunContext(
                report.source,
                run_id,
                FetchMode(report.mode),
                report.fetched,
                as_utc(hwm),
                log,
                approved=True,
            )
            try:
                out = await asyncio.to_thread(self._apply, ctx)
            except BaseException as exc:
                # Nothing was applied (the transaction rolled back): the run is held as before,
                # with its staged rows, and may be approved again.
                with self.store.write() as conn:
                    conn.execute(
                        update(SyncRun)
                        .where(col(SyncRun.id) == run_id)
                        .values(status="held", approved_at=None, trigger=report.trigger)
                    )
                log.error("held_run_approval_failed", error=scrub(str(exc)))
                raise
            log.info("held_run_approved")
            return out
        finally:
            self._drop_lease(report.source)

    def _check_approvable(self, conn: Connection, report: RunReport) -> None:
        run_id = report.id
        if report.dry_run:
            raise RunStateError(
                f"run {run_id} is a dry run: a preview that is never applied. Run "
                f"`rostersync sync --source {report.source}` to sync the source for real"
            )
        if report.status != "held":
            raise RunStateError(f"run {run_id} is {report.status}, not held: nothing to approve")
        newer = conn.execute(
            text(
                "SELECT id FROM sync_run WHERE source = :s AND id > :r AND dry_run = :no "
                "AND status IN ('succeeded', 'succeeded_with_errors') ORDER BY id LIMIT 1"
            ),
            {"s": report.source, "r": run_id, "no": False},
        ).scalar()
        if newer is not None:
            raise RunStateError(
                f"run {run_id} is out of date: run {newer} of {report.source!r} has succeeded "
                "since; its data would roll the directory back"
            )
        if report.source not in self.settings.sources:
            raise RunStateError(f"source {report.source!r} of run {run_id} is no longer configured")
        lost = staging_lost(conn, run_id, report.fetched)
        if lost:
            # Approval bypasses the safety rules: applying a full run whose staged rows are
            # gone would sweep every record of the source, and archive every user with them.
            raise RunStateError(
                f"run {run_id}'s staged data is gone ({', '.join(lost)} fetched but no longer "
                "staged); it cannot be approved: run a new sync of the source"
            )

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
        # table's current size, so only a table that has doubled needs them again.
        # All of them every ANALYZE_EVERY seconds while groups are being created. A drain
        # that creates none (a delta's) leaves the statistics to autovacuum: re-sampling the
        # member rows would cost it more than it saves.
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
                merging.refresh_directory_statistics(conn, members=every)
        with self.store.write() as conn:
            lock_directory(conn, exclusive=False)  # no sync applies meanwhile
            for job in jobs:
                for source, ext, roster in live.get(job.id, []):
                    config = self.settings.sources.get(source)
                    if config is not None and scope_for(config) is not None:
                        roster = keep_mirrored_classes(conn, source, roster)
                    apply_teacher_roster(conn, source, ext, roster)
            # Manual and live resyncs re-read every member; sync-queued ones only what changed.
            results = rebuild_groups(
                conn,
                [j.user_id for j in jobs],
                teacher_roles=self.settings.provisioning.teacher_roles,
                refresh_all=[j.user_id for j in jobs if j.refresh or j.live],
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
        database does most of the work, on as many cores. SQLite's writers take turns, so one
        runs there."""
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
