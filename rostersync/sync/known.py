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

import shutil
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, text

from rostersync.source.rawhash import HEX_DIGITS, save
from rostersync.source.rows import COLUMNS, StagedBatch
from rostersync.store.db import Store
from rostersync.sync.mirror import TABLES
from rostersync.sync.rules import chunks

#: Where each kind's row tuple carries its hash.
HASH_AT = {kind: cols.index("row_hash") for kind, cols in COLUMNS.items()}
#: ... and its record's fingerprint.
RAW_AT = {kind: cols.index("raw_hash") for kind, cols in COLUMNS.items()}


def row_key(row_hash: str, sourced_id: str) -> str:
    """A mirror row as the filter knows it: its hash and its id in one string (a hash is hex,
    so the first colon ends it). One string a row, not a dict entry: a third of the memory."""
    return f"{row_hash}:{sourced_id}"


#: :func:`row_key` in SQL.
KEY_SQL = "row_hash || ':' || sourced_id"


class KnownRows:
    """One full run's view of the source's mirror rows, loaded once while the fetch starts:
    per kind, the :func:`row_key` of every row the run has not yet seen as it is.

    Mirror rows that carry their record's fingerprint (``raw_hash``) are also listed in
    fingerprint order (``order``), and the fingerprints are written to a file per kind
    (:meth:`hash_file`) for a connector's decode workers: a record they find there is
    reported by its position in that order (``StagedBatch.seen``) instead of as a row."""

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
        #: of those, records recognised by their fingerprint, never normalized
        self.recognised: dict[str, int] = {kind: 0 for kind in COLUMNS}
        #: keys of the mirror rows with a fingerprint, in the order of the kind's hash file
        self.order: dict[str, list[str]] = {kind: [] for kind in COLUMNS}
        #: ids seen as the mirror holds them after the run had staged another version: the
        #: last version wins, so the mirror's row is staged again at the end (:meth:`restage`)
        self.restaged: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: keys of the mirror rows without a fingerprint (made before there were any)
        self.unhashed: dict[str, set[str]] = {kind: set() for kind in COLUMNS}
        #: (sourcedId, fingerprint) of such rows seen unchanged: the apply stores those
        #: fingerprints (:meth:`rehash`), so that the next run recognises the records
        self.rehashed: dict[str, list[tuple[str, str]]] = {kind: [] for kind in COLUMNS}
        self._files: dict[str, Future[str | None]] = {kind: Future() for kind in COLUMNS}
        self._folder: str | None = None
        self._loaded = threading.Event()
        self._error: BaseException | None = None

    def hash_file(self, kind: str) -> Future[str | None]:
        """The file of the mirror's fingerprints of ``kind`` (rostersync.source.rawhash), or
        None where there is none; resolved once that kind is loaded."""
        return self._files[kind]

    def load(self, store: Store) -> None:
        """Read the source's mirror keys (in a worker thread, while the fetch begins).

        Through the driver's cursor, not SQLAlchemy's result: a million rows fetched one by
        one through it cost seconds. Joined into long strings by the database where it can
        (:func:`_keys`)."""
        try:
            self._folder = tempfile.mkdtemp(prefix="rostersync-known-")
            with store.read() as conn:
                raw: Any = conn.connection.dbapi_connection
                cursor = raw.cursor()
                postgres = conn.dialect.name == "postgresql"
                try:
                    for kind, (mirror, _, _) in TABLES.items():
                        loaded = _keys(cursor, mirror, self.source, postgres=postgres)
                        path: str | None = None
                        if loaded is None:  # an id holds the separator: row by row, no file
                            keys = _plain_keys(cursor, mirror, self.source, postgres=postgres)
                        else:
                            unhashed, hexes, order = loaded
                            keys = set(unhashed)
                            keys.update(order)
                            self.unhashed[kind] = set(unhashed)
                            if order:
                                path = str(Path(self._folder, f"{kind}.hashes"))
                                if _saved(Path(path), hexes) == len(order):
                                    self.order[kind] = order
                                else:
                                    path = None
                        if keys:
                            self.held.add(kind)
                        self.remaining[kind] = keys
                        self._files[kind].set_result(path)
                finally:
                    cursor.close()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            for future in self._files.values():
                if not future.done():
                    future.set_result(None)
            self._loaded.set()

    def close(self) -> None:
        """Remove the hash files (the fetch is over)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def filter(self, batch: StagedBatch) -> StagedBatch:
        """``batch`` without the rows the mirror holds as they are, and its ``seen`` records
        counted as seen. A sourcedId repeated in the run keeps the last version, as staging
        does: once an id has been staged, its later rows are staged too, and a changed row
        after an unchanged one is staged; an unchanged one after a staged one has the
        mirror's row staged again (:meth:`restage`). A batch is one page, or pages in
        their order: a page repeats no id between its rows and its ``seen``."""
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        out = StagedBatch(rejected=batch.rejected, newest=batch.newest, terms=batch.terms)
        for kind, seen in batch.seen.items():
            order, remaining, staged = self.order[kind], self.remaining[kind], self.staged[kind]
            restaged = self.restaged[kind]
            for at in seen:
                key = order[at]
                remaining.discard(key)
                if staged and (sid := key.partition(":")[2]) in staged:
                    restaged.add(sid)
            self.unchanged[kind] += len(seen)
            self.recognised[kind] += len(seen)
        for kind, rows in batch.rows.items():
            if kind not in self.held:  # a first load: everything is new, nothing to sweep
                out.rows[kind] = rows
                continue
            at, raw_at = HASH_AT[kind], RAW_AT[kind]
            remaining, staged = self.remaining[kind], self.staged[kind]
            restaged, unhashed = self.restaged[kind], self.unhashed[kind]
            keep = out.rows[kind]
            left_out = 0
            for row in rows:
                sid = row[0]
                key = f"{row[at]}:{sid}"  # row_key, inlined: this loop sees every record
                if key in remaining and sid not in staged:
                    remaining.remove(key)
                    left_out += 1
                    if unhashed and key in unhashed and row[raw_at] is not None:
                        self.rehashed[kind].append((sid, row[raw_at]))
                else:
                    keep.append(row)
                    staged.add(sid)
                    if restaged:
                        restaged.discard(sid)
            self.unchanged[kind] += left_out
        return out

    def rehash(self, conn: Connection) -> int:
        """Store the fingerprints of the mirror rows that had none and were seen unchanged
        (see ``rehashed``); returns how many. In the apply's transaction: a run that fails,
        is held or is dry stores none. Once per row, after the upgrade that brought them."""
        done = 0
        for kind, pairs in self.rehashed.items():
            if pairs:
                stmt = text(
                    f"UPDATE {TABLES[kind][0]} SET raw_hash = :h "
                    "WHERE source = :src AND sourced_id = :sid AND raw_hash IS NULL"
                )
                conn.execute(stmt, [{"h": h, "src": self.source, "sid": sid} for sid, h in pairs])
                done += len(pairs)
        return done

    def restage(self, conn: Connection, run_id: int) -> int:
        """Stage the mirror's row of every id whose last version in the run was the one the
        mirror holds, over the earlier version staged (see :meth:`filter`); returns how many.
        At the end of the fetch: the ids are rare (a source repeating a record, changed,
        across pages)."""
        done = 0
        for kind, ids in self.restaged.items():
            if not ids:
                continue
            staging = TABLES[kind][1]
            delete = text(
                f"DELETE FROM {staging} WHERE run_id = :run AND sourced_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
            insert = _from_mirror(kind)
            params = {"run": run_id, "src": self.source}
            for chunk in chunks(sorted(ids)):
                conn.execute(delete, {**params, "ids": chunk})
                done += conn.execute(insert, {**params, "ids": chunk}).rowcount or 0
        return done

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
            mirror = TABLES[kind][0]
            remaining, staged = self.remaining[kind], self.staged[kind]
            keys = conn.execute(
                text(f"SELECT {KEY_SQL}, sourced_id FROM {mirror} WHERE source = :src"),
                {"src": self.source},
            )
            ids = [sid for key, sid in keys if key not in remaining and sid not in staged]
            stmt = _from_mirror(kind)
            params = {"run": run_id, "src": self.source}
            for chunk in chunks(sorted(ids)):
                done += conn.execute(stmt, {**params, "ids": chunk}).rowcount or 0
        return done


def _from_mirror(kind: str) -> Any:
    """INSERT into ``kind``'s staging, for run ``:run``, the mirror rows of ``:src`` whose ids
    are in ``:ids``, as the mirror holds them."""
    mirror, staging, cols = TABLES[kind]
    return text(
        f"INSERT INTO {staging} (run_id, sourced_id, {', '.join(cols)}) "
        f"SELECT :run, m.sourced_id, {', '.join('m.' + c for c in cols)} "
        f"FROM {mirror} m WHERE m.source = :src AND m.sourced_id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))


#: Joins the keys: the ASCII unit separator, which no sane sourcedId holds (one that does
#: is caught by the count and read row by row).
_SEP = "\x1f"


def _saved(path: Path, hexes: str) -> int:
    """:func:`save`, or 0 if a stored fingerprint is not hex (the kind then has no file)."""
    try:
        return save(path, hexes)
    except ValueError:
        return 0


def _keys(
    cursor: Any, mirror: str, source: str, *, postgres: bool
) -> tuple[list[str], str, list[str]] | None:
    """The :func:`row_key` of ``source``'s rows in ``mirror``: (those without a usable
    fingerprint, the fingerprints of the others joined in order, their keys in that order);
    None if an id holds the separator.

    One scan, joined by the database into two strings: row by row, the driver gives up the
    interpreter lock around every step and waits to get it back behind the fetch's threads.
    SQLite reads the table in rowid order, not through an index on ``source`` (a row lookup
    for each entry, several times slower).
    Sorted by the database, rows without a fingerprint first and the id as tie-breaker, and
    both strings joined in that one order: a fingerprint's position in the file is its
    key's in the list."""
    hashed = "CASE WHEN length(raw_hash) = 32 THEN raw_hash END"
    if postgres:
        order = 'ORDER BY h COLLATE "C" NULLS FIRST, sourced_id COLLATE "C"'
        cursor.execute(
            f"SELECT string_agg(h, '' {order}), string_agg(k, %s {order}), count(*), count(h) "
            f"FROM (SELECT {hashed} AS h, {KEY_SQL} AS k, sourced_id FROM {mirror} "
            "WHERE source = %s) AS m",
            (_SEP, source),
        )
    else:
        cursor.execute(
            "SELECT group_concat(h, ''), group_concat(k, ?), count(*), count(h) FROM ("
            f"SELECT {hashed} AS h, {KEY_SQL} AS k FROM {mirror} NOT INDEXED WHERE source = ? "
            "ORDER BY h, sourced_id)",
            (_SEP, source),
        )
    hexes, joined, count, with_hash = cursor.fetchone()
    if not count:
        return [], "", []
    keys = joined.split(_SEP)
    if len(keys) != count or len(hexes or "") != HEX_DIGITS * with_hash:
        return None
    split = count - with_hash
    return keys[:split], hexes or "", keys[split:]


def _plain_keys(cursor: Any, mirror: str, source: str, *, postgres: bool) -> set[str]:
    cursor.execute(
        f"SELECT {KEY_SQL} FROM {mirror} WHERE source = " + ("%s" if postgres else "?"),
        (source,),
    )
    return {key for (key,) in cursor}
