"""Approving a held run: its staged data applied as it was fetched, bypassing the safety
rules that held it, after checks made under the source's lease.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

from sqlalchemy import Connection

from rostersync import hints
from rostersync.config.models import Settings
from rostersync.errors import RunStateError
from rostersync.logs import scrub
from rostersync.source.connector import FetchMode
from rostersync.store.db import Store, as_utc
from rostersync.sync import runs
from rostersync.sync.runs import RunContext, RunReport, load_report
from rostersync.sync.staging import staging_lost


class Approval:
    """The engine's ``runs approve``."""

    settings: Settings
    store: Store
    log: Any

    def _take_lease(self, source: str) -> None:
        raise NotImplementedError

    def _drop_lease(self, source: str, error: str | None = None) -> None:
        raise NotImplementedError

    def _apply(self, ctx: RunContext) -> RunReport:
        raise NotImplementedError

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
                hwm = runs.high_water_mark(conn, run_id)
            log = self.log.bind(source=report.source, run_id=run_id)
            with self.store.write() as conn:
                runs.start_approval(conn, run_id)
            log.info("held_run_approval_started")
            ctx = RunContext(
                report.source,
                run_id,
                FetchMode(report.mode),
                report.fetched,
                as_utc(hwm),
                log,
                approved=True,
            )
            work = asyncio.ensure_future(asyncio.to_thread(self._apply, ctx))
            try:
                out = await asyncio.shield(work)
            except asyncio.CancelledError:
                # Stopped (Ctrl-C, the daemon stopping) while the apply runs in its thread,
                # where it cannot be cut off: the run is what the apply makes it. Held again
                # at once, it could be held with its changes applied.
                await asyncio.wait([work])
                if work.exception() is None:
                    log.info("held_run_approved")
                else:
                    self._undo(run_id, report.trigger, work.exception(), log)
                raise
            except BaseException as exc:
                self._undo(run_id, report.trigger, exc, log)
                raise
            log.info("held_run_approved")
            return out
        finally:
            self._drop_lease(report.source)

    def _undo(self, run_id: int, trigger: str, exc: BaseException | None, log: Any) -> None:
        """Nothing was applied (the transaction rolled back): the run is held as before, with
        its staged rows, and may be approved again."""
        with self.store.write() as conn:
            runs.undo_approval(conn, run_id, trigger)
        log.error("held_run_approval_failed", error=scrub(str(exc)))

    def _check_approvable(self, conn: Connection, report: RunReport) -> None:
        run_id = report.id
        if report.dry_run:
            raise RunStateError(
                f"run {run_id} is a dry run: a preview that is never applied. Run "
                f"`{hints.command(f'sync --source {shlex.quote(report.source)}')}` to sync "
                "the source for real"
            )
        if report.status != "held" and report.approved_at is not None:
            # An approval that failed puts the run back to held, so this one took.
            when = report.approved_at.strftime("%Y-%m-%d %H:%M:%SZ")
            raise RunStateError(
                f"run {run_id} was approved already, at {when} (it is now {report.status}): "
                "nothing to approve"
            )
        if report.status != "held":
            raise RunStateError(f"run {run_id} is {report.status}, not held: nothing to approve")
        newer = runs.find_superseded_by(conn, run_id)
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
