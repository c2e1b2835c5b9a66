"""The mirror merge: bulk loads, upserts, updates in place, and the chunked id reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import event, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import DropIndex

from rostersync.config.models import Settings
from rostersync.source.records import RosterEnrollment
from rostersync.source.rows import StagedBatch, enrollment_tuple
from rostersync.source.testdata import small_roster
from rostersync.store import db
from rostersync.store.db import Store
from rostersync.sync import merge as merging
from rostersync.sync import mirror
from rostersync.sync import staging as staging_step
from rostersync.sync.staging import clear_staging, prepare_staging, stage
from tests.schemadump import schema_of
from tests.sync.helpers import groups, snapshot, sync


async def test_a_bulk_load_rebuilds_the_mirror_indexes_and_a_failure_keeps_them(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that doubles a mirror table drops its secondary indexes and builds them again
    in the same transaction: they exist afterwards, and a run failing after the load leaves
    the indexes and the (empty) mirror as they were."""
    monkeypatch.setattr(merging, "BULK_LOAD_MIN_ROWS", 1)
    dropped: list[str] = []
    real_drop = DropIndex

    def spy(index: Any) -> Any:
        dropped.append(index.name)
        return real_drop(index)

    monkeypatch.setattr(merging, "DropIndex", spy)
    expected = {"ix_roster_enr_class", "ix_roster_enr_user"}

    def boom(conn: Any, written: Any) -> None:
        raise RuntimeError("boom after the load")

    with monkeypatch.context() as m:
        m.setattr(merging, "refresh_statistics", boom)
        failed = await sync(make_settings(), store, small_roster())
    assert failed.status == "failed" and "boom" in (failed.error or "")
    assert expected <= set(dropped)
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("roster_enrollment")}
    assert expected <= indexes
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM roster_enrollment")).scalar_one() == 0

    dropped.clear()
    report = await sync(make_settings(), store, small_roster())
    assert report.status == "succeeded"
    assert expected <= set(dropped) and "ix_roster_person_email" in dropped
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("roster_enrollment")}
    assert expected <= indexes
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
    dropped.clear()
    await sync(make_settings(), store, small_roster())  # not a first load: indexes kept
    assert dropped == []


def _keys_and_indexes(store: Store) -> dict[str, Any]:
    """PostgreSQL: the schema, every constraint and index with its definition."""
    with store.read() as conn:
        return schema_of(conn)


@pytest.mark.postgres
async def test_a_postgresql_bulk_load_builds_the_primary_key_again_and_a_failure_keeps_it(
    pg_store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a bulk load also drops the table's primary key and builds it again after
    the insert, as it was (name, columns, index); a run failing after the load leaves it
    as it was, and the key works: a later run's upserts find their rows."""
    monkeypatch.setattr(merging, "BULK_LOAD_MIN_ROWS", 1)
    before = _keys_and_indexes(pg_store)
    key = ("roster_enrollment", "roster_enrollment_pkey", "PRIMARY KEY (sourced_id, source)")
    assert key in before["constraints"]
    statements: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "PRIMARY KEY" in statement or "DROP CONSTRAINT" in statement:
            statements.append(statement)

    event.listen(pg_store.engine, "before_cursor_execute", spy)

    def boom(conn: Any, written: Any) -> None:
        raise RuntimeError("boom after the load")

    with monkeypatch.context() as m:
        m.setattr(merging, "refresh_statistics", boom)
        failed = await sync(make_settings(), pg_store, small_roster())
    assert failed.status == "failed"
    assert any('DROP CONSTRAINT "roster_enrollment_pkey"' in s for s in statements)
    assert _keys_and_indexes(pg_store) == before

    statements.clear()
    report = await sync(make_settings(), pg_store, small_roster())
    assert report.status == "succeeded"
    assert any('ADD CONSTRAINT "roster_person_pkey" PRIMARY KEY' in s for s in statements)
    assert _keys_and_indexes(pg_store) == before
    statements.clear()
    changed = small_roster()
    changed.persons[0] = replace(changed.persons[0], family_name="Renamed")
    again = await sync(make_settings(), pg_store, changed)  # not a first load: the key stays
    assert again.status == "succeeded" and statements == []
    with pg_store.read() as conn:
        names = conn.execute(text("SELECT family_name FROM roster_person")).scalars().all()
    assert "Renamed" in names and len(names) == len(changed.persons)


async def test_a_sources_first_load_inserts_without_comparing_and_later_runs_upsert(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Into a mirror table that holds no row of the source, the merge inserts the staged rows
    plainly (nothing to compare, no conflict possible), even beside another source's rows;
    once the source has rows there, changes go through the comparing upsert."""
    settings = make_settings(memory_sources=("mem", "other"))
    statements: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO roster_enrollment"):
            statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", spy)
    try:
        await sync(settings, store, small_roster())
        first = list(statements)
        await sync(settings, store, small_roster(), source="other")
        beside = statements[len(first) :]
        roster = small_roster()
        roster.enrollments = [
            replace(e, primary=True) if e.sourced_id == "e-s1c1" else e for e in roster.enrollments
        ]
        count = len(statements)
        report = await sync(settings, store, roster)
        again = statements[count:]
    finally:
        event.remove(store.engine, "before_cursor_execute", spy)
    assert report.status == "succeeded"
    assert len(first) == 1 and "ON CONFLICT" not in first[0] and "NOT EXISTS" not in first[0]
    assert len(beside) == 1 and "ON CONFLICT" not in beside[0]
    assert len(again) == 1 and "ON CONFLICT" in again[0]
    with store.read() as conn:
        rows = conn.execute(
            text(
                'SELECT source, count(*), sum(CASE WHEN "primary" THEN 1 ELSE 0 END) '
                "FROM roster_enrollment GROUP BY source ORDER BY source"
            )
        ).all()
    base = small_roster().enrollments
    primaries = sum(e.primary for e in base)
    assert not next(e for e in base if e.sourced_id == "e-s1c1").primary
    assert [tuple(r) for r in rows] == [
        ("mem", len(base), primaries + 1),
        ("other", len(base), primaries),
    ]


async def test_changed_rows_keep_their_index_entries_when_no_indexed_column_changed(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The merge writes every change, and on SQLite sets an indexed column only for rows
    whose value in it changed: a trigger on those columns fires for the moved enrollment,
    the new email and the new family name (the member index holds the name computed from
    it), not for the flag or the username that changed beside them."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    sqlite = store.engine.dialect.name == "sqlite"
    if sqlite:
        with store.write() as conn:
            conn.execute(text("CREATE TABLE index_writes (tbl TEXT, sourced_id TEXT)"))
            conn.execute(
                text(
                    "CREATE TRIGGER enr_index_cols AFTER UPDATE OF class_id, user_id, role "
                    "ON roster_enrollment BEGIN INSERT INTO index_writes "
                    "VALUES ('enrollment', new.sourced_id); END"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER person_index_cols AFTER UPDATE OF email, status, given_name, "
                    "family_name ON roster_person "
                    "BEGIN INSERT INTO index_writes VALUES ('person', new.sourced_id); END"
                )
            )
    roster = small_roster()
    roster.enrollments = [
        replace(e, primary=True)
        if e.sourced_id == "e-s1c1"
        else replace(e, class_id="c-2")
        if e.sourced_id == "e-s2c1"
        else e
        for e in roster.enrollments
    ]
    roster.replace_person("s-3", family_name="Renamed")
    roster.replace_person("s-4", email="s4.new@example.org")
    roster.replace_person("s-5", username="s5.new")
    report = await sync(settings, store, roster)
    assert report.status == "succeeded"
    with store.read() as conn:
        enrollments = {
            sid: (cls, primary)
            for sid, cls, primary in conn.execute(
                text('SELECT sourced_id, class_id, "primary" FROM roster_enrollment')
            )
        }
        people = {
            sid: (family, email, username)
            for sid, family, email, username in conn.execute(
                text("SELECT sourced_id, family_name, email, username FROM roster_person")
            )
        }
        writes = (
            sorted(conn.execute(text("SELECT tbl, sourced_id FROM index_writes")).all())
            if sqlite
            else []
        )
    assert enrollments["e-s1c1"] == ("c-1", True)
    assert enrollments["e-s2c1"] == ("c-2", False)
    assert people["s-3"][:2] == ("Renamed", "s3@example.org")
    assert people["s-4"][:2] == ("Dent", "s4.new@example.org")
    assert people["s-5"][2] == "s5.new"
    assert {m["sourced_id"] for m in groups(store)["c-2"]["members"]} == {
        "s-2",
        "s-3",
        "s-4",
        "s-5",
    }
    assert {m["name"] for m in groups(store)["c-1"]["members"]} >= {"Stu3 Renamed"}
    if sqlite:
        assert writes == [("enrollment", "e-s2c1"), ("person", "s-3"), ("person", "s-4")]


@pytest.mark.parametrize("targeted", [True, False], ids=["by-id", "whole-run"])
async def test_a_full_run_that_changed_little_upserts_just_those_rows(
    store: Store,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    targeted: bool,
) -> None:
    """The merge writes the rows find_changes found new or changed, by id, and only for the
    kinds that have some: a full run that changed nothing runs no upsert and compares no
    staged row again. Beyond TARGETED_UPSERT_MAX rows of a kind it reads the whole run
    instead: the same mirror either way."""
    if not targeted:
        monkeypatch.setattr(merging, "TARGETED_UPSERT_MAX", 0)
    settings = make_settings()
    roster = small_roster()
    await sync(settings, store, roster)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO roster_"):
            statements.append(" ".join(statement.split()))

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        before = snapshot(store)
        await sync(settings, store, roster)
        assert snapshot(store) == before
        noop = list(statements)
        statements.clear()
        roster.replace_person("s-1", family_name="Renamed")
        roster.enrollments.append(RosterEnrollment("e-new", "c-2", "s-1", "student"))
        await sync(settings, store, roster)
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    assert noop == []  # nothing new or changed: no upsert at all
    assert {q.split()[2] for q in statements} == {"roster_person", "roster_enrollment"}
    by_id = [q for q in statements if "s.sourced_id IN" in q]
    assert len(by_id) == (len(statements) if targeted else 0)
    with store.read() as conn:
        person = conn.execute(
            text("SELECT family_name FROM roster_person WHERE sourced_id = 's-1'")
        ).scalar_one()
        enrolled = conn.execute(
            text("SELECT class_id FROM roster_enrollment WHERE sourced_id = 'e-new'")
        ).scalar_one()
    assert (person, enrolled) == ("Renamed", "c-2")
    members = {m["sourced_id"]: m["name"] for m in groups(store)["c-2"]["members"]}
    assert members["s-1"].endswith(" Renamed")


def test_id_lookups_take_every_value_in_one_statement_on_postgresql(store: Store) -> None:
    """``ids_in`` answers for every value, past the first 500 too: in one statement over an
    array on PostgreSQL (one plan, one round trip), in IN-list chunks of 500 on SQLite."""
    wanted = {f"c-{i:04d}" for i in range(0, 1200, 2)} | {"absent"}
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_class (source, sourced_id, title, status, row_hash) "
                "VALUES ('mem', :sid, 'T', 'active', 'h')"
            ),
            [{"sid": f"c-{i:04d}"} for i in range(1200)],
        )
        event.listen(conn, "before_cursor_execute", seen)
        found = mirror.ids_in(
            conn,
            "SELECT sourced_id FROM roster_class WHERE source = :src AND sourced_id IN :ids",
            wanted,
            src="mem",
        )
        event.remove(conn, "before_cursor_execute", seen)
    assert found == wanted - {"absent"}
    assert len(statements) == (1 if store.dialect == "postgresql" else 2)


def test_a_changed_record_with_a_new_fingerprint_is_updated_in_place(sqlite_store: Store) -> None:
    """SQLite: a record whose bytes and a column no index holds changed comes with a new
    fingerprint; the row is updated in place all the same (the fingerprint index's entry
    alone rewritten), not upserted with every index entry rewritten."""
    enrollment = RosterEnrollment("e-1", "c-1", "p-1", "student")

    def staged(run_id: int, record: RosterEnrollment, fp: int) -> StagedBatch:
        batch = StagedBatch()
        batch.rows["enrollment"].append((*enrollment_tuple(record)[:-1], fp))
        return batch

    with sqlite_store.write() as conn:
        stage(conn, 1, staged(1, enrollment, 11))
        prepare_staging(conn)
        merging.merge(conn, "src", 1, {})
        clear_staging(conn, 1)
        conn.execute(text("CREATE TABLE index_writes (what TEXT)"))
        conn.execute(
            text(
                "CREATE TRIGGER enr_index_cols AFTER UPDATE OF class_id, user_id, role "
                "ON roster_enrollment BEGIN INSERT INTO index_writes VALUES ('key'); END"
            )
        )
    dropped = replace(enrollment, status="tobedeleted")
    with sqlite_store.write() as conn:
        stage(conn, 2, staged(2, dropped, 22))
        prepare_staging(conn)
        ids = {"enrollment": {"e-1"}}
        written = merging.merge(conn, "src", 2, {}, ids, ids, refresh_fp=ids)
        assert written["enrollment"] == 1
        row = conn.execute(text("SELECT status, fp FROM roster_enrollment")).one()
        assert tuple(row) == ("tobedeleted", 22)
        assert conn.execute(text("SELECT count(*) FROM index_writes")).scalar_one() == 0


def _sort_settings(conn: Any) -> tuple[int, int]:
    return (
        conn.exec_driver_sql("PRAGMA cache_size").scalar(),
        conn.exec_driver_sql("PRAGMA threads").scalar(),
    )


def test_sqlite_builds_a_large_tables_indexes_in_small_sort_runs(sqlite_store: Store) -> None:
    """SQLite sorts a large table's index in runs of 8 MiB (a page cache that small, a helper
    thread) and gives the connection its cache back afterwards, also when the build fails;
    a small table's index is sorted with the whole cache."""
    big = (-db.SQLITE_SORT_KIB, 2)
    usual = (-db.SQLITE_CACHE_KIB, 0)
    with sqlite_store.write() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
        conn.exec_driver_sql(
            "INSERT INTO t WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            f"WHERE i < {db.SORT_RUNS_MIN_ROWS}) SELECT i % 7 FROM n"
        )
        conn.exec_driver_sql("CREATE TABLE small (v INTEGER)")
        conn.exec_driver_sql("INSERT INTO small VALUES (1), (1)")
        with db.index_build(conn, "small"):
            assert _sort_settings(conn) == usual
            conn.exec_driver_sql("CREATE INDEX ix_small ON small (v)")
        with db.index_build(conn, "t"):
            assert _sort_settings(conn) == big
            conn.exec_driver_sql("CREATE INDEX ix_t ON t (v)")
        assert _sort_settings(conn) == usual
        with pytest.raises(IntegrityError), db.index_build(conn, "t"):
            conn.exec_driver_sql("CREATE UNIQUE INDEX ux_t ON t (v)")  # v repeats
        assert _sort_settings(conn) == usual
        count = conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
        assert count == db.SORT_RUNS_MIN_ROWS
        indexes = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")}
        assert {"ix_t", "ix_small"} <= indexes and "ux_t" not in indexes


async def test_a_first_load_and_the_staging_key_sort_in_runs_when_large(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load's index builds and the apply's staging key go through index_build (on
    SQLite, with a threshold this small, in sort runs); the sync's outcome is the usual one.
    A later run, which rebuilds no index of the mirror, does not."""
    monkeypatch.setattr(merging, "BULK_LOAD_MIN_ROWS", 1)
    monkeypatch.setattr(db, "SORT_RUNS_MIN_ROWS", 1)
    tables: list[str] = []
    real = db.index_build

    def spy(conn: Any, table: str) -> Any:
        tables.append(table)
        return real(conn, table)

    monkeypatch.setattr(merging, "index_build", spy)
    monkeypatch.setattr(staging_step, "index_build", spy)
    report = await sync(make_settings(), store, small_roster())
    assert report.status == "succeeded"
    assert {"roster_enrollment", "roster_person"} <= set(tables)
    assert {m["sourced_id"] for m in groups(store)["c-1"]["members"]} == {"s-1", "s-2", "s-3"}
    if store.engine.dialect.name == "sqlite":  # PostgreSQL's staging keeps its key
        assert "staging_enrollment" in tables
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -db.SQLITE_CACHE_KIB
    tables.clear()
    again = await sync(make_settings(), store, small_roster())
    assert again.status == "succeeded"
    # Nothing to rebuild: the mirror's tables, however large, keep the connection's cache.
    assert not {"roster_enrollment", "roster_person", "roster_class"} & set(tables)


def _fingerprint_updates(conn: Any) -> list[tuple[str, set[Any]]]:
    """Every statement that sets mirror fingerprints from staging as the merge runs (listening
    on the connection): its text and the values bound to it, lists flattened."""
    seen: list[tuple[str, set[Any]]] = []

    def spy(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if statement.lstrip().startswith("UPDATE roster_enrollment AS m SET fp = s.fp"):
            values = parameters.values() if isinstance(parameters, dict) else parameters
            flat = {v for value in values for v in (value if isinstance(value, list) else [value])}
            seen.append((statement, flat))

    event.listen(conn, "before_cursor_execute", spy)
    return seen


def _stage_enrollments(conn: Any, run_id: int, rows: list[tuple[RosterEnrollment, int]]) -> None:
    batch = StagedBatch()
    for record, fp in rows:
        batch.rows["enrollment"].append((*enrollment_tuple(record)[:-1], fp))
    stage(conn, run_id, batch)
    prepare_staging(conn)


@pytest.mark.parametrize("many", [False, True])
def test_only_staged_rows_the_merge_did_not_write_take_their_fingerprints_after_it(
    store: Store, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    """A run that left out known records: a staged row as the mirror holds it, but from a
    record whose bytes changed, takes the record's new fingerprint; the rows the merge wrote
    carry theirs already and are not looked at again. When every staged row was written, no
    fingerprint is refreshed at all. Beyond TARGETED_UPSERT_MAX such rows (``many``: an
    upgraded normalizer), staging is scanned instead of probed by id: the same result."""
    if many:
        monkeypatch.setattr(merging, "TARGETED_UPSERT_MAX", 0)
    same = RosterEnrollment("e-same", "c-1", "p-1", "student")
    changed = RosterEnrollment("e-changed", "c-1", "p-2", "student")
    with store.write() as conn:
        _stage_enrollments(conn, 1, [(same, 11), (changed, 12)])
        merging.merge(conn, "src", 1, {})
        clear_staging(conn, 1)
    with store.write() as conn:
        _stage_enrollments(conn, 2, [(same, 21), (replace(changed, status="tobedeleted"), 22)])
        staged = {"enrollment": {"e-same", "e-changed"}}
        to_write = {"enrollment": {"e-changed"}}
        updates = _fingerprint_updates(conn)
        merging.merge(conn, "src", 2, {}, to_write, to_write, refresh_fp=staged)
        fps: dict[str, int] = dict(
            conn.execute(text("SELECT sourced_id, fp FROM roster_enrollment")).all()
        )
        clear_staging(conn, 2)
    assert fps == {"e-same": 21, "e-changed": 22}
    assert len(updates) == 1
    statement, bound = updates[0]
    assert "e-changed" not in bound
    if many:
        assert "e-same" not in bound  # staging scanned, not probed by these ids
        assert " IN " not in statement and "ANY" not in statement
    else:
        assert "e-same" in bound
    with store.write() as conn:
        _stage_enrollments(conn, 3, [(replace(same, primary=True), 31)])
        updates = _fingerprint_updates(conn)
        written = {"enrollment": {"e-same"}}
        merging.merge(conn, "src", 3, {}, written, written, refresh_fp=written)
        fps = dict(conn.execute(text("SELECT sourced_id, fp FROM roster_enrollment")).all())
    assert fps == {"e-same": 31, "e-changed": 22}
    assert updates == []


def test_a_first_load_is_a_bulk_load_when_it_reaches_the_minimum_and_the_mirrors_size(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge._first_load: a source's first load is a bulk load (indexes rebuilt afterwards)
    when it stages at least BULK_LOAD_MIN_ROWS rows and at least as many as the mirror holds
    (the other sources'); staged rows are counted only that far. Not a first load: neither."""
    monkeypatch.setattr(merging, "BULK_LOAD_MIN_ROWS", 3)
    with store.write() as conn:
        conn.execute(text("CREATE TEMPORARY TABLE fl_m (source VARCHAR(64), sourced_id TEXT)"))
        conn.execute(text("CREATE TEMPORARY TABLE fl_s (run_id INTEGER, sourced_id TEXT)"))

        def staged(n: int) -> tuple[bool, bool]:
            conn.execute(text("DELETE FROM fl_s"))
            for i in range(n):
                conn.execute(text("INSERT INTO fl_s VALUES (7, :i)"), {"i": f"x{i}"})
            conn.execute(text("INSERT INTO fl_s VALUES (8, 'another run')"))
            return merging._first_load(conn, "fl_m", "fl_s", {"src": "a", "run": 7})

        assert [staged(n) for n in (2, 3, 9)] == [(True, False), (True, True), (True, True)]
        for i in range(5):
            conn.execute(text("INSERT INTO fl_m VALUES ('b', :i)"), {"i": f"b{i}"})
        assert [staged(n) for n in (4, 5, 6)] == [(True, False), (True, True), (True, True)]
        conn.execute(text("INSERT INTO fl_m VALUES ('a', 'a0')"))
        assert staged(50) == (False, False)
