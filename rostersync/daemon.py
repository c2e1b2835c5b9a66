"""``rostersync run``: scheduled syncs, resync workers, systemd integration, metrics.

One asyncio loop carries everything::

    APScheduler job per source ──► sync task (shielded, tracked) ──► wakes the workers
    resync.workers worker tasks ──► engine.process_batch() ◄── LISTEN rostersync_resync (PG)
    ticker: heartbeat for /healthz, WATCHDOG=1 at half WATCHDOG_USEC
    signals: SIGHUP reload · SIGTERM/SIGINT drain and exit 0 (a second one stops waiting)

Several instances may share one PostgreSQL database: a source's sync is guarded by the
engine's lease row (the loser logs ``sync_skipped_busy``), jobs are leased with
``FOR UPDATE SKIP LOCKED``, and a dead instance's job leases expire after ``resync.lease``.
What dead processes of this host leave behind is put right at start and every
``leases.expire_after / 4`` (:mod:`rostersync.recovery`), when the daemon's heartbeat is
written too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from sqlalchemy import text
from sqlalchemy.engine import make_url

from rostersync import recovery
from rostersync.config.loader import file_problems, load_settings
from rostersync.config.models import Settings
from rostersync.config.schedule import Schedule, build_trigger, misfire_grace
from rostersync.errors import ConfigError
from rostersync.logs import configure as configure_logging
from rostersync.logs import forward_stdlib, register_secrets_in, scrub
from rostersync.metrics import Metrics, MetricsServer, StoreState, read_store_state
from rostersync.resync.queue import RESYNC_CHANNEL, job_due_soonest
from rostersync.store.db import Store, as_utc, utcnow
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import SourceBusy, instance_id
from rostersync.systemd import Notifier

#: Idle workers look for due jobs this often on SQLite (the bound is 5 s; no NOTIFY there).
SQLITE_POLL = 1.0
#: With LISTEN/NOTIFY, polling only catches leases that expired and jobs whose backoff ended.
PG_POLL = 5.0
#: An idle worker calls the queue's lease step at least this often even when nothing looks
#: due, because that step is also what returns expired leases to the queue.
LEASE_SWEEP = 5.0
#: /healthz calls the scheduler dead when the loop has not ticked for this long.
HEARTBEAT_STALE = 30.0
OUTBOX_EVERY = 30.0
#: The error of a run the daemon's stop cut off.
STOPPED = "interrupted: the daemon stopped"


def pg_conninfo(url: str) -> str:
    """The libpq URI for a SQLAlchemy ``postgresql+psycopg://`` URL (options kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- the daemon ---------------------------------------------------------------------------------


@dataclass
class LastRun:
    status: str
    run_id: int
    finished_at: datetime | None


@dataclass
class SchedulePlan:
    """The scheduler changes a config needs, every trigger already built: whatever can fail
    while building fails before the scheduler is touched."""

    add: dict[str, tuple[Schedule, BaseTrigger]]  # new or changed schedules
    remove: list[str]  # sources no longer scheduled
    manual: list[str]  # enabled sources without a schedule (run by hand)


def job_id(source: str) -> str:
    return f"sync:{source}"


@dataclass
class _Worker:
    index: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    retire: bool = False
    task: asyncio.Task[None] | None = None


class Daemon:
    """The long-running process; :meth:`run` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        config_file: str | os.PathLike[str],
        owner: str | None = None,
        stop_timeout: float = 60.0,
        log_level: str | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.config_file = Path(config_file)
        self.owner = owner or instance_id()
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.notifier = notifier or Notifier()
        self.log = structlog.get_logger()
        self.metrics = Metrics(self._store_state, instance=self.owner)
        self.engine = self._make_engine(settings)
        self.scheduler: AsyncIOScheduler | None = None
        self.last_runs: dict[str, LastRun] = {}
        self._server: MetricsServer | None = None
        self._server_listen: str | None = None
        self._workers: list[_Worker] = []
        self._syncs: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._scheduled: dict[str, Schedule] = {}
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stopping = False
        self._listening = False
        self._heartbeat = time.monotonic()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[Any]] = set()
        # Sources whose first scheduled run is the catch-up at start (never synced, or
        # overdue): that run's trigger is "startup", the later ones "schedule".
        self._catch_up: set[str] = set()
        self._started = False

    def _make_engine(self, settings: Settings) -> SyncEngine:
        return SyncEngine(
            settings,
            self.store,
            owner=self.owner,
            http_event_hooks=self.metrics.http_event_hooks(),
            interrupted_by="the daemon stopped",
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        structlog.contextvars.bind_contextvars(instance=self.owner)
        forward_stdlib("apscheduler", "asyncio")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            found = await asyncio.to_thread(recovery.recover, self.store, self.owner)
            await asyncio.to_thread(recovery.register, self.store, self.owner, "daemon")
            await asyncio.to_thread(self._load_history)
        except Exception as exc:
            self.log.error("daemon_start_failed", error=scrub(str(exc)))
            return 1
        if found:
            self.log.warning("recovered_after_crash", **found.as_log())
        await self._warn_about_files()
        try:
            self._apply_metrics_listen()
        except OSError as exc:
            self.log.error("metrics_listen_failed", listen=self._listen_address(), error=str(exc))
            return 1

        try:
            self.start_scheduler()
        except Exception as exc:
            # The config check builds these same triggers, so this is rare: say why, no traceback.
            self.log.error(
                "daemon_start_failed", error=scrub(str(exc)), error_type=type(exc).__name__
            )
            if self._server is not None:
                self._server.stop()
            return 1
        self._background.append(asyncio.create_task(self._ticker(), name="ticker"))
        self._background.append(asyncio.create_task(self._keepalive(), name="keepalive"))
        if self.store.is_postgres:
            self._background.append(asyncio.create_task(self._listen(), name="listen"))
        self._background.append(asyncio.create_task(self._outbox_loop(), name="outbox"))

        self.log.info(
            "daemon_started",
            sources=sorted(self._scheduled),
            workers=self.settings.resync.workers,
            database=repr(self.store),
            metrics=self._server_listen,
            watchdog_seconds=self.notifier.watchdog_interval,
        )
        self.notifier.ready(self.status_text())
        await self._stop.wait()
        await self._shutdown()
        return 0

    def start_scheduler(self) -> None:
        """Start the scheduler with a job per scheduled source, and the resync workers."""
        self.scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.scheduler.start()
        try:
            self._add_jobs(self._plan_schedule(self.settings))
        except Exception:
            self.scheduler.shutdown(wait=False)
            raise
        self._started = True  # sources added by a reload later are not the start's catch-up
        self._resize_workers(self.settings.resync.workers)

    def request_stop(self, why: str = "stop") -> None:
        if self._stop.is_set():
            self.log.warning("stop_hurried", signal=why)
            self._hurry.set()  # a second signal: stop waiting for in-flight work
            return
        self.log.info("stop_requested", signal=why)
        self._stop.set()

    async def _shutdown(self) -> None:
        self._stopping = True
        self.notifier.stopping()
        if self.scheduler is not None and self.scheduler.running:
            # No new runs from here on; the running sync tasks are shielded from the
            # executor's cancellation and are waited for below.
            self.scheduler.shutdown(wait=False)
        for w in self._workers:
            w.wake.set()
        pending: set[asyncio.Task[Any]] = {*self._syncs, *(w.task for w in self._workers if w.task)}
        pending |= self._reloads
        self.log.info("draining", syncs=len(self._syncs), workers=len(self._workers))
        hurry = asyncio.create_task(self._hurry.wait())
        deadline = time.monotonic() + self.stop_timeout
        while pending and not self._hurry.is_set():
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            done, _ = await asyncio.wait(
                {*pending, hurry}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
        hurry.cancel()
        if pending:
            self.log.warning("drain_cut_short", unfinished=len(pending))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # What the cut-off left: a sync stopped in its fetch has failed itself ("interrupted:
        # the daemon stopped"); anything still under our name goes now, and jobs in hand go
        # back to the queue untouched.
        try:
            released = await asyncio.to_thread(
                recovery.release_owner, self.store, self.owner, STOPPED
            )
        except Exception as exc:  # the next start (or any command) recovers it instead
            self.log.error("release_at_stop_failed", error=scrub(str(exc)))
        else:
            if released.requeued_jobs:
                self.log.info("leases_released", jobs=released.requeued_jobs)
            if released.interrupted_runs:
                self.log.warning("runs_interrupted_at_stop", run_ids=released.interrupted_runs)
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
        self.log.info("daemon_stopped")

    # -- schedule ------------------------------------------------------------------------------

    def _plan_schedule(self, settings: Settings) -> SchedulePlan:
        """What the scheduler must change for ``settings``; unchanged schedules are left out so
        a reload does not reset their next run."""
        wanted = {
            name: cfg.schedule
            for name, cfg in settings.sources.items()
            if cfg.enabled and cfg.schedule is not None
        }
        add: dict[str, tuple[Schedule, BaseTrigger]] = {}
        now = datetime.now(UTC)
        for name, schedule in wanted.items():
            if self._scheduled.get(name) == schedule:
                continue
            trigger = build_trigger(schedule, start=self._first_start(name, schedule))
            if trigger.get_next_fire_time(None, now) is None:
                raise ValueError(f"the schedule of source {name!r} never fires")
            add[name] = (schedule, trigger)
        manual = [
            name
            for name, cfg in settings.sources.items()
            if cfg.enabled and cfg.schedule is None and name not in self._scheduled
        ]
        return SchedulePlan(add, [n for n in self._scheduled if n not in wanted], manual)

    def _snapshot_jobs(
        self, plan: SchedulePlan
    ) -> tuple[dict[str, Job | None], dict[str, Schedule]]:
        """The jobs ``plan`` touches, as they are now, for :meth:`_restore_jobs`."""
        assert self.scheduler is not None
        names = [*plan.add, *plan.remove]
        return {n: self.scheduler.get_job(job_id(n)) for n in names}, dict(self._scheduled)

    def _restore_jobs(self, snapshot: tuple[dict[str, Job | None], dict[str, Schedule]]) -> None:
        """Put the jobs of a snapshot back exactly, next run time included."""
        assert self.scheduler is not None
        jobs, scheduled = snapshot
        for name, job in jobs.items():
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job(job_id(name))
            if job is not None:
                self.scheduler.add_job(
                    job.func,
                    job.trigger,
                    args=job.args,
                    id=job.id,
                    name=job.name,
                    coalesce=job.coalesce,
                    max_instances=job.max_instances,
                    misfire_grace_time=job.misfire_grace_time,
                    next_run_time=job.next_run_time,
                    replace_existing=True,
                )
        self._scheduled = scheduled

    def _add_jobs(self, plan: SchedulePlan) -> None:
        """Add or replace the planned jobs; if one fails, the others are put back as they were."""
        assert self.scheduler is not None
        snapshot = self._snapshot_jobs(plan)
        added: list[tuple[str, Job]] = []
        try:
            for name, (schedule, trigger) in plan.add.items():
                job = self.scheduler.add_job(
                    self._scheduled_sync,
                    trigger,
                    args=[name],
                    id=job_id(name),
                    name=f"sync {name}",
                    coalesce=True,
                    max_instances=1,
                    misfire_grace_time=misfire_grace(schedule),
                    replace_existing=True,
                )
                self._scheduled[name] = schedule
                added.append((name, job))
        except Exception:
            self._restore_jobs(snapshot)
            raise
        for name in plan.manual:
            self.log.info(
                "source_unscheduled", source=name, hint=f"rostersync sync --source {name}"
            )
        for name, job in added:
            self.log.info("source_scheduled", source=name, next_run=str(job.next_run_time))

    def _remove_jobs(self, plan: SchedulePlan) -> None:
        assert self.scheduler is not None
        for name in plan.remove:
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job(job_id(name))
            self._scheduled.pop(name, None)

    def _first_start(self, name: str, schedule: Schedule) -> datetime | None:
        """Interval schedules continue from the last success instead of restarting the clock
        at every daemon start: a source synced 5 h ago on a 6 h interval runs in 1 h, one never
        synced (or overdue) runs now."""
        if schedule.interval is None:
            return None
        soon = utcnow() + timedelta(seconds=0.5)
        with self.store.read() as conn:
            row = conn.execute(
                text("SELECT last_success_at FROM source_state WHERE source = :s"), {"s": name}
            ).first()
        last = as_utc(row[0]) if row else None
        start = soon if last is None else max(soon, last + schedule.interval)
        if start == soon and not self._started:
            self._catch_up.add(name)
        return start

    async def _scheduled_sync(self, source: str) -> None:
        if self._stopping:
            return
        trigger = "startup" if source in self._catch_up else "schedule"
        self._catch_up.discard(source)
        task = self._spawn_sync(source, trigger)
        try:
            # Shielded: on shutdown APScheduler cancels this coroutine, but the sync itself
            # must finish (or be cut off by our own drain timeout).
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not self._stopping:
                raise

    def _spawn_sync(self, source: str, trigger: str) -> asyncio.Task[None]:
        task = asyncio.create_task(
            self._sync_one(self.engine, source, trigger), name=f"sync:{source}"
        )
        self._syncs.add(task)
        task.add_done_callback(self._syncs.discard)
        return task

    async def _sync_one(self, engine: SyncEngine, source: str, trigger: str) -> None:
        log = self.log.bind(source=source)
        started = time.monotonic()
        try:
            report = await engine.sync(source, trigger=trigger)
        except SourceBusy as exc:
            # Another instance is syncing it: that is the lease doing its job.
            log.info("sync_skipped_busy", reason=str(exc))
            return
        except Exception as exc:
            log.error("sync_crashed", error=scrub(str(exc)), error_type=type(exc).__name__)
            self.metrics.record_run(source, "failed", time.monotonic() - started)
            return
        finished = report.finished_at or utcnow()
        self.last_runs[source] = LastRun(report.status, report.id, finished)
        self.metrics.record_run(source, report.status, time.monotonic() - started)
        log.bind(run_id=report.id).info(
            "scheduled_sync_done",
            status=report.status,
            mode=report.mode,
            seconds=round(time.monotonic() - started, 3),
            users_created=report.counts.get("users_created", 0),
            resync_queued=report.counts.get("resync_queued", 0),
            error=report.error,
            hold_reason=report.hold_reason,
        )
        self._wake_workers()  # on SQLite there is no NOTIFY for the jobs this run queued
        self.notifier.status(self.status_text())

    def _load_history(self) -> None:
        """Last run per source, so STATUS starts true."""
        with self.store.read() as conn:
            rows = conn.execute(
                text(
                    "SELECT source, status, id, finished_at FROM sync_run WHERE id IN "
                    "(SELECT max(id) FROM sync_run WHERE status <> 'running' AND dry_run = :no "
                    "GROUP BY source)"
                ),
                {"no": False},
            ).all()
        for source, status, run_id, finished in rows:
            self.last_runs[source] = LastRun(status, int(run_id), as_utc(finished))

    def status_text(self) -> str:
        parts = []
        for name, cfg in self.settings.sources.items():
            if not cfg.enabled:
                continue
            last = self.last_runs.get(name)
            if last is None:
                parts.append(f"{name}: never run")
            else:
                at = (
                    last.finished_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
                    if last.finished_at
                    else "?"
                )
                parts.append(f"{name}: {last.status} {at} (run {last.run_id})")
        return "; ".join(parts) or "no enabled source"

    # -- resync workers ------------------------------------------------------------------------

    def _resize_workers(self, want: int) -> None:
        live = [w for w in self._workers if not w.retire]
        for w in live[want:]:
            w.retire = True  # finishes its batch, then leaves
            w.wake.set()
        next_index = max((w.index for w in self._workers), default=-1) + 1
        for i in range(max(0, want - len(live))):
            worker = _Worker(next_index + i)
            worker.task = asyncio.create_task(self._worker(worker), name=f"worker:{worker.index}")
            self._workers.append(worker)

    def _wake_workers(self) -> None:
        for w in self._workers:
            w.wake.set()

    def _poll_interval(self) -> float:
        return PG_POLL if self._listening else SQLITE_POLL

    async def _worker(self, me: _Worker) -> None:
        structlog.contextvars.bind_contextvars(worker=me.index)
        last_lease = 0.0
        try:
            while not self._stopping and not me.retire:
                me.wake.clear()
                started = time.monotonic()
                last_lease = started
                try:
                    outcomes = await self.engine.process_batch()
                except Exception as exc:
                    self.log.error(
                        "resync_worker_error", error=scrub(str(exc)), error_type=type(exc).__name__
                    )
                    await self._idle(me, 5.0)
                    continue
                if outcomes:
                    self.metrics.record_jobs((o for _, o in outcomes), time.monotonic() - started)
                    for job, outcome in outcomes:
                        # One line per job only at debug for successes; a batch line is at info.
                        self.log.log(
                            logging.DEBUG if outcome == "succeeded" else logging.WARNING,
                            "resync_job_done",
                            job_id=job.id,
                            user_id=job.user_id,
                            run_id=job.run_id,
                            attempt=job.attempts,
                            outcome=outcome,
                        )
                    continue
                # Nothing was due. Sleep until woken (NOTIFY, a local sync) or until the next
                # job's backoff ends, checking cheaply (a read) before leasing again (a write).
                while not self._stopping and not me.retire:
                    due = await asyncio.to_thread(self._due_soonest)
                    if due == 0.0:
                        # Due but not leased: another worker or instance holds it for a moment.
                        await self._idle(me, 0.1)
                        break
                    if time.monotonic() - last_lease >= LEASE_SWEEP:
                        break
                    wait = self._poll_interval() if due is None else min(due, self._poll_interval())
                    if await self._idle(me, wait):
                        break
        finally:
            self._workers = [w for w in self._workers if w is not me]

    async def _idle(self, me: _Worker, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if woken early."""
        try:
            await asyncio.wait_for(me.wake.wait(), timeout=max(seconds, 0.01))
        except TimeoutError:
            return False
        me.wake.clear()
        return True

    def _due_soonest(self) -> float | None:
        with self.store.read() as conn:
            return job_due_soonest(conn)

    def _store_state(self) -> StoreState:
        """For a scrape (in the metrics thread): the store's view of every source and the
        queue, with the schedules running now."""
        settings, scheduled = self.settings, dict(self._scheduled)
        with self.store.read() as conn:
            return read_store_state(conn, settings.sources, scheduled)

    async def _listen(self) -> None:
        """LISTEN on the resync channel and wake the workers on every NOTIFY; reconnects."""
        import psycopg

        conninfo = pg_conninfo(self.store.url)
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {RESYNC_CHANNEL}")
                    self._listening = True
                    delay = 1.0
                    self.log.debug("listening", channel=RESYNC_CHANNEL)
                    self._wake_workers()  # whatever was queued while we were not listening
                    async for _ in conn.notifies():
                        self._wake_workers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("listen_failed", error=scrub(str(exc)), retry_in=delay)
            finally:
                self._listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    # -- keep-alives, health ---------------------------------------------------------------------

    async def _ticker(self) -> None:
        watchdog = self.notifier.watchdog_interval
        next_dog = time.monotonic()
        while True:
            self._heartbeat = time.monotonic()
            if watchdog is not None and self._heartbeat >= next_dog:
                # Only a loop that still ticks, with a running scheduler, keeps systemd calm.
                if self.scheduler is not None and self.scheduler.running:
                    self.notifier.watchdog()
                next_dog = self._heartbeat + watchdog
            await asyncio.sleep(min(1.0, watchdog or 1.0))

    def unscheduled_sources(self) -> list[str]:
        """Enabled sources with a ``schedule`` that have no job in the scheduler: they would
        silently never run. (Sources without ``schedule`` are run by hand and are fine.)"""
        settings, scheduler = self.settings, self.scheduler
        expected = [n for n, c in settings.sources.items() if c.enabled and c.schedule is not None]
        if scheduler is None:
            return expected
        return [n for n in expected if scheduler.get_job(job_id(n)) is None]

    async def _keepalive(self) -> None:
        """Every quarter of ``leases.expire_after``: the daemon's heartbeat (``resync --wait``
        and other hosts look for it), and recovery from processes of this host that died
        meanwhile (a killed ``rostersync sync`` must not hold its jobs for ``resync.lease``)."""
        while True:
            await asyncio.sleep(self.settings.leases.expire_after.total_seconds() / 4)
            try:
                await asyncio.to_thread(recovery.heartbeat, self.store, self.owner)
                found = await asyncio.to_thread(
                    recovery.recover, self.store, self.owner, previous_self=False
                )
            except Exception as exc:
                self.log.warning("keepalive_failed", error=scrub(str(exc)))
                continue
            if found:
                self.log.warning("recovered_after_crash", **found.as_log())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Called from the metrics thread: scheduler alive with a job for every scheduled
        source, and database reachable."""
        age = time.monotonic() - self._heartbeat
        scheduler_ok = bool(
            self.scheduler is not None
            and self.scheduler.running
            and age < HEARTBEAT_STALE
            and not self._stopping
        )
        unscheduled = self.unscheduled_sources()
        db_error = None
        try:
            with self.store.read() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            db_error = scrub(str(exc))[:500]
        detail: dict[str, Any] = {
            "instance": self.owner,
            "scheduler": scheduler_ok,
            "database": db_error is None,
            "heartbeat_age_seconds": round(age, 3),
            "unscheduled_sources": unscheduled,
            "sources": {
                name: {"status": r.status, "run_id": r.run_id, "finished_at": r.finished_at}
                for name, r in self.last_runs.items()
            },
        }
        if db_error:
            detail["database_error"] = db_error
        return scheduler_ok and not unscheduled and db_error is None, detail

    def _listen_address(self) -> str | None:
        return self.settings.metrics.listen if self.settings.metrics else None

    def _apply_metrics_listen(self) -> None:
        want = self._listen_address()
        if want is not None and want != self._server_listen:
            self._server = MetricsServer(want, self.metrics, self.health).start()
            self._server_listen = want

    def _open_metrics(self, want: str | None) -> tuple[MetricsServer | None, bool]:
        """Start the listener a new config asks for while the old one still serves.

        Returns it (None when ``want`` is None) and whether the old listener had to be stopped
        first: it held the port under another spelling of the host (``127.0.0.1`` to
        ``0.0.0.0``). If the new address cannot be bound, the old listener is serving again.
        """
        if want is None:
            return None, False
        old = self._server_listen
        try:
            return MetricsServer(want, self.metrics, self.health).start(), False
        except OSError:
            same_port = old is not None and old.rpartition(":")[2] == want.rpartition(":")[2]
            if self._server is None or old is None or not same_port:
                raise
        self._server.stop()
        try:
            return MetricsServer(want, self.metrics, self.health).start(), True
        except OSError:
            self._server = MetricsServer(old, self.metrics, self.health).start()
            raise

    # -- outbox ------------------------------------------------------------------------------------

    async def _outbox_loop(self) -> None:
        """Send queued e-mails (import invitations) every OUTBOX_EVERY seconds."""
        from rostersync.importer import send_outbox

        while True:
            smtp = self.settings.smtp
            if smtp is not None:
                try:
                    result = await asyncio.to_thread(send_outbox, self.store, smtp)
                    if result.sent or result.failed:
                        self.log.info("outbox_sent", sent=result.sent, failed=result.failed)
                except Exception as exc:  # the mailer must never take the daemon down
                    self.log.warning("outbox_failed", error=scrub(str(exc)))
            await asyncio.sleep(OUTBOX_EVERY)

    # -- reload --------------------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._stopping:
            return
        task = asyncio.create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task[Any]) -> None:
        self._reloads.discard(task)
        # reload() turns every failure into a rejection; this only keeps asyncio from printing
        # "Task exception was never retrieved" should something slip through.
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error(
                "config_reload_rejected", errors=[scrub(str(exc))], kept="previous config"
            )

    async def reload(self) -> bool:
        """Re-read the config and apply it whole, or keep the running one whole.

        Any failure (loading, validation, building triggers, scheduling, workers, the metrics
        listener) leaves the old config, schedules and listener in place and logs
        ``config_reload_rejected``. systemd hears RELOADING=1 and then always READY=1.
        """
        async with self._reload_lock:
            self.notifier.reloading()
            log = self.log.bind(config=str(self.config_file))
            status: str | None = None
            try:
                try:
                    new = await asyncio.to_thread(load_settings, self.config_file)
                    register_secrets_in(new)
                    if new.database != self.settings.database:
                        log.warning("config_database_change_needs_restart", kept=repr(self.store))
                        new = new.model_copy(update={"database": self.settings.database})
                    self._switch_config(new)
                except ConfigError as exc:
                    errors = [str(i) for i in exc.issues] or [str(exc)]
                except Exception as exc:
                    errors = [f"{type(exc).__name__}: {scrub(str(exc))}"]
                else:
                    await self._warn_about_files()
                    self.metrics.reloads.labels("applied").inc()
                    log.info(
                        "config_reloaded",
                        sources=sorted(self._scheduled),
                        workers=new.resync.workers,
                    )
                    status = self.status_text()
                    return True
                log.error("config_reload_rejected", errors=errors, kept="previous config")
                self.metrics.reloads.labels("rejected").inc()
                status = f"config reload rejected ({len(errors)} error(s)); {self.status_text()}"
                return False
            finally:
                if not self._stopping:
                    self.notifier.ready(status or "config reload failed")

    async def _warn_about_files(self) -> None:
        """A source whose drop folder or CA bundle is missing still runs (and fails, saying
        why) without holding up the others; the log says so at start and on every reload."""
        problems = await asyncio.to_thread(file_problems, self.config_file)
        if problems:
            self.log.warning("config_files_missing", errors=problems)

    def _switch_config(self, new: Settings) -> None:
        """Apply ``new`` all or nothing: first everything that can fail without changing
        anything (triggers, engine, binding the new metrics address), then the switch, each
        step of which is undone if a later one fails."""
        assert self.scheduler is not None
        plan = self._plan_schedule(new)
        engine = self._make_engine(new)
        want = new.metrics.listen if new.metrics else None
        old_server, old_listen = self._server, self._server_listen
        new_server, old_stopped = (None, False)
        if want != old_listen:
            new_server, old_stopped = self._open_metrics(want)
        old_settings, old_engine = self.settings, self.engine
        old_workers = old_settings.resync.workers
        snapshot = self._snapshot_jobs(plan)
        step = "schedules"
        try:
            self._add_jobs(plan)
            step = "config"
            self.settings, self.engine = new, engine
            self._remove_jobs(plan)
            step = "workers"
            self._resize_workers(new.resync.workers)
            step = "logging"
            if self.log_level is None:
                configure_logging(new.logging.level, new.logging.format)
        except Exception:
            self.log.warning("config_reload_undone", failed_at=step)
            if step in ("workers", "logging"):
                self._resize_workers(old_workers)
            self.settings, self.engine = old_settings, old_engine
            self._restore_jobs(snapshot)
            if new_server is not None:
                new_server.stop()
                if old_stopped and old_listen is not None:
                    self._server = MetricsServer(old_listen, self.metrics, self.health).start()
            raise
        if want != old_listen:
            if old_server is not None and not old_stopped:
                old_server.stop()
            self._server, self._server_listen = new_server, want


def run_daemon(
    settings: Settings,
    store: Store,
    *,
    config_file: str | os.PathLike[str],
    instance_id: str | None = None,
    stop_timeout: float = 60.0,
    log_level: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    daemon = Daemon(
        settings,
        store,
        config_file=config_file,
        owner=instance_id,
        stop_timeout=stop_timeout,
        log_level=log_level,
    )
    return asyncio.run(daemon.run())
