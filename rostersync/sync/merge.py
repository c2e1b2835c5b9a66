"""The mirror merge: a run's changed staged rows upserted into the mirror, what a full run did
not see swept, and PostgreSQL's planner statistics kept fresh afterwards.

It runs inside the apply step's one transaction, so a failed run leaves the mirror (and its
indexes) as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.schema import CreateIndex, DropIndex

from rostersync.store.db import in_text, index_build
from rostersync.store.tables import GENERATED_FROM, indexes_on, metadata
from rostersync.sync.mirror import TABLES
from rostersync.sync.rules import chunks
from rostersync.sync.staging import run_scan

#: Below this many staged rows a load keeps the mirror's indexes (the rebuild costs more).
BULK_LOAD_MIN_ROWS = 50_000


def _first_load(
    conn: Connection, mirror: str, staging: str, params: dict[str, Any]
) -> tuple[bool, bool]:
    """(this run loads the source into ``mirror`` for the first time, and that load at least
    doubles the table: its secondary indexes are better built afterwards). The cheap test
    first, so that a delta run does not count a large mirror."""
    mine = conn.execute(text(f"SELECT 1 FROM {mirror} WHERE source = :src LIMIT 1"), params).first()
    if mine is not None:
        return False, False
    total = int(conn.execute(text(f"SELECT count(*) FROM {mirror}")).scalar_one())
    # Staged rows are counted only as far as the answer needs (a first load's million
    # enrollments are not all read to learn that there are more than 50,000).
    enough = max(total, BULK_LOAD_MIN_ROWS)
    staged = conn.execute(
        text(f"SELECT count(*) FROM (SELECT 1 FROM {staging} WHERE run_id = :run LIMIT :cap) s"),
        {**params, "cap": enough},
    ).scalar_one()
    return True, staged >= enough


def _update_in_place(conn: Connection, kind: str, source: str, run_id: int, ids: set[str]) -> int:
    """SQLite: copy these changed rows' staged values over their mirror rows where no
    indexed column changed, setting only the columns no index holds. SQLite rewrites the
    entries of every index on a column an UPDATE sets, equal or not, and the upsert below
    sets them all: index pages rewritten with the values they held."""
    mirror, staging, cols = TABLES[kind]
    # A generated column's index entry moves when a column it is computed from is set.
    indexed = {
        f'"{name}"'
        for index in indexes_on(metadata.tables[mirror], "sqlite")
        for c in index.columns
        if c.name not in ("source", "sourced_id")
        for name in GENERATED_FROM.get(c.name, (c.name,))
    }
    # A changed record has a new fingerprint: setting it rewrites the fingerprint index's
    # entry alone, where the upsert would rewrite every index's.
    indexed.discard('"fp"')
    if not ids or not indexed:
        return 0
    sets = ", ".join(f"{c} = s.{c}" for c in cols if c not in indexed)
    same = " AND ".join(f"m.{c} IS s.{c}" for c in sorted(indexed))
    stmt = in_text(
        f"UPDATE {mirror} AS m SET {sets} FROM {staging} s "
        f"WHERE s.run_id = :run AND s.sourced_id IN :ids "
        f"AND m.source = :src AND m.sourced_id = s.sourced_id AND {same}",
        "ids",
    )
    done = 0
    for chunk in chunks(sorted(ids)):
        done += conn.execute(stmt, {"run": run_id, "src": source, "ids": chunk}).rowcount or 0
    return done


#: Up to this many new and changed rows of a kind, the merge upserts them by id (500 per
#: statement); beyond it, one statement over all staged rows costs less.
TARGETED_UPSERT_MAX = 50_000


def merge(
    conn: Connection,
    source: str,
    run_id: int,
    missing: Mapping[str, set[str]],
    in_place: Mapping[str, set[str]] | None = None,
    to_write: Mapping[str, set[str]] | None = None,
    *,
    refresh_fp: Mapping[str, set[str]] | None = None,
) -> dict[str, int]:
    """Upsert changed staged rows into the mirror and sweep what a full run did not see
    (``missing``, from :func:`find_changes`; ``in_place``, its changed rows already in the
    mirror, lets SQLite leave their unchanged index entries alone; ``to_write``, all its new
    and changed rows, lets a run that changed little upsert just those instead of comparing
    every staged row again). ``refresh_fp``: the ids the run staged, per kind, of a run that
    left out known records (rostersync.sync.known; the others, scoped runs among them, stage
    every row, and comparing them all with the mirror again would cost as much as the change
    detection): a row staged as the mirror holds it takes its record's fingerprint, so that
    the next full run leaves the record out. Returns rows written per table (new
    fingerprints of rows otherwise unchanged not counted)."""
    written: dict[str, int] = {}
    for kind, (mirror, staging, cols) in TABLES.items():
        params = {"src": source, "run": run_id}
        written[kind] = 0
        if in_place and conn.dialect.name == "sqlite":
            # PostgreSQL compares the values itself and skips unchanged index entries.
            written[kind] = _update_in_place(conn, kind, source, run_id, in_place.get(kind, set()))
        # A source's first load that at least doubles the table goes in faster without the
        # secondary indexes (on PostgreSQL, the primary key too), built again afterwards by
        # one sort each, than with them kept up row by row. Inside the transaction, so a
        # failed run leaves them as they were.
        table = metadata.tables[mirror]
        secondary = [i for i in indexes_on(table, conn.dialect.name) if not i.unique]
        fresh, bulk = _first_load(conn, mirror, staging, params)
        rebuild = secondary if bulk else []
        for index in rebuild:
            conn.execute(DropIndex(index))
        key = _drop_primary_key(conn, mirror) if bulk else None
        col_list = ", ".join(cols)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols)
        insert = (
            f"INSERT INTO {mirror} (source, sourced_id, {col_list}) "
            f"SELECT CAST(:src AS VARCHAR(64)), s.sourced_id, "
            f"{', '.join('s.' + c for c in cols)} "
        )
        upsert = f"""
            AND NOT EXISTS (
                SELECT 1 FROM {mirror} m WHERE m.source = :src
                AND m.sourced_id = s.sourced_id AND m.row_hash = s.row_hash)
            ON CONFLICT (source, sourced_id) DO UPDATE SET {updates}
        """
        ids = None if fresh or to_write is None else to_write.get(kind)
        if ids is not None and len(ids) <= TARGETED_UPSERT_MAX:
            # The changed rows are known: upsert those by id (the staging key finds each),
            # not all staged rows probed against the mirror again (most of a no-op run).
            # The rows updated in place now carry the staged hash: NOT EXISTS skips them.
            by_id = text(
                f"{insert}FROM {staging} s WHERE s.run_id = :run AND s.sourced_id IN :ids {upsert}"
            ).bindparams(bindparam("ids", expanding=True))
            for chunk in chunks(sorted(ids)):
                written[kind] += conn.execute(by_id, {**params, "ids": chunk}).rowcount or 0
        else:
            # A first load has nothing to compare with and no conflict to resolve (staging
            # holds one row per id): the probe and the conflict check per row are skipped.
            sql = f"{insert}FROM {run_scan(conn, staging)} WHERE s.run_id = :run"
            if not fresh:
                sql += upsert
            written[kind] += conn.execute(text(sql), params).rowcount or 0
        if key is not None:
            _restore_primary_key(conn, mirror, key)
        if rebuild:
            with index_build(conn, mirror):
                for index in rebuild:
                    conn.execute(CreateIndex(index))
        if refresh_fp is not None and not fresh:
            # The rows written above took their fingerprints with them: only the others can
            # be as the mirror holds them (most runs that change little: none).
            unwritten = refresh_fp.get(kind, set())
            if to_write is not None and kind in to_write:
                unwritten = unwritten - to_write[kind]
            if unwritten:
                _refresh_fingerprints(conn, mirror, staging, params, unwritten)
        # Delete by id: the ids are known already, and an anti-join over a million-row
        # mirror costs seconds even when nothing is gone.
        for chunk in chunks(sorted(missing.get(kind, ()))):
            stmt = text(
                f"DELETE FROM {mirror} WHERE source = :src AND sourced_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
            written[kind] += conn.execute(stmt, {"src": source, "ids": chunk}).rowcount or 0
    return written


def _drop_primary_key(conn: Connection, mirror: str) -> tuple[str, str] | None:
    """PostgreSQL, before a bulk load: drop the table's primary key, and return its name and
    its index's definition to build it again by (:func:`_restore_primary_key`). Kept up row
    by row, the key costs a bulk load more than one sort afterwards (more still with GUIDs,
    each a random place in it). SQLite cannot drop a key: None there."""
    if conn.dialect.name != "postgresql":
        return None
    row = conn.execute(
        text(
            "SELECT conname, pg_get_indexdef(conindid) FROM pg_constraint "
            "WHERE conrelid = CAST(CAST(:table AS text) AS regclass) AND contype = 'p'"
        ),
        {"table": mirror},
    ).first()
    if row is None:
        return None
    name, index = str(row[0]), str(row[1])
    conn.execute(text(f'ALTER TABLE {mirror} DROP CONSTRAINT "{name}"'))
    return name, index


def _restore_primary_key(conn: Connection, mirror: str, key: tuple[str, str]) -> None:
    """Build the primary key :func:`_drop_primary_key` dropped, as it was (its index's
    definition, schema-qualified, as PostgreSQL gave it). A repeated key fails the run here,
    as the insert would have."""
    name, index = key
    conn.execute(text(index))
    conn.execute(
        text(f'ALTER TABLE {mirror} ADD CONSTRAINT "{name}" PRIMARY KEY USING INDEX "{name}"')
    )


def _refresh_fingerprints(
    conn: Connection, mirror: str, staging: str, params: Mapping[str, Any], ids: set[str]
) -> None:
    """Staged rows equal to their mirror rows whose record's fingerprint the mirror does not
    hold (rows from before migration 0016 or an upgrade of the normalizer, a record whose
    bytes changed and its row not): the mirror takes the fingerprint. The upsert left them
    alone (same hash). ``ids``: the staged rows the merge did not write."""
    differs = "IS NOT" if conn.dialect.name == "sqlite" else "IS DISTINCT FROM"
    update = f"UPDATE {mirror} AS m SET fp = s.fp FROM "
    where = (
        "WHERE s.run_id = :run AND s.fp IS NOT NULL AND m.source = :src "
        f"AND m.sourced_id = s.sourced_id AND m.row_hash = s.row_hash AND m.fp {differs} s.fp"
    )
    if len(ids) > TARGETED_UPSERT_MAX:
        # Most of the staged rows (an upgrade of the normalizer changed every record's
        # fingerprint): staging scanned, the mirror probed by its key. SQLite would rather
        # walk the mirror through the staging key.
        conn.execute(text(f"{update}{run_scan(conn, staging)} {where}"), dict(params))
        return
    # A few: each found by the staging key, its mirror row by the mirror's.
    stmt = in_text(
        f"{update}{staging} s {where} AND s.sourced_id IN :ids", "ids", dialect=conn.dialect.name
    )
    for chunk in chunks(sorted(ids)):
        conn.execute(stmt, {**params, "ids": chunk})


# -- planner statistics ---------------------------------------------------------------------

#: The statistics target of these ANALYZEs (PostgreSQL's default: 100). It sets the sample,
#: 300 rows per unit, and so the time a first load waits for it. The plans these statistics
#: decide (index probe or scan, join order) follow the tables' sizes, not fine histograms;
#: autovacuum re-samples at the server's own target later.
STATISTICS_TARGET = 30


def _analyze(conn: Connection, tables: str) -> None:
    """ANALYZE with this module's smaller sample, for this transaction only (SET LOCAL); a
    column given its own target (ALTER TABLE ... SET STATISTICS) keeps it."""
    conn.execute(text(f"SET LOCAL default_statistics_target = {STATISTICS_TARGET}"))
    conn.execute(text(f"ANALYZE {tables}"))


def refresh_statistics(conn: Connection, written: Mapping[str, int]) -> list[str]:
    """Fresh PostgreSQL planner statistics for the mirror tables this merge changed much;
    returns the tables analysed.

    Without them PostgreSQL picks nested loops over sequential scans on a freshly loaded
    table. A table counts as changed much by autovacuum's own rule: 50 rows plus a tenth of
    the rows it had when last analysed (never analysed counts as none). A first load always
    is; a small delta is not, and analysing a large mirror for it would cost more than it
    saves. SQLite plans these queries well without statistics, except one, which names its
    index (see enrollments_of_persons).
    """
    if conn.dialect.name != "postgresql":
        return []
    changed = {TABLES[k][0]: n for k, n in written.items() if n and k != "org"}
    if not changed:
        return []
    sizes: dict[str, float] = dict(
        conn.execute(
            text(
                "SELECT relname, reltuples FROM pg_class "
                "WHERE oid = ANY(CAST(CAST(:tables AS text[]) AS regclass[]))"
            ),
            {"tables": sorted(changed)},
        ).all()
    )
    stale = [t for t, n in sorted(changed.items()) if n >= 50 + 0.1 * max(sizes.get(t, 0), 0)]
    if stale:
        _analyze(conn, ", ".join(stale))
    return stale


def refresh_directory_statistics(conn: Connection, *, members: bool = True) -> None:
    """Fresh PostgreSQL statistics for the directory tables (see refresh_statistics).

    A first sync creates thousands of users and its resyncs tens of thousands of groups and
    a million member rows; planned with the statistics of the empty tables, PostgreSQL
    chooses scans where an index answers at once.
    ``members``: include ``group_member``, the one large table (its sample costs most).
    """
    if conn.dialect.name == "postgresql":
        tables = '"user", user_identity, groups, group_owner'
        _analyze(conn, f"{tables}{', group_member' if members else ''}")
