"""The resync queue: jobs leased in batches, retried with backoff, never lost.

A worker leases up to ``batch_size`` due jobs (``FOR UPDATE SKIP LOCKED`` on PostgreSQL so
instances never take the same job; SQLite serializes writers), rebuilds those users' groups in
one transaction and marks the jobs done in that same transaction. A worker that dies leaves
leases that expire and return their jobs to the queue.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, text

from rostersync.store.db import Store, as_utc, executemany, in_text, ts_params, utcnow
from rostersync.sync import runs
from rostersync.sync.rules import chunks

#: PostgreSQL channel the daemon LISTENs on for new resync jobs.
RESYNC_CHANNEL = "rostersync_resync"

GROUP_COUNTS = ("groups_created", "groups_updated", "groups_removed")


@dataclass(frozen=True, slots=True)
class LeasedJob:
    id: int
    user_id: int
    live: bool
    attempts: int
    run_id: int | None
    refresh: bool = False


#: Leases of one job that may end unfinished (its process died, or the lease ran out) before
#: the job fails for good: a job that kills or hangs its process (memory, a crash in a
#: driver) would otherwise be retried for ever, since a dead process's attempt is not counted
#: and only a failure checks ``resync.max_attempts``.
MAX_INTERRUPTIONS = 3

#: The ``last_error`` of a job failed by :data:`MAX_INTERRUPTIONS`.
INTERRUPTED_ERROR = (
    f"its process stopped, or its lease (resync.lease) ran out, {MAX_INTERRUPTIONS} times "
    "before it finished (killed, out of memory, stuck?): not retried; see those processes' "
    "logs, then `rostersync resync --user EMAIL`"
)


def requeue_expired(conn: Connection, now: datetime | None = None) -> int:
    """Return expired leases to the queue (their holder may be alive elsewhere but stuck, or
    dead on another machine): the attempt counts, and so does the interruption
    (:func:`_interrupt`)."""
    now = now or utcnow()
    where = "resync_job.state = 'running' AND resync_job.lease_expires < :now"
    params = {"now": now}
    binds = ts_params("now")
    _interrupt(conn, where, params, binds)
    _fold_duplicates(conn, where, params, binds)
    res = conn.execute(
        text(
            "UPDATE resync_job SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
            f"run_after = :now WHERE {where}"
        ).bindparams(*binds),
        params,
    )
    return res.rowcount or 0


def requeue_owned(
    conn: Connection, owners: Collection[str], *, died: bool = False
) -> tuple[int, int]:
    """Return the running jobs leased by these owners to the queue at once, their attempt not
    counted: the owners are gone (a process that died, a daemon shutting down), the jobs did
    not fail. ``died``: the owners died, so each job counts the interruption
    (:func:`_interrupt`); a clean stop counts nothing. Returns how many went back, and how
    many failed for good instead."""
    if not owners:
        return 0, 0
    where = "resync_job.state = 'running' AND resync_job.lease_owner IN :owners"
    params = {"owners": list(owners)}
    expanding: list[BindParameter[Any]] = [bindparam("owners", expanding=True)]
    abandoned = _interrupt(conn, where, params, expanding) if died else 0
    _fold_duplicates(conn, where, params, expanding)
    res = conn.execute(
        text(
            "UPDATE resync_job SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
            f"attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END WHERE {where}"
        ).bindparams(*expanding),
        params,
    )
    return res.rowcount or 0, abandoned


def _interrupt(
    conn: Connection, where: str, params: dict[str, Any], binds: list[BindParameter[Any]]
) -> int:
    """The running jobs ``where`` selects ended unfinished: each counts an interruption, and
    those that reach ``MAX_INTERRUPTIONS`` fail for good (:data:`INTERRUPTED_ERROR`); a queued
    job of the same user, which will absorb one of the others (:func:`_fold_duplicates`),
    takes its count, or folding would reset it. The caller then requeues the rest, each leased
    alone from then on (:func:`lease`). Returns how many failed."""
    interrupted = conn.execute(
        text(f"UPDATE resync_job SET interruptions = interruptions + 1 WHERE {where}").bindparams(
            *binds
        ),
        params,
    )
    if not interrupted.rowcount:
        # Nothing ended unfinished (every lease but a crash's): the statements below would
        # each still visit every queued job, at every lease of a long drain.
        return 0
    failed = conn.execute(
        text(
            "UPDATE resync_job SET state = 'failed', last_error = :interrupted_error, "
            "finished_at = :interrupted_at, lease_owner = NULL, lease_expires = NULL "
            f"WHERE {where} AND resync_job.interruptions >= :most"
        ).bindparams(*binds, *ts_params("interrupted_at")),
        {
            **params,
            "interrupted_error": INTERRUPTED_ERROR,
            "interrupted_at": utcnow(),
            "most": MAX_INTERRUPTIONS,
        },
    )
    other = where.replace("resync_job.", "d.")
    count = (
        "(SELECT max(d.interruptions) FROM resync_job d "
        f"WHERE d.user_id = resync_job.user_id AND {other})"
    )
    conn.execute(
        text(
            f"UPDATE resync_job SET interruptions = {count} WHERE state = 'queued' "
            f"AND interruptions < {count}"
        ).bindparams(*binds),
        params,
    )
    return failed.rowcount or 0


def _fold_duplicates(
    conn: Connection, where: str, params: dict[str, Any], binds: list[BindParameter[Any]]
) -> None:
    """Before the running jobs ``where`` selects go back to the queue: a user has at most one
    queued job (uq_resync_job_queued_user), so a job whose user already has one, or has an
    older job among those going back, is dropped; the remaining job does the same work."""
    other = where.replace("resync_job.", "o.")
    conn.execute(
        text(
            f"DELETE FROM resync_job WHERE {where} AND (EXISTS (SELECT 1 FROM resync_job q "
            "WHERE q.user_id = resync_job.user_id AND q.state = 'queued') OR EXISTS ("
            f"SELECT 1 FROM resync_job o WHERE o.user_id = resync_job.user_id AND {other} "
            "AND o.id < resync_job.id))"
        ).bindparams(*binds),
        params,
    )


def lease(store: Store, owner: str, *, limit: int, lease_for: timedelta) -> list[LeasedJob]:
    """Lease up to ``limit`` due jobs, oldest first. A job that was interrupted before (its
    process died, or its lease ran out) is leased alone, so that a job that kills or hangs its
    process takes no batch down with it: a batch ends before the first such job, or is it."""
    now = utcnow()
    lock = "FOR UPDATE SKIP LOCKED" if store.is_postgres else ""
    with store.write() as conn:
        requeue_expired(conn, now)
        due = conn.execute(
            text(
                "SELECT id, interruptions FROM resync_job WHERE state = 'queued' "
                f"AND run_after <= :now ORDER BY id LIMIT :limit {lock}"
            ).bindparams(*ts_params("now")),
            {"now": now, "limit": limit},
        ).all()
        ids: list[int] = []
        for job_id, interruptions in due:
            if interruptions and ids:
                break
            ids.append(job_id)
            if interruptions:
                break
        if not ids:
            return []
        rows = conn.execute(
            text(
                """
                UPDATE resync_job SET state = 'running', lease_owner = :owner,
                    lease_expires = :expires, attempts = attempts + 1
                WHERE id IN :ids
                RETURNING id, user_id, live, attempts, run_id, refresh
                """
            ).bindparams(bindparam("ids", expanding=True), *ts_params("expires")),
            {"owner": owner, "expires": now + lease_for, "ids": ids},
        ).all()
    return sorted(
        (LeasedJob(r[0], r[1], bool(r[2]), r[3], r[4], bool(r[5])) for r in rows),
        key=lambda j: j.id,
    )


def complete(
    conn: Connection,
    jobs: Sequence[LeasedJob],
    results: dict[int, Counter[str]],
    rejected: Mapping[int, int] | None = None,
) -> None:
    """Mark jobs succeeded and add their group counts to the sync runs that queued them.
    ``rejected``: by job id, how many records the live answers held that the connectors
    rejected; a live job's result carries it as ``records_rejected``."""
    now = utcnow()
    per_run: dict[int, Counter[str]] = {}
    rows = []
    for job in jobs:
        res = results.get(job.user_id, Counter())
        result: dict[str, int] = {k: int(res.get(k, 0)) for k in GROUP_COUNTS}
        if job.live:
            result["records_rejected"] = int((rejected or {}).get(job.id, 0))
        rows.append((json.dumps(result), now, job.id))
        if job.run_id is not None:
            per_run.setdefault(job.run_id, Counter()).update(res)
            # Each user's changes count once, for the first job that carried them.
            results[job.user_id] = Counter()
    executemany(
        conn,
        "UPDATE resync_job SET state = 'succeeded', result = ?, finished_at = ?, "
        "lease_owner = NULL, lease_expires = NULL, last_error = NULL WHERE id = ?",
        rows,
        timestamps=True,
    )
    for run_id, counts in per_run.items():
        runs.add_run_counts(conn, run_id, {k: int(counts.get(k, 0)) for k in GROUP_COUNTS})


def fail(store: Store, job: LeasedJob, error: str, *, max_attempts: int, backoff: timedelta) -> str:
    """Record a failure: back to the queue after a growing delay, or `failed` for good."""
    now = utcnow()
    with store.write() as conn:
        if job.attempts >= max_attempts:
            state = "failed"
            conn.execute(
                text(
                    "UPDATE resync_job SET state = 'failed', last_error = :err, finished_at = :now, "
                    "lease_owner = NULL, lease_expires = NULL WHERE id = :id"
                ).bindparams(*ts_params("now")),
                {"err": error[:4000], "now": now, "id": job.id},
            )
            return state
        other = conn.execute(
            text("SELECT 1 FROM resync_job WHERE user_id = :u AND state = 'queued'"),
            {"u": job.user_id},
        ).first()
        if other is not None:
            # A newer queued job for this user will do the same work.
            conn.execute(text("DELETE FROM resync_job WHERE id = :id"), {"id": job.id})
            return "merged"
        delay = backoff * (2 ** (job.attempts - 1))
        conn.execute(
            text(
                "UPDATE resync_job SET state = 'queued', last_error = :err, run_after = :after, "
                "lease_owner = NULL, lease_expires = NULL WHERE id = :id"
            ).bindparams(*ts_params("after")),
            {"err": error[:4000], "after": now + delay, "id": job.id},
        )
        return "queued"


def release(store: Store, jobs: Iterable[LeasedJob]) -> None:
    """Give leases back untouched (shutdown while work was in hand)."""
    ids = [j.id for j in jobs]
    if not ids:
        return
    with store.write() as conn:
        conn.execute(
            text(
                "UPDATE resync_job SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
                "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END WHERE id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": ids},
        )


def _by_state(rows: Iterable[Any]) -> dict[str, int]:
    """(state, count) rows as a count for every state, those without jobs 0."""
    out = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    for state, n in rows:
        out[str(state)] = out.get(str(state), 0) + int(n)
    return out


def queue_depth(conn: Connection) -> dict[str, int]:
    return _by_state(conn.execute(text("SELECT state, count(*) FROM resync_job GROUP BY state")))


def job_due_soonest(conn: Connection) -> float | None:
    """Seconds until the next queued job is due (0 if one is due now), None if none queued."""
    row = conn.execute(
        text("SELECT min(run_after) FROM resync_job WHERE state = 'queued'")
    ).scalar()
    if row is None:
        return None
    due = as_utc(row)
    assert due is not None
    return max((due - utcnow()).total_seconds(), 0.0)


# -- enqueue ---------------------------------------------------------------------------------


def queue_resync(
    conn: Connection,
    user_ids: Iterable[int],
    *,
    reason: str,
    run_id: int | None,
    live: bool = False,
    refresh: bool | None = None,
) -> int:
    """Queue one job per user; a user with a queued job keeps that one.

    A request without a sync run (``run_id`` None: manual, import) re-reads every member of
    the user's groups (``refresh``; a run asks for it when it queues again users whose last
    job failed, whose member marks are gone). The kept job takes the newer reason and the
    newest sync run (whose report its group changes count in); a full re-read or a live one
    is never downgraded by a sync merging into it.
    """
    now = utcnow()
    refresh = run_id is None if refresh is None else refresh
    rows = [(uid, live, refresh, reason[:200], run_id, now, now) for uid in sorted(set(user_ids))]
    if not rows:
        return 0
    executemany(
        conn,
        "INSERT INTO resync_job (user_id, state, live, refresh, attempts, reason, run_id, "
        "run_after, created_at, result) VALUES (?, 'queued', ?, ?, 0, ?, ?, ?, ?, '{}') "
        "ON CONFLICT (user_id) WHERE state = 'queued' DO UPDATE SET reason = excluded.reason, "
        "run_id = COALESCE(excluded.run_id, resync_job.run_id), "
        "refresh = (resync_job.refresh OR excluded.refresh), "
        "live = (resync_job.live OR excluded.live)",
        rows,
        timestamps=True,
    )
    if conn.dialect.name == "postgresql":
        # Wakes idle daemon workers at once (delivered when this transaction commits).
        conn.execute(text(f"NOTIFY {RESYNC_CHANNEL}"))
    return len(rows)


def queued_jobs(conn: Connection, user_ids: Iterable[int]) -> list[tuple[int, bool, bool]]:
    """(user, refresh, live) of these users' queued jobs."""
    queued: list[tuple[int, bool, bool]] = []
    for chunk in chunks(sorted(user_ids)):
        queued += [
            (int(uid), bool(refresh), bool(live))
            for uid, refresh, live in conn.execute(
                in_text(
                    "SELECT user_id, refresh, live FROM resync_job "
                    "WHERE state = 'queued' AND user_id IN :ids",
                    "ids",
                    dialect=conn.dialect.name,
                ),
                {"ids": chunk},
            )
        ]
    return queued


def pending_users(conn: Connection) -> set[int]:
    """The users with a resync job still to run (queued, or running in some worker)."""
    return {
        int(uid)
        for (uid,) in conn.execute(
            text("SELECT DISTINCT user_id FROM resync_job WHERE state IN ('queued', 'running')")
        )
    }


def queued_job_ids(conn: Connection, user_ids: list[int]) -> dict[int, int]:
    """job id -> user id of these users' queued jobs."""
    return {
        r[0]: r[1]
        for r in conn.execute(
            text(
                "SELECT id, user_id FROM resync_job WHERE state = 'queued' AND user_id IN :u"
            ).bindparams(bindparam("u", expanding=True)),
            {"u": user_ids or [-1]},
        )
    }


def newest_job_ids(conn: Connection, user_ids: Collection[int]) -> dict[int, int]:
    """job id -> user id of each of these users' newest job, whatever its state."""
    rows = conn.execute(
        text(
            "SELECT max(id), user_id FROM resync_job WHERE user_id IN :u GROUP BY user_id"
        ).bindparams(bindparam("u", expanding=True)),
        {"u": sorted(user_ids)},
    ).all()
    return {int(job_id): int(user_id) for job_id, user_id in rows}


def newest_job_states(conn: Connection, user_ids: Collection[int]) -> dict[str, int]:
    """How many of these users' newest jobs are in each state (``queued`` after a drain: it
    failed and waits for its retry)."""
    ids = sorted(newest_job_ids(conn, user_ids)) if user_ids else []
    stmt = text("SELECT state, count(*) FROM resync_job WHERE id IN :ids GROUP BY state")
    stmt = stmt.bindparams(bindparam("ids", expanding=True))
    return _by_state(row for chunk in chunks(ids) for row in conn.execute(stmt, {"ids": chunk}))


def run_job_states(conn: Connection, run_id: int) -> dict[str, int]:
    """How many of the jobs a sync run queued (or last merged into) are in each state."""
    sql = "SELECT state, count(*) FROM resync_job WHERE run_id = :r GROUP BY state"
    return _by_state(conn.execute(text(sql), {"r": run_id}))
