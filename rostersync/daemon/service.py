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
``leases.expire_after / 4`` (:mod:`rostersync.daemon.recovery`), when the daemon's heartbeat is
written too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text

from rostersync import hints
from rostersync.config.loader import file_problems, load_settings
from rostersync.config.models import Settings
from rostersync.daemon import recovery
from rostersync.daemon.metrics import (
    Metrics,
    MetricsServer,
    StoreState,
    listen_hint,
    read_store_state,
)
from rostersync.daemon.schedule import SourceJobs
from rostersync.daemon.systemd import Notifier
from rostersync.daemon.workers import ResyncWorkers
from rostersync.errors import ConfigError, ConfigIssue
from rostersync.logs import configure as configure_logging
from rostersync.logs import forward_stdlib, register_secrets_in, scrub
from rostersync.store.db import Store, as_utc, utcnow
from rostersync.sync import history
from rostersync.sync.engine import SyncEngine
from rostersync.sync.leasing import SourceBusy
from rostersync.sync.runs import instance_id

#: /healthz calls the scheduler dead when the loop has not ticked for this long.
HEARTBEAT_STALE = 30.0
OUTBOX_EVERY = 30.0
#: The error of a run the daemon's stop cut off.
STOPPED = "interrupted: the daemon stopped"


@dataclass
class LastRun:
    status: str
    run_id: int
    finished_at: datetime | None


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
        self.jobs = SourceJobs(store, self._scheduled_sync, self.log)
        self.resync = ResyncWorkers(
            store,
            engine=lambda: self.engine,
            metrics=self.metrics,
            stopping=lambda: self._stopping,
            log=self.log,
        )
        self.last_runs: dict[str, LastRun] = {}
        self._server: MetricsServer | None = None
        self._server_listen: str | None = None
        self._syncs: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stopping = False
        self._heartbeat = time.monotonic()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[Any]] = set()

    @property
    def scheduler(self) -> AsyncIOScheduler | None:
        return self.jobs.scheduler

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
            self.log.error(
                "metrics_listen_failed",
                listen=self._listen_address(),
                error=str(exc),
                hint=listen_hint(exc),
            )
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
            self._background.append(asyncio.create_task(self.resync.listen(), name="listen"))
        self._background.append(asyncio.create_task(self._outbox_loop(), name="outbox"))

        self.log.info(
            "daemon_started",
            sources=sorted(self.jobs.scheduled),
            workers=self.settings.resync.workers,
            database=self.store.location,
            metrics=self._server_listen,
            watchdog_seconds=self.notifier.watchdog_interval,
        )
        self.notifier.ready(self.status_text())
        await self._stop.wait()
        await self._shutdown()
        return 0

    def start_scheduler(self) -> None:
        """Start the scheduler with a job per scheduled source, and the resync workers."""
        self.jobs.start(self.settings)
        self._resize_workers(self.settings.resync.workers)

    def request_stop(self, why: str = "stop") -> None:
        if self._stop.is_set():
            self._hurry.set()  # a second signal: stop waiting for in-flight work
            self.log.warning("stop_hurried", signal=why)
            return
        self._stop.set()  # before the log line: stopping must not depend on logging
        self.log.info("stop_requested", signal=why)

    async def _shutdown(self) -> None:
        self._stopping = True
        self.notifier.stopping()
        if self.scheduler is not None and self.scheduler.running:
            # No new runs from here on; the running sync tasks are shielded from the
            # executor's cancellation and are waited for below.
            self.scheduler.shutdown(wait=False)
        self.resync.wake()
        workers = self.resync.workers
        pending: set[asyncio.Task[Any]] = {*self._syncs, *(w.task for w in workers if w.task)}
        pending |= self._reloads
        self.log.info("draining", syncs=len(self._syncs), workers=len(workers))
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

    async def _scheduled_sync(self, source: str) -> None:
        if self._stopping:
            return
        trigger = self.jobs.trigger_for(source)
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
        held: dict[str, str] = {}
        if report.status == "held":
            # What the on-call operator reading the journal does next, as `sync` prints it.
            held["next"] = (
                f"review with `{hints.command(f'runs show {report.id} --changes')}`, apply "
                f"with `{hints.command(f'runs approve {report.id}')}`"
            )
        log.bind(run_id=report.id).info(
            "scheduled_sync_done",
            status=report.status,
            mode=report.mode,
            seconds=round(time.monotonic() - started, 3),
            users_created=report.counts.get("users_created", 0),
            resync_queued=report.counts.get("resync_queued", 0),
            error=report.error,
            hold_reason=report.hold_reason,
            **held,
        )
        self._wake_workers()  # on SQLite there is no NOTIFY for the jobs this run queued
        self.notifier.status(self.status_text())

    def _load_history(self) -> None:
        """Last run per source, so STATUS starts true."""
        with self.store.read() as conn:
            rows = history.last_finished_runs(conn)
        for source, status, run_id, finished in rows:
            self.last_runs[source] = LastRun(status, run_id, as_utc(finished))

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
        self.resync.resize(want)

    def _wake_workers(self) -> None:
        self.resync.wake()

    def _store_state(self) -> StoreState:
        """For a scrape (in the metrics thread): the store's view of every source and the
        queue, with the schedules running now."""
        settings, scheduled = self.settings, dict(self.jobs.scheduled)
        with self.store.read() as conn:
            return read_store_state(conn, settings.sources, scheduled)

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
        """Scheduled sources without a job (see :meth:`SourceJobs.unscheduled`)."""
        return self.jobs.unscheduled(self.settings)

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
                        log.warning(
                            "config_database_change_needs_restart", kept=self.store.location
                        )
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
                        sources=sorted(self.jobs.scheduled),
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
        plan = self.jobs.plan(new)
        engine = self._make_engine(new)
        want = new.metrics.listen if new.metrics else None
        old_server, old_listen = self._server, self._server_listen
        new_server, old_stopped = (None, False)
        if want != old_listen:
            try:
                new_server, old_stopped = self._open_metrics(want)
            except OSError as exc:
                # As the other reload errors do: the key and what it says, not the bare errno.
                raise ConfigError(
                    [ConfigIssue("metrics.listen", f"cannot listen on {want}: {exc}")]
                ) from None
        old_settings, old_engine = self.settings, self.engine
        old_workers = old_settings.resync.workers
        snapshot = self.jobs.snapshot(plan)
        step = "schedules"
        try:
            self.jobs.add(plan)
            step = "config"
            self.settings, self.engine = new, engine
            self.jobs.remove(plan)
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
            self.jobs.restore(snapshot)
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
