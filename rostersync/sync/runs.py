"""A run's records, and the one module with SQL against ``sync_run`` and ``source_state``: the
run row and its report, the rejections and warnings an apply adds to it, the source's state
between runs, and the read-side queries of run history (the CLI, the daemon's status and
metrics). The source's lease is :mod:`rostersync.sync.leasing`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, bindparam, delete, insert, select, text, update

from rostersync.errors import RunNotFound
from rostersync.source.connector import FetchMode
from rostersync.source.records import Rejected
from rostersync.store.db import as_utc, utcnow
from rostersync.store.tables import run_rejection, sync_run
from rostersync.store.tables import source_state as source_state_table  # source_state() is ours
from rostersync.sync.known import KnownRows
from rostersync.sync.repeats import Repeats
from rostersync.sync.rules import EMAIL_REJECTIONS
from rostersync.sync.scope import SCOPE_COUNT_KEYS

if TYPE_CHECKING:
    from rostersync.sync.changes import ChangeSet

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
        return run_duration(self.started_at, self.approved_at, self.finished_at)

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
    #: the persons the source sent that the source's scope left out (its schools)
    scoped_out: frozenset[str] = frozenset()
    #: the ids the fetch and the scope step found received more than once, and whether the
    #: connector's pages may shift (rostersync.sync.repeats); an approval knows neither
    repeats: Repeats = field(default_factory=Repeats)
    shifting: bool = False

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
    changes: ChangeSet | None = None
    #: records received more than once, by kind (``persons_repeated``: the copies), kept
    #: with the run's fetched counts (rostersync.sync.repeats)
    repeated: dict[str, int] = field(default_factory=dict)

    def fetched(self, ctx_fetched: Mapping[str, int]) -> dict[str, int]:
        """The run's fetched counts as recorded: what it received, and the copies among it."""
        return {**ctx_fetched, **self.repeated}


def load_report(conn: Connection, run_id: int) -> RunReport:
    row = conn.execute(select(sync_run).where(sync_run.c.id == run_id)).first()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist")
    run = row._mapping
    rejected = [
        Rejected(r.entity, r.sourced_id, r.reason, r.location).as_dict()
        for r in conn.execute(
            select(run_rejection)
            .where(run_rejection.c.run_id == run_id)
            .order_by(run_rejection.c.id)
        )
    ]
    superseded_by = None
    if run["status"] == "held" and not run["dry_run"]:
        superseded_by = find_superseded_by(conn, run_id)
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
        select(run_rejection.c.reason).where(run_rejection.c.run_id == run_id)
    ).scalars()
    return sum(1 for reason in reasons if not is_plan_rejection(reason))


def record_outcome(conn: Connection, run_id: int, outcome: Outcome) -> None:
    """Store an apply's own rejections (replacing those of an earlier apply of the run: a held
    run that is approved is applied twice) and add its warnings to the run's."""
    ids = [
        rid
        for rid, reason in conn.execute(
            select(run_rejection.c.id, run_rejection.c.reason).where(
                run_rejection.c.run_id == run_id
            )
        )
        if is_plan_rejection(reason)
    ]
    if ids:
        conn.execute(delete(run_rejection).where(run_rejection.c.id.in_(ids)))
    if outcome.rejected:
        conn.execute(
            insert(run_rejection),
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
            select(sync_run.c.warnings).where(sync_run.c.id == run_id)
        ).scalar_one()
        merged = list(current or [])
        merged += [w for w in outcome.warnings if w not in merged]
        conn.execute(update(sync_run).where(sync_run.c.id == run_id).values(warnings=merged))


def source_state(conn: Connection, source: str) -> Mapping[str, Any] | None:
    row = conn.execute(
        select(source_state_table).where(source_state_table.c.source == source)
    ).first()
    return dict(row._mapping) if row is not None else None


def add_counts(current: Mapping[str, int], extra: Mapping[str, int]) -> dict[str, int]:
    out = dict(current)
    for k, v in extra.items():
        out[k] = out.get(k, 0) + v
    return out


# -- the run row --------------------------------------------------------------------------


def start_run(
    conn: Connection,
    *,
    source: str,
    mode: FetchMode,
    requested_mode: str,
    trigger: str,
    dry_run: bool,
    warnings: list[str],
) -> int:
    """A new ``running`` run of ``source``; its id."""
    new_id = conn.execute(
        insert(sync_run)
        .values(
            source=source,
            mode=mode.value,
            requested_mode=requested_mode,
            trigger=trigger,
            status="running",
            dry_run=dry_run,
            started_at=utcnow(),
            counts=empty_counts(),
            fetched={},
            warnings=warnings,
        )
        .returning(sync_run.c.id)
    ).scalar_one()
    assert new_id is not None
    return int(new_id)


def set_warnings(conn: Connection, run_id: int, warnings: list[str]) -> None:
    conn.execute(update(sync_run).where(sync_run.c.id == run_id).values(warnings=warnings))


def restart_run(conn: Connection, run_id: int, mode: FetchMode, warnings: list[str]) -> None:
    """The run fetches again in another mode: its rejections so far are dropped."""
    conn.execute(delete(run_rejection).where(run_rejection.c.run_id == run_id))
    conn.execute(
        update(sync_run).where(sync_run.c.id == run_id).values(mode=mode.value, warnings=warnings)
    )


def fail_run(conn: Connection, run_id: int, message: str) -> None:
    conn.execute(
        update(sync_run)
        .where(sync_run.c.id == run_id)
        .values(status="failed", error=message[:4000], finished_at=utcnow())
    )


def end_run(
    conn: Connection,
    run_id: int,
    *,
    status: str,
    counts: Mapping[str, int],
    fetched: Mapping[str, int],
    newest: datetime | None,
    finished_at: datetime,
    **columns: Any,
) -> None:
    """A finished run's record: its outcome, what it fetched, its high-water mark. ``columns``:
    any other to set, such as a held or dry run's ``hold_reason`` (an applied run, approved
    or not, keeps the reason it was held for)."""
    conn.execute(
        update(sync_run)
        .where(sync_run.c.id == run_id)
        .values(
            status=status,
            counts=dict(counts),
            fetched=dict(fetched),
            finished_at=finished_at,
            high_water_mark=newest,
            **columns,
        )
    )


def add_run_counts(conn: Connection, run_id: int, extra: dict[str, int]) -> None:
    """Add a resync batch's group counts to the run that queued its jobs."""
    current = conn.execute(
        # FOR UPDATE: two instances finishing jobs of one run must not lose each other's counts.
        select(sync_run.c.counts).where(sync_run.c.id == run_id).with_for_update()
    ).scalar()
    if current is None:
        return
    conn.execute(
        update(sync_run).where(sync_run.c.id == run_id).values(counts=add_counts(current, extra))
    )


def high_water_mark(conn: Connection, run_id: int) -> datetime | None:
    """The newest record date the run fetched."""
    value: datetime | None = conn.execute(
        select(sync_run.c.high_water_mark).where(sync_run.c.id == run_id)
    ).scalar()
    return value


def start_approval(conn: Connection, run_id: int) -> None:
    conn.execute(
        update(sync_run)
        .where(sync_run.c.id == run_id)
        .values(status="running", approved_at=utcnow(), trigger="approval")
    )


def undo_approval(conn: Connection, run_id: int, trigger: str) -> None:
    """An approval that applied nothing: the run is held again, as it was."""
    conn.execute(
        update(sync_run)
        .where(sync_run.c.id == run_id)
        .values(status="held", approved_at=None, trigger=trigger)
    )


def held_before(conn: Connection, source: str, run_id: int) -> list[int]:
    """The source's held runs older than ``run_id``."""
    return [
        r[0]
        for r in conn.execute(
            text("SELECT id FROM sync_run WHERE source = :s AND status = 'held' AND id < :r"),
            {"s": source, "r": run_id},
        )
    ]


def stale_run_ids(source: str, up_to: int) -> Select[int | None]:
    """The runs of ``source`` up to ``up_to`` and all its dry runs (a subquery)."""
    return select(sync_run.c.id).where(
        sync_run.c.source == source,
        (sync_run.c.id <= up_to) | sync_run.c.dry_run,
    )


# -- runs cut off (rostersync.daemon.recovery) ------------------------------------------------


def running_runs(
    conn: Connection, *, sources: list[str], run_ids: list[int]
) -> list[tuple[int, bool]]:
    """(id, approving) of the runs still ``running`` among ``run_ids`` and of ``sources``;
    ``approving``: it is an approval's apply."""
    rows = conn.execute(
        text(
            "SELECT id, approved_at FROM sync_run WHERE status = 'running' "
            "AND (source IN :names OR id IN :ids)"
        ).bindparams(bindparam("names", expanding=True), bindparam("ids", expanding=True)),
        {"names": sources or [""], "ids": run_ids or [-1]},
    ).all()
    return [(int(run_id), approved is not None) for run_id, approved in rows]


def back_to_held(conn: Connection, run_ids: Iterable[int]) -> None:
    """Interrupted approvals: held again (their apply rolled back)."""
    conn.execute(
        update(sync_run)
        .where(sync_run.c.id.in_(list(run_ids)), sync_run.c.status == "running")
        .values(status="held", approved_at=None)
    )


def fail_running(conn: Connection, run_ids: Iterable[int], error: str) -> None:
    """Those of ``run_ids`` still ``running`` fail with ``error``."""
    conn.execute(
        update(sync_run)
        .where(sync_run.c.id.in_(list(run_ids)), sync_run.c.status == "running")
        .values(status="failed", error=error[:4000], finished_at=utcnow())
    )


def locked_status(conn: Connection, run_id: int) -> str | None:
    """The run's status, its row held shared until the transaction ends on PostgreSQL."""
    status: str | None = conn.execute(
        select(sync_run.c.status).where(sync_run.c.id == run_id).with_for_update(read=True)
    ).scalar()
    return status


def orphan_runs(conn: Connection) -> list[tuple[int, str]]:
    """Runs left ``running`` with no lease on their source (a run lives inside its lease)."""
    return [
        (int(r[0]), r[1])
        for r in conn.execute(
            text(
                "SELECT id, source FROM sync_run WHERE status = 'running' "
                "AND source NOT IN (SELECT source FROM source_lease)"
            )
        )
    ]


# -- source_state -----------------------------------------------------------------------------


def save_source_state(
    conn: Connection, source: str, values: Mapping[str, Any], *, new: bool
) -> None:
    """Write the source's state (``new``: it has no row yet)."""
    if new:
        conn.execute(
            insert(source_state_table).values(source=source, **{"last_counts": {}, **values})
        )
    else:
        conn.execute(
            update(source_state_table).where(source_state_table.c.source == source).values(**values)
        )


def prefix_decided_with(conn: Connection, mark: str) -> None:
    """Put ``mark`` before every source's ``decided_with`` that does not start with it yet."""
    conn.execute(
        text(
            "UPDATE source_state SET decided_with = :mark || decided_with "
            "WHERE decided_with IS NOT NULL AND decided_with NOT LIKE :like"
        ),
        {"mark": mark, "like": f"{mark}%"},
    )


def last_success_at(conn: Connection, source: str) -> datetime | None:
    """When ``source`` last synced successfully (None: never)."""
    row = conn.execute(
        text("SELECT last_success_at FROM source_state WHERE source = :s"), {"s": source}
    ).first()
    return as_utc(row[0]) if row else None


def last_successes(conn: Connection) -> list[tuple[str, Any]]:
    """(source, last_success_at) of every source that has synced successfully."""
    return [
        (str(source), when)
        for source, when in conn.execute(
            text(
                "SELECT source, last_success_at FROM source_state WHERE last_success_at IS NOT NULL"
            )
        )
    ]


# -- run history --------------------------------------------------------------------------------


#: The first real run of a held run's source that succeeded after it (``{run}`` picks the
#: held run, alias ``r``): once there is one, the held run is superseded. Derived, not stored,
#: so that it can never disagree with what `runs approve` checks.
SUPERSEDED_BY = (
    "SELECT min(n.id) FROM sync_run r JOIN sync_run n ON n.source = r.source AND n.id > r.id "
    "WHERE {run} AND n.dry_run = :no AND n.status IN ('succeeded', 'succeeded_with_errors')"
)


def find_superseded_by(conn: Connection, run_id: int) -> int | None:
    found = conn.execute(text(SUPERSEDED_BY.format(run="r.id = :r")), {"r": run_id, "no": False})
    value = found.scalar()
    return int(value) if value is not None else None


def run_duration(started: Any, approved: Any, finished: Any) -> float | None:
    """Seconds a run took: from its start, or for an approved run from its approval (the
    hold in between is not the run's work), to its end; None while it runs."""
    start = as_utc(approved) or as_utc(started)
    end = as_utc(finished)
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)
