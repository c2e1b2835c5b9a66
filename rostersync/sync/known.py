"""What the mirror already holds, so that a full run stages only what changed.

A full run reads every record, and on a typical night almost all of them are as the mirror
has them. Each staged row carries ``row_hash``, computed where the record was normalized;
before a batch is staged, every row whose hash equals its mirror row's is left out and only
its sourcedId kept. Staging, the change detection and the merge then handle what is new or
changed alone, and the sweep of a full run is what the mirror holds that the run neither
staged nor saw unchanged (:meth:`KnownRows.missing`).

The rules see exactly what they saw when every row was staged: an unchanged row is one the
change detection would have found equal to its mirror row and skipped. A run that is held
keeps its staging for ``runs approve``, which compares staging with the mirror in another
process, so the held run's staging is completed from the mirror (:meth:`KnownRows.complete`,
in the transaction that records the hold) and holds every row the run saw, as before.

Only full runs of sources without a school or term scope use it: the scope step judges every
staged class and enrollment (rostersync.sync.scope), so scoped runs stage everything.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Connection, bindparam, text

from rostersync.source.rows import COLUMNS, StagedBatch
from rostersync.store.db import Store
from rostersync.sync.mirror import TABLES
from rostersync.sync.rules import chunks

#: Where each kind's row tuple carries its hash.
HASH_AT = {kind: cols.index("row_hash") for kind, cols in COLUMNS.items()}


def row_key(row_hash: str, sourced_id: str) -> str:
    """A mirror row as the filter knows it: its hash and its id in one string (a hash is hex,
    so the first colon ends it). One string a row, not a dict entry: a third of the memory."""
    return f"{row_hash}:{sourced_id}"


#: :func:`row_key` in SQL.
KEY_SQL = "row_hash || ':' || sourced_id"


class KnownRows:
    """One full run's view of the source's mirror rows, loaded once while the fetch starts:
    per kind, the :func:`row_key` of every row the run has not yet seen as it is."""

    def __init__(self, source: str) -> None:
        self.source = source
        #: keys of mirror rows not (yet) seen unchanged; what is left at the end changed or
        #: went
        self.remaining: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: kinds the mirror holds rows of (a first load of a kind stages all of it)
        self.held: set[str] = set()
        #: ids the run staged, for kinds the mirror holds rows of
        self.staged: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: rows left out of staging, per kind
        self.unchanged: dict[str, int] = {kind: 0 for kind in COLUMNS}
        self._loaded = threading.Event()
        self._error: BaseException | None = None

    def load(self, store: Store) -> None:
        """Read the source's mirror keys (in a worker thread, while the fetch begins).

        Through the driver's cursor, not SQLAlchemy's result: a million rows fetched one by
        one through it cost seconds. SQLite hands the keys over joined into one string per
        slice of the table (:func:`_sqlite_keys`); PostgreSQL row by row."""
        try:
            with store.read() as conn:
                raw: Any = conn.connection.dbapi_connection
                cursor = raw.cursor()
                try:
                    for kind, (mirror, _, _) in TABLES.items():
                        if conn.dialect.name == "postgresql":
                            cursor.execute(
                                f"SELECT {KEY_SQL} FROM {mirror} WHERE source = %s", (self.source,)
                            )
                            keys = {key for (key,) in cursor}
                        else:
                            keys = _sqlite_keys(cursor, mirror, self.source)
                        if keys:
                            self.held.add(kind)
                        self.remaining[kind] = keys
                finally:
                    cursor.close()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._loaded.set()

    def filter(self, batch: StagedBatch) -> StagedBatch:
        """``batch`` without the rows the mirror holds as they are. A sourcedId repeated in
        the run keeps the last version, as staging does: once an id has been staged, its
        later rows are staged too, and a changed row after an unchanged one is staged."""
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        out = StagedBatch(rejected=batch.rejected, newest=batch.newest, terms=batch.terms)
        for kind, rows in batch.rows.items():
            if kind not in self.held:  # a first load: everything is new, nothing to sweep
                out.rows[kind] = rows
                continue
            at = HASH_AT[kind]
            remaining, staged = self.remaining[kind], self.staged[kind]
            keep = out.rows[kind]
            left_out = 0
            for row in rows:
                sid = row[0]
                key = f"{row[at]}:{sid}"  # row_key, inlined: this loop sees every record
                if key in remaining and sid not in staged:
                    remaining.remove(key)
                    left_out += 1
                else:
                    keep.append(row)
                    staged.add(sid)
            self.unchanged[kind] += left_out
        return out

    def missing(self, kind: str) -> set[str]:
        """Mirror rows of ``kind`` the run did not see: neither staged nor seen unchanged."""
        remaining = self.remaining[kind]
        if not remaining:
            return set()
        return {key.partition(":")[2] for key in remaining} - self.staged[kind]

    def complete(self, conn: Connection, run_id: int) -> int:
        """Stage the rows left out as the mirror holds them (they were equal), so that a held
        run's staging holds every row it saw; returns how many. Inside the transaction that
        records the hold, after the apply rolled back: the mirror is as the run found it."""
        done = 0
        for kind in sorted(self.held):
            if not self.unchanged[kind]:
                continue
            mirror, staging, cols = TABLES[kind]
            remaining, staged = self.remaining[kind], self.staged[kind]
            keys = conn.execute(
                text(f"SELECT {KEY_SQL}, sourced_id FROM {mirror} WHERE source = :src"),
                {"src": self.source},
            )
            ids = [sid for key, sid in keys if key not in remaining and sid not in staged]
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
    """The :func:`row_key` of every row of ``source`` in ``mirror``, read a slice of rowids at a
    time with the keys joined by SQLite (``group_concat``) and split here.

    Row by row, the driver gives up the interpreter lock around every step and waits to get
    it back behind the fetch's threads: the load that takes 0.9 s alone took several while
    the fetch ran, and the first batch's filter waits for it. The slices walk the table in
    rowid order, not through an index on ``source`` (a row lookup for each entry)."""
    (top,) = cursor.execute(f"SELECT max(rowid) FROM {mirror}").fetchone()
    where = f"FROM {mirror} NOT INDEXED WHERE rowid > ? AND rowid <= ? AND source = ?"
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
