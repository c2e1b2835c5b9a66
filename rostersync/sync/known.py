"""What the mirror already holds, so that a full run stages only what changed.

A full run reads every record, and on a typical night almost all of them are as the mirror
has them. Two things recognise such a record:

* its **fingerprint** (``fp``), a hash of the record's bytes as the source sent them, where
  the connector gives one (OneRoster): the mirror row made from that record keeps it. The
  connector reads the mirror's fingerprints itself (:meth:`KnownRows.spec`), in its decode
  workers and for the pages it decodes in the sync process, and gives only ``~fp`` for a
  record it finds there, neither parsed nor normalized; its other rows carry their
  fingerprints;
* otherwise its ``row_hash``, computed where the record was normalized, with its sourcedId.

Every row recognised so is left out of staging; staging, the change detection and the merge
then handle what is new or changed alone, and the sweep of a full run is what the mirror holds
that the run neither staged nor saw unchanged (:meth:`KnownRows.missing`). A fingerprint the
mirror does not hold (a record changed, or one the code that normalizes records changed for,
see connectors.oneroster.decode.SEED) means the record is normalized and staged, and the
merge stores its fingerprint even when its row is as the mirror has it, so the next run skips it.

The rules see exactly what they saw when every row was staged: an unchanged row is one the
change detection would have found equal to its mirror row and skipped. A sourcedId the source
sends twice keeps its last version, as staging does: a row after a staged one of its id is
staged too, and an id staged and then seen unchanged is taken out of staging again when the
fetch ends (:meth:`KnownRows.revert`). A run that is held keeps its staging for
``runs approve``, which compares staging with the mirror in another process, so the held run's
staging is completed from the mirror (:meth:`KnownRows.complete`, in the transaction that
records the hold) and holds every row the run saw, as before.

Only full runs of sources without a school or term scope use it: the scope step judges every
staged class and enrollment (rostersync.sync.scope), so scoped runs stage everything.
"""

from __future__ import annotations

import threading
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, text

from rostersync.source.fingerprints import parse_fingerprints
from rostersync.source.rows import COLUMNS, KnownSpec, Row, StagedBatch, fp_slices
from rostersync.store.db import Store
from rostersync.sync.mirror import TABLES
from rostersync.sync.repeats import HASH_AT, Repeats
from rostersync.sync.rules import chunks
from rostersync.sync.staging import run_scan

__all__ = ["FP_AT", "HASH_AT", "KnownRows", "MirrorChangedError", "row_key"]

#: Where each kind's row tuple carries its fingerprint (None: none given).
FP_AT = {kind: cols.index("fp") for kind, cols in COLUMNS.items()}


def row_key(row_hash: str, sourced_id: str) -> str:
    """A mirror row as the filter knows it: its hash and its id in one string (a hash is hex,
    so the first colon ends it). One string a row, not a dict entry: a third of the memory."""
    return f"{row_hash}:{sourced_id}"


#: :func:`row_key` in SQL.
KEY_SQL = "row_hash || ':' || sourced_id"


class MirrorChangedError(RuntimeError):
    """A decode worker left out a record whose fingerprint this process's view of the mirror
    does not hold: the mirror changed between the two reads. The run fails and changes
    nothing (its record cannot be staged); the next run reads it again."""


class KnownRows:
    """One full run's view of the source's mirror rows, loaded once while the fetch starts:
    per kind, what of every row the run has not yet seen as it is."""

    def __init__(self, source: str) -> None:
        self.source = source
        #: :func:`row_key` of mirror rows without a fingerprint not (yet) seen unchanged
        self.remaining: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: fingerprint -> sourcedId of mirror rows with one, not (yet) seen unchanged
        self.remaining_fp: dict[str, dict[int, str]] = {kind: {} for kind in COLUMNS}
        #: those seen unchanged, as two lists (8 bytes an entry each: a dict of them doubled
        #: the memory of a no-op at district XL), made a dict when a fingerprint comes again
        self.seen_fp: dict[str, array[int]] = {kind: array("q") for kind in COLUMNS}
        self.seen_sid: dict[str, list[str]] = {kind: [] for kind in COLUMNS}
        self._seen_map: dict[str, dict[int, str]] = {}
        #: kinds the mirror holds rows of (a first load of a kind stages all of it)
        self.held: set[str] = set()
        #: ids the run staged, for kinds the mirror holds rows of
        self.staged: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: ids staged, then seen unchanged: their staged rows go again (revert)
        self.reverted: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: rows left out of staging, per kind
        self.unchanged: dict[str, int] = {kind: 0 for kind in COLUMNS}
        #: ids whose mirror row was seen as it is more than once (a record sent twice), with
        #: how many times more
        self.seen_again: dict[str, Counter[str]] = {kind: Counter() for kind in COLUMNS}
        self._loaded = threading.Event()
        self._error: BaseException | None = None

    @staticmethod
    def spec(store: Store, source: str, run_id: int) -> KnownSpec | None:
        """Where decode workers read the fingerprints; None for a database they cannot open
        (SQLite in memory)."""
        url = store.engine.url
        if url.get_backend_name() == "sqlite":
            path = url.database
            if not path or path == ":memory:" or url.query.get("mode") == "memory":
                return None
            return KnownSpec("sqlite", str(Path(path).resolve()), source, run_id)
        if url.get_backend_name() == "postgresql":
            # libpq's URL, its options (a search_path) kept. Whatever a worker reads there,
            # a record it leaves out must be one this process's view holds (MirrorChangedError).
            plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
            return KnownSpec("postgresql", plain, source, run_id)
        return None

    def load(self, store: Store) -> None:
        """Read the source's mirror keys (in a worker thread, while the fetch begins).

        Through the driver's cursor, not SQLAlchemy's result: a million rows fetched one by
        one through it cost seconds. The database hands the keys over joined into a few
        strings, split here (:func:`_sqlite_fingerprints`, :func:`_sqlite_keys`,
        :func:`_postgresql_keys`)."""
        try:
            with store.read() as conn:
                raw: Any = conn.connection.dbapi_connection
                cursor = raw.cursor()
                try:
                    for kind, (mirror, _, _) in TABLES.items():
                        if conn.dialect.name == "postgresql":
                            keys, fps = _postgresql_keys(cursor, mirror, self.source)
                        else:
                            fps = _sqlite_fingerprints(cursor, mirror, self.source)
                            keys = _sqlite_keys(cursor, mirror, self.source)
                        if keys or fps:
                            self.held.add(kind)
                        self.remaining[kind] = keys
                        self.remaining_fp[kind] = fps
                finally:
                    cursor.close()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._loaded.set()

    def filter(self, batch: StagedBatch) -> StagedBatch:
        """``batch`` without the rows the mirror holds as they are, in the batch's order. A
        sourcedId repeated in the run keeps the last version, as staging does: once an id has
        been staged, its later rows are staged too, a changed row after an unchanged one is
        staged, and an unchanged record after a staged one takes it out again (revert)."""
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        out = StagedBatch(rejected=batch.rejected, newest=batch.newest, terms=batch.terms)
        for kind, rows in batch.rows.items():
            order = batch.order.get(kind)
            if kind not in self.held:  # a first load: everything is new, nothing to sweep
                if batch.skipped.get(kind):
                    raise MirrorChangedError(f"{kind} records left out of a first load")
                out.rows[kind] = rows
            elif order is None:
                keep = out.rows[kind]
                for row in rows:
                    if self._stage_row(kind, row):
                        keep.append(row)
            else:
                out.rows[kind] = self._in_order(kind, rows, order)
        return out

    def _stage_row(self, kind: str, row: Row) -> bool:
        """Whether this row goes to staging (else it is as the mirror holds it)."""
        sid = row[0]
        staged = self.staged[kind]
        if sid not in staged:
            fp = row[FP_AT[kind]]
            if fp is not None:
                # A row of a record seen before is staged again (rare, and as it is): only a
                # decode worker's mark looks among those seen.
                if self.remaining_fp[kind].get(fp) == sid:
                    self._see(kind, fp)
                    self.unchanged[kind] += 1
                    return False
            else:
                key = f"{row[HASH_AT[kind]]}:{sid}"  # row_key, inlined: this sees every record
                keys = self.remaining[kind]
                if key in keys:
                    keys.remove(key)
                    self.unchanged[kind] += 1
                    return False
        staged.add(sid)
        self.reverted[kind].discard(sid)
        return True

    def _in_order(self, kind: str, rows: list[Row], order: Sequence[int]) -> list[Row]:
        """A fingerprinted page: its rows and the records left out (``~fp``) in the page's
        order (a fingerprint with no row is a rejected record)."""
        at = FP_AT[kind]
        by_fp = {row[at]: row for row in rows}
        staged = self.staged[kind]
        keep: list[Row] = []
        left_out = 0
        for mark in order:
            if mark >= 0:
                row = by_fp.get(mark)
                if row is not None and self._stage_row(kind, row):
                    keep.append(row)
                continue
            sid = self._see(kind, ~mark)
            if sid is None:
                raise MirrorChangedError(
                    f"the mirror changed while the run read it ({kind} record left out "
                    "by a decode worker is not in it); the next run reads it again"
                )
            left_out += 1
            if sid in staged:  # staged before, as it is now last: the mirror's row stays
                staged.remove(sid)
                self.reverted[kind].add(sid)
        self.unchanged[kind] += left_out
        return keep

    def seen_twice(self) -> Repeats:
        """The ids whose mirror row the run saw as it is more than once."""
        out = Repeats()
        for kind, ids in self.seen_again.items():
            out.add(kind, ids, copies=ids.total())
        return out

    def repeats(self, conn: Connection, run_id: int) -> Repeats:
        """The ids the run received both as the mirror holds them and staged, in either order
        (differing where the staged row's hash does; those seen so twice: :meth:`seen_twice`).
        After the last staging write of the fetch, before :meth:`revert`. It reads the run's
        staged rows of kinds the mirror holds, which a run that changed little has few of."""
        out = Repeats()
        for kind in sorted(self.held):
            if not self.staged[kind] and not self.reverted[kind]:
                continue
            mirror, staging, _ = TABLES[kind]
            remaining, remaining_fp = self.remaining[kind], self.remaining_fp[kind]
            rows = conn.execute(
                text(
                    f"SELECT m.sourced_id, m.fp, m.row_hash, s.row_hash "
                    f"FROM {run_scan(conn, staging)} JOIN {mirror} m "
                    "ON m.source = :src AND m.sourced_id = s.sourced_id WHERE s.run_id = :run"
                ),
                {"run": run_id, "src": self.source},
            )
            # One copy per id: the one seen as it is (SQLite's staging still holds a record
            # staged twice, which its apply counts).
            again: set[str] = set()
            differing: set[str] = set()
            for sid, fp, held, staged in rows:
                # The mirror's row was seen as it is once it no longer waits to be seen.
                seen = (
                    fp not in remaining_fp
                    if fp is not None
                    else row_key(held, sid) not in remaining
                )
                if seen:
                    again.add(sid)
                    if staged != held:
                        differing.add(sid)
            out.add(kind, again, differing)
        return out

    def revert(self, conn: Connection, run_id: int) -> int:
        """Take out of staging the ids whose last record was as the mirror holds it (they were
        staged from an earlier, different record); returns the rows deleted. After the last
        staging write of the fetch."""
        done = 0
        for kind, ids in self.reverted.items():
            staging = TABLES[kind][1]
            stmt = text(
                f"DELETE FROM {staging} WHERE run_id = :run AND sourced_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
            for chunk in chunks(sorted(ids)):
                done += conn.execute(stmt, {"run": run_id, "ids": chunk}).rowcount or 0
        return done

    def _see(self, kind: str, fp: int) -> str | None:
        """The id of the mirror row with this fingerprint, which the run has now seen; None
        if the mirror holds none. Taken out of ``remaining_fp`` at once: the lookup is there
        anyway, where a pass over all of them when the fetch ends cost 2.2 s at district XL
        (a random place in a large dict for each)."""
        sid = self.remaining_fp[kind].pop(fp, None)
        if sid is None:
            return self._seen(kind, fp)
        seen = self._seen_map.get(kind)
        if seen is None:
            self.seen_fp[kind].append(fp)
            self.seen_sid[kind].append(sid)
        else:
            seen[fp] = sid
        return sid

    def _seen(self, kind: str, fp: int) -> str | None:
        """The id of a fingerprint seen before, if any (a record sent twice: rare)."""
        seen = self._seen_map.get(kind)
        if seen is None:
            seen = self._seen_map[kind] = dict(
                zip(self.seen_fp[kind], self.seen_sid[kind], strict=True)
            )
            self.seen_fp[kind], self.seen_sid[kind] = array("q"), []
        sid = seen.get(fp)
        if sid is not None:
            self.seen_again[kind][sid] += 1
        return sid

    def missing(self, kind: str) -> set[str]:
        """Mirror rows of ``kind`` the run did not see: neither staged nor seen unchanged."""
        remaining, remaining_fp = self.remaining[kind], self.remaining_fp[kind]
        if not remaining and not remaining_fp:
            return set()
        gone = {key.partition(":")[2] for key in remaining}
        gone.update(remaining_fp.values())
        return gone - self.staged[kind]

    def complete(self, conn: Connection, run_id: int) -> int:
        """Stage the rows left out as the mirror holds them (they were equal), so that a held
        run's staging holds every row it saw; returns how many. Inside the transaction that
        records the hold, after the apply rolled back: the mirror is as the run found it."""
        done = 0
        for kind in sorted(self.held):
            if not self.unchanged[kind]:
                continue
            mirror, staging, cols = TABLES[kind]
            remaining, remaining_fp = self.remaining[kind], self.remaining_fp[kind]
            staged = self.staged[kind]
            keys = conn.execute(
                text(f"SELECT fp, {KEY_SQL}, sourced_id FROM {mirror} WHERE source = :src"),
                {"src": self.source},
            )
            ids = [
                sid
                for fp, key, sid in keys
                if sid not in staged
                and (fp not in remaining_fp if fp is not None else key not in remaining)
            ]
            columns = ", ".join(cols)
            stmt = text(
                f"INSERT INTO {staging} (run_id, sourced_id, {columns}) "
                f"SELECT :run, m.sourced_id, {', '.join('m.' + c for c in cols)} "
                f"FROM {mirror} m WHERE m.source = :src AND m.sourced_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
            params = {"run": run_id, "src": self.source}
            for chunk in chunks(sorted(ids)):
                done += conn.execute(stmt, {**params, "ids": chunk}).rowcount or 0
        return done


#: Rowids of a mirror table read in one SQLite statement by :func:`_sqlite_keys`: the joined
#: keys of a slice are a few MB, and the whole table's would be a large transient at XL.
SLICE_ROWS = 200_000

#: Joins the keys of a slice: the ASCII unit separator, which no sane sourcedId holds (one
#: that does is caught by the count and read row by row).
_SEP = "\x1f"


def _sqlite_keys(cursor: Any, mirror: str, source: str) -> set[str]:
    """The :func:`row_key` of every row of ``source`` in ``mirror`` without a fingerprint,
    read a slice of rowids at a time with the keys joined by SQLite (``group_concat``) and
    split here.

    Row by row, the driver gives up the interpreter lock around every step and waits to get
    it back behind the fetch's threads: the load that takes 0.9 s alone took several while
    the fetch ran, and the first batch's filter waits for it. The slices walk the table in
    rowid order, not through an index on ``source`` (a row lookup for each entry). The
    fingerprint index says first whether there is any such row (after a OneRoster source's
    first load, none)."""
    none = cursor.execute(
        f"SELECT 1 FROM {mirror} WHERE source = ? AND fp IS NULL LIMIT 1", (source,)
    ).fetchone()
    if none is None:
        return set()
    (top,) = cursor.execute(f"SELECT max(rowid) FROM {mirror}").fetchone()
    where = (
        f"FROM {mirror} NOT INDEXED WHERE rowid > ? AND rowid <= ? AND source = ? AND fp IS NULL"
    )
    keys: set[str] = set()
    low = 0
    while top is not None and low < top:
        high = low + SLICE_ROWS
        bounds = (low, high, source)
        joined, count = cursor.execute(
            f"SELECT group_concat({KEY_SQL}, ?), count(*) {where}", (_SEP, *bounds)
        ).fetchone()
        if count:
            part = joined.split(_SEP)
            if len(part) == count:
                keys.update(part)
            else:  # a sourcedId holds the separator
                keys.update(key for (key,) in cursor.execute(f"SELECT {KEY_SQL} {where}", bounds))
        low = high
    return keys


def _sqlite_fingerprints(cursor: Any, mirror: str, source: str) -> dict[int, str]:
    """fingerprint -> sourcedId of every row of ``source`` in ``mirror`` that has one, from the
    fingerprint index alone. Each slice comes as two joined strings (the fingerprints, the
    ids, aggregated in one pass and so in one order) turned into the dict without a Python
    loop: this runs beside the fetch, whose event loop waits for the interpreter lock."""
    out: dict[int, str] = {}
    for low, high in fp_slices():
        bounds = (source, low, high)
        fps, ids, count = cursor.execute(
            f"SELECT group_concat(fp, ','), group_concat(sourced_id, ?), count(*) FROM {mirror} "
            "WHERE source = ? AND fp BETWEEN ? AND ?",
            (_SEP, *bounds),
        ).fetchone()
        if not count:
            continue
        sids = ids.split(_SEP)
        if len(sids) != count:  # a sourcedId holds the separator
            rows = cursor.execute(
                f"SELECT fp, sourced_id FROM {mirror} WHERE source = ? AND fp BETWEEN ? AND ?",
                bounds,
            )
            out.update(rows)
            continue
        out.update(zip(parse_fingerprints(fps), sids, strict=True))
    return out


def _postgresql_keys(cursor: Any, mirror: str, source: str) -> tuple[set[str], dict[int, str]]:
    """PostgreSQL: the :func:`row_key` of rows without a fingerprint, and fingerprint ->
    sourcedId of those with one (as :func:`_sqlite_fingerprints`: joined by the server, the
    two aggregates of one pass over the rows and so in one order, split here without a
    Python loop; an ``ORDER BY`` in each sorted the rows twice, 0.17 s at district M)."""
    cursor.execute(
        f"SELECT string_agg(CAST(fp AS text), ','), string_agg(sourced_id, chr(31)), count(*) "
        f"FROM {mirror} WHERE source = %s AND fp IS NOT NULL",
        (source,),
    )
    fps_text, ids, count = cursor.fetchone()
    fps: dict[int, str] = {}
    if count:
        sids = ids.split(_SEP)
        if len(sids) == count:
            fps.update(zip(parse_fingerprints(fps_text), sids, strict=True))
        else:  # a sourcedId holds the separator
            cursor.execute(
                f"SELECT fp, sourced_id FROM {mirror} WHERE source = %s AND fp IS NOT NULL",
                (source,),
            )
            fps.update(cursor)
    cursor.execute(f"SELECT {KEY_SQL} FROM {mirror} WHERE source = %s AND fp IS NULL", (source,))
    return {key for (key,) in cursor}, fps
