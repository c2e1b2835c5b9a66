"""A run's records: the ``sync_run`` row and its report, the rejections and warnings an apply
adds to it, the source's lease (through :mod:`rostersync.daemon.recovery`) and its ``source_state``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlmodel import col

from rostersync import directory
from rostersync.config.models import Settings
from rostersync.daemon import recovery
from rostersync.errors import RostersyncError, RunNotFound
from rostersync.source.connector import FetchMode
from rostersync.source.records import Rejected
from rostersync.store.db import Store, as_utc
from rostersync.store.tables import RunRejection, SourceState, SyncRun
from rostersync.sync import changes as changeset
from rostersync.sync.known import KnownRows
from rostersync.sync.rules import EMAIL_REJECTIONS
from rostersync.sync.scope import SCOPE_COUNT_KEYS

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
    #: a full run's rows left out of staging as unchanged (rostersync.sync.known)
    known: KnownRows | None = None

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


def source_rejections(conn: Connection, run_id: int) -> int:
    """The run's rejections by its source (records refused while fetching), not counting the
    provisioning rules' own, which an apply (re)writes."""
    reasons = conn.execute(
        select(col(RunRejection.reason)).where(col(RunRejection.run_id) == run_id)
    ).scalars()
    return sum(1 for reason in reasons if not is_plan_rejection(reason))


def record_outcome(conn: Connection, run_id: int, outcome: Outcome) -> None:
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


def source_state(conn: Connection, source: str) -> Mapping[str, Any] | None:
    row = conn.execute(select(SourceState).where(col(SourceState.source) == source)).first()
    return dict(row._mapping) if row is not None else None


class LeaseHolder:
    """The engine's side of the source leases: take one for a run, keep it renewed, hold it
    through the apply, give it back."""

    settings: Settings
    store: Store
    owner: str
    log: Any
    interrupted_by: str
    _keepers: dict[str, recovery.LeaseKeeper]
    _registered: bool

    def _register(self) -> None:
        """Put this engine's owner in the instance registry (once), so that other processes
        can tell whether the holder of its leases still runs. The CLI and the daemon register
        it first, with their own kind."""
        if not self._registered:
            recovery.register(self.store, self.owner, "engine", keep_kind=True)
            self._registered = True

    def _take_lease(self, source: str) -> None:
        """Take the source's lease (see rostersync.daemon.recovery) and keep it renewed; a lease of
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
