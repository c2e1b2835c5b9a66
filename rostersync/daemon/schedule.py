"""The daemon's scheduler: one APScheduler job per scheduled source.

The triggers themselves are built by :func:`rostersync.config.schedule.build_trigger`, the one
definition that config validation uses too, so a schedule the config check accepts is one the
daemon can schedule. This module decides which jobs a config needs, adds and removes them all
or nothing, and picks where an interval schedule continues after a restart.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from rostersync import hints
from rostersync.config.models import Settings
from rostersync.config.schedule import Schedule, build_trigger, misfire_grace
from rostersync.store.db import Store, utcnow
from rostersync.sync import runs

#: The jobs a plan touches as they were, and the schedules then in force: what undoes a plan.
Snapshot = tuple[dict[str, Job | None], dict[str, Schedule]]


@dataclass
class SchedulePlan:
    """The scheduler changes a config needs, every trigger already built: whatever can fail
    while building fails before the scheduler is touched."""

    add: dict[str, tuple[Schedule, BaseTrigger]]  # new or changed schedules
    remove: list[str]  # sources no longer scheduled
    manual: list[str]  # enabled sources without a schedule (run by hand)


def job_id(source: str) -> str:
    return f"sync:{source}"


def last_success_at(store: Store, source: str) -> datetime | None:
    """When ``source`` last synced successfully (None: never)."""
    with store.read() as conn:
        return runs.last_success_at(conn, source)


class SourceJobs:
    """The scheduler and the schedule each source's job was built from.

    ``run`` is the job function, called with the source's name when its trigger fires.
    """

    def __init__(
        self,
        store: Store,
        run: Callable[[str], Awaitable[None]],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.store = store
        self.run = run
        self.log = log
        self.scheduler: AsyncIOScheduler | None = None
        self.scheduled: dict[str, Schedule] = {}
        # Sources whose first scheduled run is the catch-up at start (never synced, or
        # overdue): that run's trigger is "startup", the later ones "schedule".
        self.catch_up: set[str] = set()
        self.started = False

    def start(self, settings: Settings) -> None:
        """Start the scheduler with a job per scheduled source of ``settings``."""
        self.scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.scheduler.start()
        try:
            self.add(self.plan(settings))
        except Exception:
            self.scheduler.shutdown(wait=False)
            raise
        self.started = True  # sources added by a reload later are not the start's catch-up

    def trigger_for(self, source: str) -> str:
        """The trigger to record for a run the scheduler starts now."""
        trigger = "startup" if source in self.catch_up else "schedule"
        self.catch_up.discard(source)
        return trigger

    def plan(self, settings: Settings) -> SchedulePlan:
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
            if self.scheduled.get(name) == schedule:
                continue
            trigger = build_trigger(schedule, start=self.first_start(name, schedule))
            if trigger.get_next_fire_time(None, now) is None:
                raise ValueError(f"the schedule of source {name!r} never fires")
            add[name] = (schedule, trigger)
        manual = [
            name
            for name, cfg in settings.sources.items()
            if cfg.enabled and cfg.schedule is None and name not in self.scheduled
        ]
        return SchedulePlan(add, [n for n in self.scheduled if n not in wanted], manual)

    def snapshot(self, plan: SchedulePlan) -> Snapshot:
        """The jobs ``plan`` touches, as they are now, for :meth:`restore`."""
        assert self.scheduler is not None
        names = [*plan.add, *plan.remove]
        return {n: self.scheduler.get_job(job_id(n)) for n in names}, dict(self.scheduled)

    def restore(self, snapshot: Snapshot) -> None:
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
        self.scheduled = scheduled

    def add(self, plan: SchedulePlan) -> None:
        """Add or replace the planned jobs; if one fails, the others are put back as they were."""
        assert self.scheduler is not None
        snapshot = self.snapshot(plan)
        added: list[tuple[str, Job]] = []
        try:
            for name, (schedule, trigger) in plan.add.items():
                job = self.scheduler.add_job(
                    self.run,
                    trigger,
                    args=[name],
                    id=job_id(name),
                    name=f"sync {name}",
                    coalesce=True,
                    max_instances=1,
                    misfire_grace_time=misfire_grace(schedule),
                    replace_existing=True,
                )
                self.scheduled[name] = schedule
                added.append((name, job))
        except Exception:
            self.restore(snapshot)
            raise
        for name in plan.manual:
            self.log.info(
                "source_unscheduled",
                source=name,
                hint=hints.command(f"sync --source {shlex.quote(name)}"),
            )
        for name, job in added:
            self.log.info("source_scheduled", source=name, next_run=str(job.next_run_time))

    def remove(self, plan: SchedulePlan) -> None:
        assert self.scheduler is not None
        for name in plan.remove:
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job(job_id(name))
            self.scheduled.pop(name, None)

    def first_start(self, name: str, schedule: Schedule) -> datetime | None:
        """Interval schedules continue from the last success instead of restarting the clock
        at every daemon start: a source synced 5 h ago on a 6 h interval runs in 1 h, one never
        synced (or overdue) runs now."""
        if schedule.interval is None:
            return None
        soon = utcnow() + timedelta(seconds=0.5)
        last = last_success_at(self.store, name)
        start = soon if last is None else max(soon, last + schedule.interval)
        if start == soon and not self.started:
            self.catch_up.add(name)
        return start

    def unscheduled(self, settings: Settings) -> list[str]:
        """Enabled sources with a ``schedule`` that have no job in the scheduler: they would
        silently never run. (Sources without ``schedule`` are run by hand and are fine.)"""
        scheduler = self.scheduler
        expected = [n for n, c in settings.sources.items() if c.enabled and c.schedule is not None]
        if scheduler is None:
            return expected
        return [n for n in expected if scheduler.get_job(job_id(n)) is None]
