"""The fetch and stage step of a run: everything the connector yields is staged while the
fetch goes on, in a worker thread, so the fetch never waits on the database unless its
buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from rostersync.daemon import recovery
from rostersync.logs import scrub
from rostersync.source.connector import Connector, FetchMode
from rostersync.source.records import AcademicSession
from rostersync.source.rows import COLUMNS, utc_text
from rostersync.store.db import Store
from rostersync.store.tables import run_rejection
from rostersync.sync.known import KnownRows
from rostersync.sync.repeats import Repeats
from rostersync.sync.scope import Scope
from rostersync.sync.staging import StagedBatch, sort_batch, stage

#: Rows a fetch may hold back while a staging write is under way before it waits for it.
STAGE_BUFFER_ROWS = 50_000
#: Rows to stage, at least, in one write before the fetch's last, in a full run that left
#: out records the mirror holds: it has a few changed rows from most pages, and a write
#: transaction for each cost more (its statements waiting on the busy event loop for the
#: interpreter lock) than the rows (tests/benchmarks/README.md).
STAGE_MIN_ROWS = 5_000


@dataclass
class Fetched:
    """What a fetch gives the scope step besides staged rows (see rostersync.sync.scope)."""

    #: the academic sessions of the classes that name any, by class (terms: current only)
    class_terms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the connector's ``academic_sessions``, if it has them
    sessions: Mapping[str, AcademicSession] | None = None
    #: a full run without a scope: the mirror's rows it saw unchanged (rostersync.sync.known)
    known: KnownRows | None = None
    #: the sourcedIds the fetch received more than once (as far as staging them showed)
    repeats: Repeats = field(default_factory=Repeats)
    #: the connector reads collections page by page at offsets (its ``pages_may_shift``)
    shifting: bool = False


#: How far after a run's start a record's date may lie before the run warns: a source's
#: clock a little ahead of this machine's is common; a year 9999 is not.
AHEAD_WARNING = timedelta(hours=1)


#: Where each kind's staging row holds its dateLastModified (as utc_text).
DATE_AT = {kind: cols.index("date_last_modified") for kind, cols in COLUMNS.items()}


class Ahead:
    """Records dated after the run began (a bad date, the source's clock ahead): left out of
    the run's newest date, the delta high-water mark. One of them would become the mark, and
    every delta run after it would ask for changes since then and get none. The mark stays
    the newest of the other dates, on the source's own clock."""

    def __init__(self, not_after: datetime | None) -> None:
        self.not_after = not_after
        self.cutoff = utc_text(not_after) if not_after is not None else None
        self.latest: datetime | None = None
        self.ids: list[str] = []

    def newest_in(self, batch: StagedBatch) -> datetime | None:
        """The batch's newest date no later than the run's start."""
        limit, cutoff = self.not_after, self.cutoff
        if limit is None or cutoff is None or batch.newest is None or batch.newest <= limit:
            return batch.newest
        if self.latest is None or batch.newest > self.latest:
            self.latest = batch.newest
        kept: str | None = None
        for kind, rows in batch.rows.items():
            at = DATE_AT[kind]
            for row in rows:
                date = row[at]
                if date is None:
                    continue
                if date > cutoff:  # fixed-width UTC text: the order of the instants
                    if len(self.ids) < 5:
                        self.ids.append(f"{kind} {row[0]}")
                elif kept is None or date > kept:
                    kept = date
        return datetime.fromisoformat(kept).replace(tzinfo=UTC) if kept is not None else None

    def warnings(self) -> list[str]:
        if self.latest is None or self.not_after is None:
            return []
        if self.latest - self.not_after <= AHEAD_WARNING:
            return []
        which = f"; {', '.join(self.ids)}" if self.ids else ""
        return [
            f"the source sent records dated after this run began (the newest "
            f"{self.latest:%Y-%m-%d %H:%M} UTC{which}): a bad date, or the source's clock "
            "ahead of this machine's; they are left out of the point the next delta run asks "
            "for changes since"
        ]


class Fetcher:
    """The engine's fetch and stage step."""

    store: Store
    progress: Callable[[str, str, Mapping[str, int]], None] | None

    def connector(self, source: str) -> AbstractAsyncContextManager[Connector]:
        raise NotImplementedError

    async def _fetch(
        self,
        source: str,
        run_id: int,
        mode: FetchMode,
        since: datetime | None,
        log: Any,
        extras: Fetched | None = None,
        scope: Scope | None = None,
        *,
        not_after: datetime | None = None,
    ) -> tuple[dict[str, int], datetime | None, list[str]]:
        """Stage everything the connector yields; returns the counts, the newest
        dateLastModified no later than ``not_after`` (the run's start: see :class:`Ahead`),
        and the connector's warnings (its optional ``warnings``: what it accepted but an
        admin should hear of, such as a CSV row read without a bad date).
        With terms to judge, ``extras`` collects the classes' terms and the sessions; it
        always collects the ids received more than once, as far as staging showed them, and
        whether the connector's pages may shift (rostersync.sync.repeats)."""
        collect = extras if scope is not None and scope.current_terms else None
        # A full run of an unscoped source stages only the rows the mirror lacks or holds
        # otherwise; the mirror's hashes load while the first requests are under way.
        known = KnownRows(source) if mode is FetchMode.FULL and scope is None else None
        loading = asyncio.create_task(asyncio.to_thread(known.load, self.store)) if known else None
        if extras is not None:
            extras.known = known
        fetched: Counter[str] = Counter()
        notes: list[str] = []
        newest: datetime | None = None
        ahead = Ahead(not_after)
        # Staging runs in a worker thread while the connector fetches on. Batches that arrive
        # while a write is under way wait in `buffer` and go in the next write together, so
        # the fetch never stalls on the database unless the buffer is full. They stay apart
        # until the mirror filter has seen each in turn (a record left out as known is only
        # a mark in its page's order).
        buffer: list[StagedBatch] = []
        buffered = 0
        held = StagedBatch()  # filtered rows waiting for more (see STAGE_MIN_ROWS)
        repeats = extras.repeats if extras is not None else Repeats()
        pending: asyncio.Task[None] | None = None
        try:
            async with self.connector(source) as connector:
                if hasattr(connector, "skip_known"):  # a connector may serve several runs
                    spec = KnownRows.spec(self.store, source, run_id) if known else None
                    connector.skip_known = spec
                # Closed on the way out, whatever ends the loop: its page tasks stop before
                # the connector closes.
                batches = connector.fetch(mode, since)
                async with contextlib.aclosing(batches):  # type: ignore[type-var]
                    async for records in batches:
                        batch = records if isinstance(records, StagedBatch) else sort_batch(records)
                        if collect is not None and batch.terms:
                            collect.class_terms.update(batch.terms)
                        fetched.update(
                            {
                                "orgs": batch.count("org"),
                                "persons": batch.count("person"),
                                "classes": batch.count("class"),
                                "enrollments": batch.count("enrollment"),
                                "rejected": len(batch.rejected),
                            }
                        )
                        latest = ahead.newest_in(batch)
                        if latest is not None and (newest is None or latest > newest):
                            newest = latest
                        buffer.append(batch)
                        buffered += len(batch)
                        if pending is not None:
                            if not pending.done() and buffered < STAGE_BUFFER_ROWS:
                                continue
                            await pending
                        pending = asyncio.create_task(
                            asyncio.to_thread(self._stage, run_id, buffer, known, held, repeats)
                        )
                        buffer, buffered = [], 0
                        if self.progress:
                            self.progress(source, "fetch", dict(fetched))
                if pending is not None:
                    await pending
                if buffer or len(held):
                    pending = asyncio.create_task(
                        asyncio.to_thread(
                            self._stage, run_id, buffer, known, held, repeats, last=True
                        )
                    )
                    await pending
                if known is not None:
                    await asyncio.to_thread(self._settle, run_id, known, repeats)
                notes = [scrub(str(w))[:1000] for w in getattr(connector, "warnings", ())]
                notes += ahead.warnings()
                if extras is not None:
                    extras.shifting = bool(getattr(connector, "pages_may_shift", False))
                if collect is not None:
                    collect.sessions = getattr(connector, "academic_sessions", None)
        finally:
            # Even when the fetch fails, let the last staging write land before the caller
            # clears staging, or its rows would outlive the failed run.
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
            if loading is not None:
                await asyncio.gather(loading, return_exceptions=True)
        if pending is not None and (error := pending.exception()) is not None:
            raise error
        if loading is not None and (error := loading.exception()) is not None:
            raise error
        # A full run of an unscoped source also says how many rows it left out of staging
        # because the mirror holds them as they are (rostersync.sync.known).
        unchanged = {"unchanged": sum(known.unchanged.values())} if known is not None else {}
        log.info("fetch_done", warnings=len(notes), **unchanged, **dict(fetched))
        return dict(fetched), newest, notes

    def _settle(self, run_id: int, known: KnownRows, repeats: Repeats) -> None:
        """After the last staging write: note the ids received more than once where a copy was
        as the mirror holds them (rostersync.sync.repeats), then take out of staging those
        whose last record was so. After a run that staged nothing the mirror holds, neither
        reads or writes the database."""
        reverted = any(known.reverted.values())
        repeats.update(known.seen_twice())
        if any(known.staged.values()) or reverted:
            with self.store.read() as conn:
                repeats.update(known.repeats(conn, run_id))
        if reverted:
            with self.store.write() as conn:
                if recovery.still_running(conn, run_id):
                    known.revert(conn, run_id)

    def _stage(
        self,
        run_id: int,
        batches: list[StagedBatch],
        known: KnownRows | None = None,
        held: StagedBatch | None = None,
        repeats: Repeats | None = None,
        *,
        last: bool = False,
    ) -> None:
        """Stage ``batches`` (through the mirror filter, when ``known``); with ``held``, the
        rows go there first, and when the filter left records of these batches out, they
        wait there until it holds ``STAGE_MIN_ROWS`` or it is the ``last`` write of the
        fetch; ``held`` is emptied once written. Batches of new records (a first load's) are
        written at once, as the fetch goes on."""
        batch = held if held is not None else StagedBatch()
        left_out = False  # the mirror filter kept some record of these batches out
        for part in batches:
            if known is None:
                batch.extend(part)
                continue
            kept = known.filter(part)
            arrived = sum(map(len, part.rows.values())) + sum(part.skipped.values())
            left_out = left_out or sum(map(len, kept.rows.values())) < arrived
            batch.extend(kept)
        if known is not None and not len(batch):
            # Nothing left to write: no write transaction, which on SQLite waits for the
            # database's one write lock (a no-op run at district L stages ~800 batches).
            return
        if held is not None and left_out and not last and len(held) < STAGE_MIN_ROWS:
            return  # a run that changed little: its rows wait for more (a first load's go in)
        with self.store.write() as conn:
            if not recovery.still_running(conn, run_id):
                return  # cut off or taken over meanwhile: its staging was cleared for good
            found = stage(conn, run_id, batch)
            if repeats is not None:
                repeats.update(found)
            if batch.rejected:
                conn.execute(
                    insert(run_rejection),
                    [
                        {
                            "run_id": run_id,
                            "entity": r.entity,
                            # Cut to the columns: a connector may name a record by an id
                            # past them (PostgreSQL refused the insert, failing the run).
                            "sourced_id": r.sourced_id and r.sourced_id[:256],
                            "reason": r.reason[:1000],
                            "location": r.location and r.location[:512],
                        }
                        for r in batch.rejected
                    ],
                )
        if held is not None:
            held.rows = {kind: [] for kind in held.rows}
            held.rejected = []
