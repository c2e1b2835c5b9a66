"""One sync run of one source: fetch -> stage -> apply, and the resync workers' batch step.

:class:`SyncEngine` is the orchestration: it takes the source's lease
(:mod:`~rostersync.sync.runs`), fetches and stages (:mod:`~rostersync.sync.fetch`), scopes,
and applies in one transaction (:mod:`~rostersync.sync.applying`, where the
rollback-by-exception invariant is stated); approval is :mod:`~rostersync.sync.approval`, the
resync batches :mod:`rostersync.resync.worker`. Failure rules:

* anything that fails before the apply transaction commits changes nothing but the run's own
  record (status ``failed``, with the error);
* a run the safety rules stop is recorded ``held`` with its staged data kept, and
  ``runs approve`` applies exactly that data later;
* a held or dry run changes nothing but its own record: rollback by exception (see
  :mod:`rostersync.sync.applying`);
* a rejected record is counted and reported; it never sinks the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Any

import httpx
import structlog

from rostersync.config.models import Settings
from rostersync.daemon import recovery
from rostersync.errors import (
    ChangesOnlyError,
    DeltaUnsupportedError,
    RostersyncError,
    SourceError,
)
from rostersync.logs import scrub
from rostersync.resync.worker import ResyncWorker
from rostersync.source.connector import (
    Connector,
    ConnectorContext,
    ConnectorPlugin,
    FetchMode,
    load_plugins,
)
from rostersync.store.db import Store, as_utc, utcnow
from rostersync.sync import provisioning, runs
from rostersync.sync.applying import Applier
from rostersync.sync.approval import Approval
from rostersync.sync.fetch import Fetched, Fetcher
from rostersync.sync.leasing import LeaseHolder
from rostersync.sync.runs import (
    RunContext,
    RunReport,
    instance_id,
    load_report,
    source_state,
)
from rostersync.sync.scope import (
    Scope,
    ScopeResult,
    apply_scope,
    fingerprint_of,
    scope_for,
)
from rostersync.sync.staging import (
    clear_staging,
)

ProgressFn = Callable[[str, str, Mapping[str, int]], None]  # (source, phase, figures)


class SyncEngine(LeaseHolder, Fetcher, Applier, Approval, ResyncWorker):
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
        #: Set (to a list) by a command whose process ends after its runs: the last run's
        #: fetch results are kept there, not freed when the run ends (see _keep); the
        #: command empties it before resyncs that would add their memory to it.
        self.spent: list[object] | None = None
        self._init_pacing()
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
            self._plugins = load_plugins(sorted({s.type for s in self.settings.sources.values()}))
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
            ctx = ConnectorContext(
                source,
                cfg,
                http,
                self.log.bind(source=source),
                own_requests=self.transport is None,
                rows=True,
            )
            conn = plugin.create(ctx)
            try:
                yield conn
            finally:
                await conn.aclose()

    # -- sync -----------------------------------------------------------------------------

    def _choose_mode(
        self, source: str, requested: str | None
    ) -> tuple[FetchMode, datetime | None, list[str]]:
        cfg = self.settings.sources[source]
        want = requested or cfg.mode
        warnings: list[str] = []
        if want != "delta":
            return FetchMode.FULL, None, warnings
        with self.store.read() as conn:
            state = source_state(conn, source)
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
        if hwm > utcnow():
            # Stored before dates after a run's start were left out of it (fetch.Ahead): it
            # cannot say where the changes since the last run begin.
            warnings.append(
                f"the delta high-water mark ({hwm:%Y-%m-%d %H:%M} UTC, a record's date) lies "
                "in the future: running full"
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
        began = utcnow()
        with self.store.write() as conn:
            provisioning.sync_catalog(conn, self.settings)
            run_id = runs.start_run(
                conn,
                source=source,
                mode=fetch_mode,
                requested_mode=requested or self.settings.sources[source].mode,
                trigger=trigger,
                dry_run=dry_run,
                warnings=warnings,
            )
        log = self.log.bind(source=source, run_id=run_id)
        log.info("sync_started", mode=fetch_mode.value, dry_run=dry_run)
        scope = scope_for(self.settings.sources[source])
        extras = self._keep(Fetched())
        try:
            fetched, newest, notes = await self._fetch(
                source, run_id, fetch_mode, since, log, extras, scope, not_after=began
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
            extras = self._keep(Fetched())
            try:
                fetched, newest, notes = await self._fetch(
                    source, run_id, fetch_mode, since, log, extras, scope, not_after=began
                )
            except Exception as exc2:
                return await asyncio.to_thread(self._fail, run_id, exc2, log)
        except Exception as exc:
            return await asyncio.to_thread(self._fail, run_id, exc, log)
        scoped = ScopeResult()
        if scope is not None:
            try:
                scoped = await asyncio.to_thread(
                    self._scope, source, run_id, fetch_mode, scope, extras
                )
            except Exception as exc:
                return await asyncio.to_thread(self._fail, run_id, exc, log)
            fetched.update(scoped.counts)
            notes.extend(scoped.warnings)
            extras.repeats.update(scoped.repeats)
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
                known=extras.known,
                scoped_out=frozenset(scoped.persons_out),
                repeats=extras.repeats,
                shifting=extras.shifting,
            )
            return await asyncio.to_thread(self._apply, ctx)
        except Exception as exc:
            return await asyncio.to_thread(self._fail, run_id, exc, log)

    def _keep(self, extras: Fetched) -> Fetched:
        """What a fetch gathers for the rest of the run, kept in :attr:`spent` when set.

        A full run's view of the mirror (``extras.known``: a string and a hash entry per
        mirror row) is freed object by object when the run ends, in the event loop, before
        its lease is given back and its resyncs start: 80 ms at district L. A process that
        ends after its runs never needs that memory back, and its exit frees none of it.
        Only the last run's is kept: the one before goes when another starts, so that a
        command syncing several sources holds one view at a time, as before."""
        if self.spent is not None:
            self.spent[:] = [extras]
        return extras

    def _scope(
        self, source: str, run_id: int, mode: FetchMode, scope: Scope, extras: Fetched
    ) -> ScopeResult:
        """Leave the staged records out of scope out (rostersync.sync.scope), once, right
        after the fetch: a held run keeps its scoped rows, and its approval applies them."""
        with self.store.write() as conn:
            if not recovery.still_running(conn, run_id):
                return ScopeResult(counts={})  # cut off meanwhile: its staging was cleared
            return apply_scope(
                conn,
                source,
                run_id,
                full=mode is FetchMode.FULL,
                scope=scope,
                class_terms=extras.class_terms,
                sessions=extras.sessions,
                today=self.today(),
            )

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
            state = source_state(conn, source)
        if state is None or state["last_full_at"] is None:
            return (
                "no full run of this source has succeeded yet, and changes need one to apply "
                "to: the first sync needs a full export (a bulk drop)",
                None,
            )
        return None, as_utc(state["high_water_mark"])

    def _set_warnings(self, run_id: int, warnings: list[str]) -> None:
        with self.store.write() as conn:
            runs.set_warnings(conn, run_id, warnings)

    def _reset_run(self, run_id: int, mode: FetchMode, warnings: list[str]) -> None:
        with self.store.write() as conn:
            clear_staging(conn, run_id)
            runs.restart_run(conn, run_id, mode, warnings)

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
            runs.fail_run(conn, run_id, message)
        with self.store.read() as conn:
            return load_report(conn, run_id)
