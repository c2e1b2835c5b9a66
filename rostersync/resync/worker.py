"""The resync workers' batch step: lease due jobs, fetch live rosters, rebuild the users'
groups and mark the jobs done, all in one transaction per batch; and the drain that repeats it.

:class:`ResyncWorker` is the part of :class:`~rostersync.sync.engine.SyncEngine` that runs
after a sync: the engine supplies the store, the settings, its lease owner and its
connectors. It also paces the PostgreSQL statistics refreshes while groups are created.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.logs import scrub
from rostersync.resync.groups import follow_answered, rebuild_groups
from rostersync.resync.live import apply_teacher_roster
from rostersync.resync.queue import GROUP_COUNTS, LeasedJob, complete, fail, lease
from rostersync.source.connector import Connector
from rostersync.source.records import Rejected, TeacherRef, TeacherRoster
from rostersync.store.db import Store, lock_directory, utcnow
from rostersync.sync import merge as merging
from rostersync.sync.scope import keep_mirrored_classes, scope_for

#: Seconds between statistics refreshes of the directory tables by the resync workers.
ANALYZE_EVERY = 30.0
#: How many of a live answer's rejections ``live_answer_rejected`` names (the count is whole).
LOGGED_REASONS = 5


def _reason(r: Rejected) -> str:
    """One rejection for a log line: ``user s-9: missing role (users.csv line 14)``."""
    where = f" ({r.location})" if r.location else ""
    return scrub(f"{r.entity} {r.sourced_id or '(no id)'}: {r.reason}{where}")


class ResyncWorker:
    """Processes resync batches for the engine that inherits it."""

    settings: Settings
    store: Store
    owner: str
    log: Any

    def _register(self) -> None:
        raise NotImplementedError

    def connector(self, source: str) -> AbstractAsyncContextManager[Connector]:
        raise NotImplementedError

    def _init_pacing(self) -> None:
        self._analyzed_at = float("-inf")
        self._created_unanalyzed = 0  # groups created since the last refresh, and before it
        self._created_analyzed = 0
        # Batches run in threads, several at once on PostgreSQL: one claims each refresh.
        self._stats_lock = threading.Lock()

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
            if roster.rejected:
                # Nothing else tells the operator: the records stay as the last sync left them.
                self.log.warning(
                    "live_answer_rejected",
                    job_id=job.id,
                    user_id=job.user_id,
                    source=source,
                    count=len(roster.rejected),
                    reasons=[_reason(r) for r in roster.rejected[:LOGGED_REASONS]],
                )
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
            answered: list[tuple[int, str, set[str]]] = []  # (user, source, classes changed)
            for job in jobs:
                for source, ext, roster in live.get(job.id, []):
                    config = self.settings.sources.get(source)
                    if config is not None and scope_for(config) is not None:
                        roster = keep_mirrored_classes(conn, source, roster)
                    classes = apply_teacher_roster(conn, source, ext, roster)
                    answered.append((job.user_id, source, classes))
            # Manual and live resyncs re-read every member; sync-queued ones only what changed.
            results = rebuild_groups(
                conn,
                [j.user_id for j in jobs],
                teacher_roles=self.settings.provisioning.teacher_roles,
                refresh_all=[j.user_id for j in jobs if j.refresh or j.live],
            )
            # No teacher's resync reads a group that import owners alone keep: it follows the
            # classes the answers changed here, as a sync's changes (after the rebuild, which
            # may give it a teacher again). Credited to the job whose answer changed it.
            stamp = utcnow()
            for uid, source, classes in answered:
                followed = follow_answered(conn, source, classes, stamp)
                results[uid]["groups_updated"] += len(followed)
            totals = {k: sum(r[k] for r in results.values()) for k in GROUP_COUNTS}
            # Counted as the connector answered, before the scope keeps some of it out.
            rejected = {
                j.id: sum(len(r.rejected) for _, _, r in live[j.id]) for j in jobs if j.id in live
            }
            complete(conn, jobs, results, rejected)
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
        # The first batch alone: a drain that fits in one batch (a small run's) stays one,
        # where workers leasing at once split it and two batches could each credit a change
        # to a group they share.
        first = await self.process_batch()
        if not first:
            return done
        done += len(first)
        if on_batch is not None:
            on_batch(done)
        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return done
