"""`resync --wait`: waiting for the jobs a resync queued, while a daemon does them or, with
none running, doing them here."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rostersync import hints

if TYPE_CHECKING:
    from rostersync.cli.app import App
    from rostersync.progress import SyncProgress
    from rostersync.store.db import Store
    from rostersync.sync.engine import SyncEngine


def records_rejected(jobs: list[dict[str, Any]]) -> int:
    """How many records the connectors rejected in the finished live jobs' answers."""
    return sum(int((j.get("result") or {}).get("records_rejected", 0)) for j in jobs)


def wait_summary(jobs: list[dict[str, Any]], waited: Waited | None, seconds: float) -> str:
    """The last line of `resync --wait`: how the jobs ended, who did them, how long it took."""
    states = {s: sum(j["state"] == s for j in jobs) for s in ("succeeded", "failed")}
    left = len(jobs) - sum(states.values())
    parts = [f"{n} {state}" for state, n in states.items()]
    if left:
        parts.append(f"{left} unfinished")
    by = f" by {waited.processed_by}" if waited is not None and waited.processed_by else ""
    return f"{len(jobs)} job(s): {', '.join(parts)}; processed{by} in {seconds:.1f}s"


def live_daemons(app: App) -> list[str]:
    from rostersync.daemon import recovery

    return recovery.live_daemons(app.store, app.settings.leases.expire_after)


@dataclass
class Waited:
    jobs: list[dict[str, Any]]
    timed_out: bool
    processed_by: str | None  # "daemon", "this command", or None when nothing had to be done


#: How often `resync --wait` looks at its jobs (and for a daemon) while a daemon works.
WAIT_POLL = 0.25


async def wait_for_jobs(app: App, job_users: dict[int, int], seconds: float) -> Waited:
    """Wait until every job ended (succeeded, or failed for good), or ``seconds`` passed.

    While a daemon runs against the database it does the work and this only watches. When
    none does (none registered, or its heartbeat is older than ``leases.expire_after``), the
    jobs would wait for nobody: this command processes the queue itself, as `run --once`
    would, and says so; if a daemon appears meanwhile, it leaves the rest to it. The timeout
    is checked between batches."""
    import asyncio

    from rostersync.logs import configure as configure_logging
    from rostersync.progress import SyncProgress

    deadline = time.monotonic() + seconds
    progress = SyncProgress(sys.stderr) if sys.stderr.isatty() else None
    if progress is not None:
        configure_logging(
            app.log_level or app.settings.logging.level,
            app.settings.logging.format,
            progress.log_stream,
        )
    engine: SyncEngine | None = None
    by: str | None = None
    waiting = dict(job_users)
    try:
        app.prepare()  # jobs leased by a dead process of this host go back to the queue now
        while True:
            jobs = await asyncio.to_thread(_follow_jobs, app.store, waiting)
            unfinished = [j for j in jobs if j["state"] not in ("succeeded", "failed")]
            if progress is not None and jobs:
                done = len(jobs) - len(unfinished)
                progress.resync(done, len(unfinished), final=not unfinished)
            if not unfinished:
                return Waited(jobs, timed_out=False, processed_by=by)
            daemons = await asyncio.to_thread(live_daemons, app)
            if daemons and by != "daemon":
                by = "daemon"
                _notice(
                    progress,
                    "resync_waiting_for_daemon",
                    f"waiting for the daemon {daemons[0]} to process them",
                )
            elif not daemons and by != "this command":
                by = "this command"
                _notice(
                    progress,
                    "resync_processing_here",
                    "no daemon is running against this database: processing the queue here "
                    f"(as `{hints.command('run --once')}` would)",
                )
            left = deadline - time.monotonic()
            if left <= 0:
                return Waited(jobs, timed_out=True, processed_by=by)
            if daemons:
                await asyncio.sleep(min(WAIT_POLL, left))
                continue
            if engine is None:
                engine = app.engine()
            if not await engine.process_batch():
                # Nothing due: ours wait out a retry's backoff, or another process holds them.
                due = await asyncio.to_thread(_due_soonest, app.store)
                await asyncio.sleep(min(max(due or 0.0, WAIT_POLL), 1.0, left))
    finally:
        if progress is not None:
            progress.close()
            configure_logging(
                app.log_level or app.settings.logging.level, app.settings.logging.format
            )


def _follow_jobs(store: Store, waiting: dict[int, int]) -> list[dict[str, Any]]:
    """The jobs waited for. A job that is gone was folded into a newer job of its user (a
    retry that found one queued): that one is followed instead."""
    from rostersync import directory
    from rostersync.resync.queue import newest_job_ids

    with store.read() as conn:
        jobs = directory.list_jobs(conn, sorted(waiting))
        gone = set(waiting) - {j["id"] for j in jobs}
        if gone:
            users = {waiting.pop(job_id) for job_id in gone}
            waiting.update(newest_job_ids(conn, users))
            jobs = directory.list_jobs(conn, sorted(waiting))
    return jobs


def _due_soonest(store: Store) -> float | None:
    from rostersync.resync.queue import job_due_soonest

    with store.read() as conn:
        return job_due_soonest(conn)


def _notice(progress: SyncProgress | None, event: str, message: str) -> None:
    from rostersync.logs import notice

    if progress is not None:
        progress.log_stream.write(f"{message}\n")
    else:
        notice(event, message)
