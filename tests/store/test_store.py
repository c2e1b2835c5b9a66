"""The store on SQLite and PostgreSQL: migrations, pragmas, staging and statistics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, inspect, select, text

from rostersync.errors import StoreError
from rostersync.source.records import RosterPerson
from rostersync.source.rows import COLUMNS, StagedBatch, person_tuple, sort_batch
from rostersync.store import snapshot
from rostersync.store.db import SQLITE_PAGE_BYTES, Store, in_text, schema_head
from rostersync.store.tables import DIALECT_OF, PERSON_MEMBER_INDEX, metadata
from rostersync.sync import staging as staging_step
from rostersync.sync.merge import (
    STATISTICS_TARGET,
    refresh_directory_statistics,
    refresh_statistics,
)
from rostersync.sync.repeats import Repeats
from rostersync.sync.staging import STAGING, clear_staging, prepare_staging, stage
from tests.directoryrows import add_user

STAGING_TABLES = ("staging_org", "staging_person", "staging_class", "staging_enrollment")


def schema_diff(conn: Connection) -> list[Any]:
    """What the database lacks or has beyond the models, as Alembic compares them; an index
    the models declare for one dialect (``ddl_if``, which Alembic does not read) counts on
    that dialect only."""

    def declared_here(obj: Any, name: str | None, type_: str, reflected: bool, *_: Any) -> bool:
        return reflected or DIALECT_OF.get(obj, conn.dialect.name) == conn.dialect.name

    context = MigrationContext.configure(conn, opts={"include_object": declared_here})
    return list(compare_metadata(context, metadata))


def test_migrations_match_the_models(store: Store) -> None:
    """The Alembic migrations create exactly the tables, columns and indexes the models declare."""
    with store.engine.connect() as conn:
        assert schema_diff(conn) == []
        names = {i["name"] for i in inspect(conn).get_indexes("roster_person")}
    assert (PERSON_MEMBER_INDEX in names) == (store.engine.dialect.name == "sqlite")


def _index_columns(conn: Connection, table: str) -> dict[str | None, list[str | None]]:
    # SQLAlchemy types a reflected index's name and columns as optional (expression indexes)
    return {i["name"]: list(i["column_names"]) for i in inspect(conn).get_indexes(table)}


def test_the_mirror_indexes_lead_with_the_source_on_sqlite_and_end_with_it_on_postgresql(
    store: Store,
) -> None:
    """SQLite's mirror indexes lead with the source; PostgreSQL's end with it (0019)."""
    with store.read() as conn:
        enrollments = _index_columns(conn, "roster_enrollment")
        persons = _index_columns(conn, "roster_person")
    if store.engine.dialect.name == "sqlite":
        assert enrollments["ix_roster_enr_class"] == ["source", "class_id", "role", "user_id"]
        assert enrollments["ix_roster_enrollment_fp"] == ["source", "fp", "sourced_id"]
        assert persons["ix_roster_person_email"] == ["source", "email"]
    else:
        assert enrollments["ix_roster_enr_class"] == ["class_id", "role", "user_id", "source"]
        assert enrollments["ix_roster_enr_user"] == ["user_id", "role", "source"]
        assert enrollments["ix_roster_enrollment_fp"] == ["fp", "sourced_id", "source"]
        assert persons["ix_roster_person_email"] == ["email", "source"]


def _migrate(store: Store, way: str, revision: str) -> None:
    """Alembic's ``upgrade`` or ``downgrade`` of ``store`` to ``revision``, committed."""
    from alembic import command

    with store.engine.connect() as conn:
        getattr(command, way)(store._alembic(conn), revision)
        conn.commit()


def _member_keys(conn: Connection) -> list[tuple[str, list[str], str | None]]:
    return [
        (str(k["referred_table"]), list(k["constrained_columns"]), k["options"].get("ondelete"))
        for k in inspect(conn).get_foreign_keys("group_member")
    ]


def test_group_members_reference_their_group_on_sqlite_alone(store: Store) -> None:
    """SQLite keeps group_member's key to groups (deleted with the group); PostgreSQL has none
    (0020): its trigger per row was half of a first load's member fill."""
    with store.read() as conn:
        keys = _member_keys(conn)
    if store.engine.dialect.name == "sqlite":
        assert keys == [("groups", ["group_id"], "CASCADE")]
    else:
        assert keys == []


@pytest.mark.postgres
def test_upgrade_to_0020_drops_the_member_key_on_postgresql_and_keeps_the_members() -> None:
    """A PostgreSQL database an earlier version set up keeps its groups and members through
    0020, which drops the key; downgrade adds it back (checking the rows); the upgraded
    database matches the models."""
    from tests.conftest import _pg_schema_store

    for store in _pg_schema_store():
        _migrate(store, "upgrade", "0019")
        with store.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO groups (id, source, external_id, name) VALUES (7, 's', 'c-1', 'A')"
                )
            )
            conn.execute(
                text("INSERT INTO group_member (group_id, sourced_id, name) VALUES (7, 'p-1', 'P')")
            )
            assert _member_keys(conn) == [("groups", ["group_id"], "CASCADE")]
        store.upgrade()
        with store.read() as conn:
            assert schema_diff(conn) == []
            assert _member_keys(conn) == []
            members = conn.execute(text("SELECT group_id, sourced_id FROM group_member")).all()
            assert [tuple(m) for m in members] == [(7, "p-1")]
        _migrate(store, "downgrade", "0019")
        with store.read() as conn:
            assert _member_keys(conn) == [("groups", ["group_id"], "CASCADE")]


@pytest.mark.postgres
def test_upgrade_to_0019_rebuilds_postgresql_indexes_with_the_source_last() -> None:
    """A PostgreSQL database an earlier version set up keeps its mirror rows through 0019,
    whose indexes then end with the source, and gets the old order back on downgrade; the
    upgraded database matches the models."""
    from tests.conftest import _pg_schema_store

    for store in _pg_schema_store():
        _migrate(store, "upgrade", "0018")
        with store.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO roster_enrollment (source, sourced_id, class_id, user_id, "
                    'role, status, "primary", row_hash) '
                    "VALUES ('s', 'e-1', 'c-1', 'p-1', 'student', 'active', false, 'h')"
                )
            )
            before = _index_columns(conn, "roster_enrollment")
        assert before["ix_roster_enr_class"] == ["source", "class_id", "role", "user_id"]
        store.upgrade()
        with store.read() as conn:
            assert schema_diff(conn) == []
            after = _index_columns(conn, "roster_enrollment")
            assert conn.execute(text("SELECT sourced_id FROM roster_enrollment")).all() == [
                ("e-1",)
            ]
        assert after["ix_roster_enr_class"] == ["class_id", "role", "user_id", "source"]
        _migrate(store, "downgrade", "0018")
        with store.read() as conn:
            assert _index_columns(conn, "roster_enrollment") == before


def test_empty_database_is_upgraded_on_first_use(tmp_path: Path) -> None:
    """ensure_schema() migrates an empty database to the head revision."""
    s = Store(f"sqlite:///{tmp_path / 'new.db'}")
    assert s.current_revision() is None
    s.ensure_schema()
    assert s.current_revision() == s.head_revision()
    s.dispose()


@pytest.mark.parametrize("way", ["snapshot", "migrations"])
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_first_set_up_cut_off_part_way_leaves_an_empty_database(
    backend: str, way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migrations run in one transaction on SQLite too: a first upgrade that fails in a
    late migration (as a process killed there) leaves no table, and the next command sets
    the database up. Alembic committed each migration on SQLite, so a killed first sync
    left the schema at 0013, which every later command refused (found by the random-kill
    test in tests/recovery). The same for the replay of the schema snapshot, which holds the
    same statements (rostersync.store.snapshot), and for the migrations without one."""
    if way == "migrations":
        monkeypatch.setattr(snapshot, "load", lambda dialect: None)

    class Cut(Exception):
        pass

    # In 0014, the last migration but one: SQLite rebuilds the table (a batch copy).
    marker = "_alembic_tmp_resync_job" if backend == "sqlite" else "SET refresh = true"

    def run(s: Store) -> None:
        armed = [True]

        def cut(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if armed[0] and marker in statement:
                raise Cut(statement[:40])

        event.listen(s.engine, "before_cursor_execute", cut)
        with pytest.raises(Cut):
            s.ensure_schema()
        armed[0] = False
        assert s.current_revision() is None
        with s.engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
        s.ensure_schema()
        assert s.current_revision() == s.head_revision()

    if backend == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'cut.db'}")
        try:
            run(s)
        finally:
            s.dispose()
    else:
        from tests.conftest import _pg_schema_store

        for s in _pg_schema_store():
            run(s)


def test_the_schema_head_is_alembics_without_asking_alembic(tmp_path: Path) -> None:
    """schema_head(), read from the migration files' revision lines, names the head Alembic's
    own script directory finds, and the store reports it."""
    from alembic.script import ScriptDirectory

    s = Store(f"sqlite:///{tmp_path / 'new.db'}")
    assert schema_head() is not None
    assert schema_head() == ScriptDirectory.from_config(s._alembic()).get_current_head()
    assert s.head_revision() == schema_head()
    s.dispose()


def test_a_version_table_with_two_rows_is_left_to_alembic(tmp_path: Path) -> None:
    """The plain read of the current revision takes one row; with several (branched heads),
    Alembic's refusal stands, as before."""
    from alembic.util import CommandError

    s = Store(f"sqlite:///{tmp_path / 'new.db'}")
    s.ensure_schema()
    with s.write() as conn:
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('0001')"))
    with pytest.raises(CommandError, match="more than one head"):
        s.current_revision()
    s.dispose()


def store_at(tmp_path: Path, revision: str) -> Store:
    """A new SQLite database migrated to an older revision, as an earlier version left it."""
    from alembic import command

    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    with store.engine.connect() as conn:
        command.upgrade(store._alembic(conn), revision)
        conn.commit()
    return store


def test_upgrade_keeps_source_state_and_leaves_decided_with_empty(tmp_path: Path) -> None:
    """A database from before 0005 keeps its source_state rows; decided_with starts NULL, so
    each source's next delta run re-decides every teacher once."""
    store = store_at(tmp_path, "0004")
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO source_state (source, last_run_id, last_counts) "
                "VALUES ('mem', 7, '{\"persons\": 3}')"
            )
        )
    assert store.upgrade() == ("0004", store.head_revision())
    with store.read() as conn:
        row = conn.execute(text("SELECT source, last_run_id, decided_with FROM source_state")).one()
    assert tuple(row) == ("mem", 7, None)
    store.dispose()


def test_upgrade_to_0006_rebuilds_the_class_index_with_the_person_and_keeps_the_rows(
    tmp_path: Path,
) -> None:
    """0006 widens ix_roster_enr_class to (source, class_id, role, user_id): the mirror's
    enrollments stay, and a (class, person) lookup is answered by the index alone."""
    from sqlalchemy import inspect

    store = store_at(tmp_path, "0005")
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_enrollment (source, sourced_id, class_id, user_id, role, "
                'status, "primary", row_hash) '
                "VALUES ('mem', 'e-1', 'c-1', 's-1', 'student', 'active', false, 'h')"
            )
        )
    store.upgrade()
    indexes = {
        i["name"]: i["column_names"] for i in inspect(store.engine).get_indexes("roster_enrollment")
    }
    assert indexes["ix_roster_enr_class"] == ["source", "class_id", "role", "user_id"]
    with store.read() as conn:
        plan = " ".join(
            str(r[-1])
            for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT status FROM roster_enrollment WHERE source = 'mem' "
                "AND class_id = 'c-1' AND role = 'student' AND user_id = 's-1'"
            )
        )
        rows = conn.execute(text("SELECT sourced_id FROM roster_enrollment")).all()
    assert "ix_roster_enr_class (source=? AND class_id=? AND role=? AND user_id=?)" in plan
    assert [r[0] for r in rows] == ["e-1"]
    store.dispose()


def test_postgresql_leaves_room_on_the_pages_of_tables_updated_in_place(pg_store: Store) -> None:
    """0007: the tables delta runs update in place fill new pages to 90% on PostgreSQL (so an
    update can stay on its page and skip the indexes); the others keep the default."""
    with pg_store.read() as conn:
        options: dict[str, str | None] = dict(
            conn.execute(
                text(
                    "SELECT relname, array_to_string(reloptions, ',') FROM pg_class "
                    "WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'"
                )
            ).all()
        )
    for table in ("roster_person", "roster_class", "roster_enrollment", "groups", "group_member"):
        assert options[table] == "fillfactor=90", table
    assert options["user"] is None and options["resync_job"] is None


def test_postgresql_sessions_compile_no_query(pg_store: Store) -> None:
    """Every PostgreSQL connection runs without JIT compilation (the server's default is on),
    those the pool opens after its first included."""
    with pg_store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW jit").scalar() == "off"
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.invalidate()  # as a lost connection is: the pool opens another
    with pg_store.read() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        assert conn.exec_driver_sql("SHOW jit").scalar() == "off"


def test_postgresql_staging_tables_are_unlogged(pg_store: Store) -> None:
    """0008: staging skips PostgreSQL's write-ahead log; the mirror and directory do not."""
    with pg_store.read() as conn:
        persistence: dict[str, str] = dict(
            conn.execute(
                text(
                    "SELECT relname, relpersistence FROM pg_class "
                    "WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'"
                )
            ).all()
        )
    assert {t: persistence[t] for t in STAGING_TABLES} == dict.fromkeys(STAGING_TABLES, "u")
    assert {t for t, p in persistence.items() if p == "u"} == set(STAGING_TABLES)


def test_unknown_schema_is_refused(tmp_path: Path) -> None:
    """A database with tables but no migration history is not touched; the error says what to do."""
    s = Store(f"sqlite:///{tmp_path / 'other.db'}")
    with s.write() as conn:
        conn.execute(text("CREATE TABLE something (id integer)"))
    with pytest.raises(StoreError, match="rostersync db upgrade"):
        s.ensure_schema()
    s.dispose()


def test_sqlite_uses_wal_and_a_busy_timeout(sqlite_store: Store) -> None:
    """SQLite connections run in WAL mode with a busy timeout, so readers never block the writer."""
    with sqlite_store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        # up to 128 MiB of page cache (negative: KiB), not SQLite's 2 MiB default
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -128 * 1024


def test_a_store_opening_a_database_another_process_is_setting_up_waits_for_it(
    tmp_path: Path,
) -> None:
    """Turning a database to WAL mode takes a lock that SQLite refuses at once, busy timeout
    or not, while another connection writes to it in its first journal mode (a process
    setting the same new database up at the same moment): the store tries again until the
    lock is free, where one of two processes started together on a new database failed with
    "database is locked" (about one start in a hundred, seen in the snapshot tests)."""
    import sqlite3
    import threading

    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("DROP TABLE t")  # empty again once it commits

    def finish() -> None:
        other.execute("COMMIT")

    released = threading.Timer(0.3, finish)
    released.start()
    store = Store(f"sqlite:///{path}")
    try:
        store.ensure_schema()
        assert store.current_revision() == schema_head()
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        released.join()
        other.close()
        store.dispose()


def test_a_new_sqlite_database_has_larger_pages_and_an_old_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    """A database rostersync creates gets SQLITE_PAGE_BYTES pages; one created before (SQLite's
    4 KiB) keeps its size, and works as before: the size of a file's pages is fixed."""
    import sqlite3

    new = Store(f"sqlite:///{tmp_path / 'new.db'}")
    new.ensure_schema()
    with new.read() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == SQLITE_PAGE_BYTES == 16384
    new.dispose()
    old_path = tmp_path / "old.db"
    raw = sqlite3.connect(old_path)
    raw.execute("PRAGMA page_size=4096")
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("CREATE TABLE t (x)")  # the file now has its pages
    raw.close()
    old = Store(f"sqlite:///{old_path}")
    old.upgrade()
    add_user(old, "ann@example.org")
    with old.read() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 4096
        assert conn.exec_driver_sql('SELECT email FROM "user"').scalars().all() == [
            "ann@example.org"
        ]
    old.dispose()


#: A row a page (the blob nearly fills one), so the counts below are pages of log.
PAGE = SQLITE_PAGE_BYTES
BALLAST = (  # about 2,000 pages of log: more than SQLite's checkpoint threshold of 1,000
    f"INSERT INTO ballast SELECT randomblob({PAGE - 96}) FROM "
    "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
    "SELECT i FROM n)"
)


def ballast_store(path: Path) -> tuple[Store, Any]:
    """A SQLite store with an empty ``ballast`` table, and its checkpointer."""
    store = Store(f"sqlite:///{path}")
    store.ensure_schema()
    checkpointer = store._checkpointer
    assert checkpointer is not None
    with store.write() as conn:
        conn.exec_driver_sql("CREATE TABLE ballast (b BLOB)")
    return store, checkpointer


def wait_for_checkpoint(checkpointer: Any, seconds: float = 10) -> None:
    """Until the checkpointer thread has made its first checkpoint (or the time is up)."""
    import time

    deadline = time.monotonic() + seconds
    while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_bulk_commit_leaves_the_wal_checkpoint_to_the_store_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk commit returns once its pages are in the write-ahead log, and the store's
    checkpointer thread copies them into the database file afterwards; other commits keep
    SQLite's own checkpoint; the thread stops with the store."""
    path = tmp_path / "wal.db"
    store, checkpointer = ballast_store(path)
    pokes: list[int] = []
    monkeypatch.setattr(checkpointer, "poke", lambda: pokes.append(1))
    size = path.stat().st_size
    with store.write(bulk=True) as conn:
        conn.exec_driver_sql(BALLAST)
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    assert pokes == [1]
    assert path.stat().st_size < size + 250 * PAGE  # the pages are in the log only
    with store.read() as conn:  # the connection is back to SQLite's threshold
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    with store.write() as conn:  # a plain commit checkpoints itself: everything is copied
        conn.exec_driver_sql("INSERT INTO ballast VALUES (x'00')")
    assert pokes == [1]
    assert path.stat().st_size > size + 1900 * PAGE
    monkeypatch.undo()
    with store.write(bulk=True) as conn:
        conn.exec_driver_sql(BALLAST)
    wait_for_checkpoint(checkpointer)
    assert checkpointer.checkpoints == 1
    assert path.stat().st_size > size + 3900 * PAGE
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive()
    store.dispose()
    assert not thread.is_alive()
    with store.read() as conn:  # still usable; all rows were kept
        assert conn.exec_driver_sql("SELECT count(*) FROM ballast").scalar() == 4001
    store.dispose()


def test_after_a_bulk_commit_the_next_writers_start_the_log_over(tmp_path: Path) -> None:
    """Writers that follow each other closely (a drain's batches) still start the log over
    once the checkpointer has copied a bulk commit: the commits after it copy what came
    since, as SQLite does, so the log does not grow through them."""
    import sqlite3

    path = tmp_path / "restart.db"
    store, checkpointer = ballast_store(path)
    with store.write(bulk=True) as conn:
        conn.exec_driver_sql(BALLAST)
    wait_for_checkpoint(checkpointer)
    assert checkpointer.frames >= 2000
    for _ in range(3):  # back to back, each larger than the threshold
        with store.write() as conn:
            conn.exec_driver_sql(BALLAST.replace("< 2000", "< 1200"))
    raw = sqlite3.connect(path)
    try:
        _busy, frames, _done = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        raw.close()
    assert frames < 1500  # the last commit's pages at most, not the 5,600 written
    store.dispose()


def test_checkpointer_is_only_for_sqlite_files(tmp_path: Path) -> None:
    """In-memory SQLite has no log to copy; PostgreSQL manages its own."""
    assert Store("sqlite:///:memory:")._checkpointer is None
    assert Store("postgresql+psycopg://u@127.0.0.1/db")._checkpointer is None
    assert Store(f"sqlite:///{tmp_path / 'f.db'}")._checkpointer is not None


def test_write_rolls_back_on_error(store: Store) -> None:
    """An exception inside a write transaction leaves nothing behind."""
    with pytest.raises(RuntimeError), store.write() as conn:
        conn.execute(
            text(
                'INSERT INTO "user" (email, display_name, status, archived_by_sync, delegated) '
                "VALUES ('x@example.org', 'X', 'active', false, false)"
            )
        )
        raise RuntimeError("boom")
    with store.read() as conn:
        assert conn.execute(text('SELECT count(*) FROM "user"')).scalar_one() == 0


def test_staging_keeps_the_last_version_of_a_repeated_record(store: Store) -> None:
    """A sourcedId sent twice in one batch, or again in a later batch, is staged once, as its
    last version, by the time the apply reads staging (SQLite appends and prepare_staging
    keeps the last row; PostgreSQL COPYs, through a temporary table and an upsert when an
    earlier batch staged one of the ids)."""
    first, second, third = (
        RosterPerson("p-1", "student", given_name=name, email=f"{name}@example.org")
        for name in ("Ann", "Bea", "Cy")
    )
    other = RosterPerson("p-2", "teacher", given_name="Dee")
    found: list[Repeats] = []
    with store.write() as conn:
        found.append(stage(conn, 7, sort_batch([first, other, second, other])))
    with store.write() as conn:
        found.append(stage(conn, 7, sort_batch([third])))
        found.append(stage(conn, 8, sort_batch([first])))  # another run's rows are its own
    with store.write() as conn:
        found.append(prepare_staging(conn, 7))
    # The ids repeated, found where each store settles repeats: p-1 in three versions, p-2
    # twice as it was: three copies in all (p-1's second and third, p-2's second).
    ids, differing = {"person": {"p-1", "p-2"}}, {"person": {"p-1"}}
    if store.engine.dialect.name == "postgresql":
        both = Repeats(ids, differing, {"person": 2})
        again = Repeats({"person": {"p-1"}}, {"person": {"p-1"}}, {"person": 1})
        assert found == [both, again, Repeats(), Repeats()]
    else:
        assert found == [Repeats(), Repeats(), Repeats(), Repeats(ids, differing, {"person": 3})]
    with store.read() as conn:
        rows = conn.execute(
            text("SELECT run_id, sourced_id, given_name, email FROM staging_person ORDER BY 1, 2")
        ).all()
    assert [tuple(r) for r in rows] == [
        (7, "p-1", "Cy", "Cy@example.org"),
        (7, "p-2", "Dee", None),
        (8, "p-1", "Ann", "Ann@example.org"),
    ]


def test_sqlite_stages_a_batch_in_statements_of_many_rows_each(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: one INSERT for many rows, not one per row (the driver gives up the
    interpreter lock for each); a batch larger than a statement holds goes in several, its
    rows in order, so a repeated id still keeps its last version."""
    width = len(COLUMNS["person"])
    monkeypatch.setattr(staging_step, "SQLITE_MAX_VALUES", 5 * width)
    people = [RosterPerson(f"p-{i}", "student", given_name=f"N{i}") for i in range(8)]
    again = replace(people[1], given_name="Last")
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "staging_person" in statement:
            statements.append(statement)

    event.listen(sqlite_store.engine, "before_cursor_execute", seen)
    try:
        with sqlite_store.write() as conn:
            stage(conn, 7, sort_batch([*people, again]))
    finally:
        event.remove(sqlite_store.engine, "before_cursor_execute", seen)
    # 9 rows: the largest power of two 5 rows allow, 4, twice, then 1 (a statement text
    # for each size, not one per batch size, for the driver's statement cache)
    assert [s.count("?") // width for s in statements] == [4, 4, 1]
    with sqlite_store.write() as conn:
        prepare_staging(conn)
    with sqlite_store.read() as conn:
        rows: dict[str, str] = dict(
            conn.execute(text("SELECT sourced_id, given_name FROM staging_person")).all()
        )
    assert rows == {p.sourced_id: p.given_name for p in people} | {"p-1": "Last"}


def _sqlite_indexes(store: Store, table: str) -> list[str]:
    with store.read() as conn:
        return [
            row[0]
            for row in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = :t"),
                {"t": table},
            )
        ]


ANN = RosterPerson("p-1", "student", given_name="Ann")


@pytest.fixture
def staged_twice(tmp_path: Path) -> Iterator[Store]:
    """A SQLite store whose run 7 staged person p-1 twice (Ann, then Bea) in one batch."""
    store = Store(f"sqlite:///{tmp_path / 'rs.db'}")
    store.ensure_schema()
    with store.write() as conn:
        stage(conn, 7, sort_batch([ANN, replace(ANN, given_name="Bea")]))
    yield store
    store.dispose()


def test_sqlite_staging_appends_during_the_fetch_and_the_apply_builds_its_key(
    staged_twice: Store,
) -> None:
    """SQLite staging has no key while a run fetches (GUIDs in no order made every keyed
    insert a random B-tree write); prepare_staging builds the unique key index, a later
    batch then replaces the row it repeats, and clearing a run's rows drops the index, also
    when another run's rows stay."""
    store = staged_twice
    assert _sqlite_indexes(store, "staging_person") == []
    names = "SELECT given_name FROM staging_person WHERE run_id = 7 ORDER BY rowid"
    with store.read() as conn:
        assert conn.execute(text(names)).scalars().all() == ["Ann", "Bea"]  # appended
    with store.write() as conn:
        prepare_staging(conn)
        prepare_staging(conn)  # a second apply of the same rows (approval) is a no-op
    assert _sqlite_indexes(store, "staging_person") == ["ux_staging_person_key"]
    with store.write() as conn:
        stage(conn, 7, sort_batch([replace(ANN, given_name="Cy")]))
    with store.read() as conn:
        assert conn.execute(text(names)).scalars().all() == ["Cy"]
    with store.write() as conn:
        stage(conn, 8, sort_batch([ANN]))  # a held run's rows, say
        prepare_staging(conn)
        clear_staging(conn, 7)
    assert _sqlite_indexes(store, "staging_person") == []  # dropped, though run 8's rows stay
    with store.read() as conn:
        assert conn.execute(text("SELECT run_id FROM staging_person")).scalars().all() == [8]


def test_an_apply_rolled_back_leaves_staging_as_the_fetch_wrote_it(staged_twice: Store) -> None:
    """The key index is built inside the apply's transaction: an apply that rolls back (a
    held run) leaves staging as the fetch wrote it, duplicates included, for the next one."""
    with pytest.raises(RuntimeError), staged_twice.write() as conn:
        prepare_staging(conn)
        raise RuntimeError("held")
    assert _sqlite_indexes(staged_twice, "staging_person") == []
    with staged_twice.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one() == 2


def _migrate_and_read_staging(store: Store, revision: str) -> tuple[list[Any], list[Any]]:
    """Up- or downgrade ``store`` to ``revision``; staging_enrollment's columns and rows."""
    from alembic import command

    with store.engine.connect() as conn:
        current = store.current_revision()
        move = command.upgrade if current is None or revision > current else command.downgrade
        move(store._alembic(conn), revision)
        conn.commit()
    with store.read() as conn:
        info = conn.execute(text("PRAGMA table_info(staging_enrollment)")).all()
        rows = conn.execute(text("SELECT run_id, sourced_id, class_id FROM staging_enrollment"))
        return list(info), [tuple(r) for r in rows]


def test_upgrade_to_0009_keeps_staged_rows_without_their_key(tmp_path: Path) -> None:
    """A held run's staged rows survive the rebuild of the SQLite staging tables; the tables
    keep every column and lose only the primary key (and get it back on downgrade)."""
    store = store_at(tmp_path, "0008")
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO staging_enrollment (run_id, sourced_id, class_id, user_id, role, "
                'status, "primary", row_hash) '
                "VALUES (3, 'e-1', 'c-1', 'p-1', 'student', 'active', 0, 'h')"
            )
        )
    info, staged = _migrate_and_read_staging(store, "0009")
    assert staged == [(3, "e-1", "c-1")]
    # every column of the time (0016 added fp)
    assert {row[1] for row in info} == {c.name for c in STAGING["enrollment"].columns} - {"fp"}
    assert [row[1] for row in info if row[5]] == []  # no primary key column
    assert {row[1] for row in info if row[3]} >= {"run_id", "sourced_id"}  # still NOT NULL
    with store.write() as conn:  # a repeat appended after the upgrade: the later row wins
        conn.execute(
            text(
                "INSERT INTO staging_enrollment (run_id, sourced_id, class_id, user_id, role, "
                'status, "primary", row_hash) '
                "VALUES (3, 'e-1', 'c-2', 'p-1', 'student', 'active', 0, 'h')"
            )
        )
    info, staged = _migrate_and_read_staging(store, "0008")
    assert staged == [(3, "e-1", "c-2")]
    assert sorted(row[1] for row in info if row[5]) == ["run_id", "sourced_id"]
    store.dispose()


def test_postgresql_stages_by_copy_alone_unless_an_id_was_staged_before(pg_store: Store) -> None:
    """New ids go straight in by COPY (no upsert statement); a batch repeating an id of an
    earlier batch of the same transaction is undone to its savepoint and upserted, keeping
    the earlier batch's rows and the later version. Other COPY errors still fail the write."""
    from sqlalchemy import event

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    people = [RosterPerson(f"p-{i}", "student", given_name="Ann") for i in range(3)]
    with pg_store.write() as conn:
        event.listen(conn, "before_cursor_execute", seen)
        stage(conn, 7, sort_batch(people[:2]))
        direct = [q for q in statements if "staging_person" in q]
        stage(conn, 7, sort_batch([replace(people[1], given_name="Bea"), people[2]]))
        event.remove(conn, "before_cursor_execute", seen)
    assert not any(q.startswith("INSERT") for q in direct)
    assert any(q.startswith("INSERT INTO staging_person") for q in statements)
    with pg_store.read() as conn:
        rows = conn.execute(
            text("SELECT sourced_id, given_name FROM staging_person WHERE run_id = 7 ORDER BY 1")
        ).all()
    assert [tuple(r) for r in rows] == [("p-0", "Ann"), ("p-1", "Bea"), ("p-2", "Ann")]
    # Rows are checked against the column sizes as they are built (rows.keep_fitting); one
    # that skipped the check is still refused by the database, failing the write.
    too_long = person_tuple(RosterPerson("p-9", "x" * 100, given_name="Ann"))  # role VARCHAR(40)
    with pytest.raises(Exception, match="too long"), pg_store.write() as conn:
        stage(
            conn,
            7,
            StagedBatch(rows={"org": [], "person": [too_long], "class": [], "enrollment": []}),
        )


def test_clearing_staging_keeps_other_runs_rows(store: Store) -> None:
    """A run clears only its own staged rows, whether or not another run has rows staged
    (SQLite empties a table outright when only this run's rows are in it), those of an
    earlier run as well as a later one's."""
    people = [RosterPerson(f"p-{i}", "student", given_name="Ann") for i in range(3)]
    with store.write() as conn:
        stage(conn, 6, sort_batch(people[1:2]))
        stage(conn, 7, sort_batch(people))
        stage(conn, 8, sort_batch(people[:1]))
    count = "SELECT run_id, count(*) FROM staging_person GROUP BY run_id ORDER BY run_id"
    with store.write() as conn:
        prepare_staging(conn)  # as an apply does: the key index the check goes through
        clear_staging(conn, 7)
    with store.read() as conn:
        assert [tuple(r) for r in conn.execute(text(count))] == [(6, 1), (8, 1)]
    with store.write() as conn:
        clear_staging(conn, 8)
    with store.read() as conn:
        assert [tuple(r) for r in conn.execute(text(count))] == [(6, 1)]
    with store.write() as conn:
        clear_staging(conn, 6)
        stage(conn, 9, sort_batch(people))
    with store.read() as conn:
        assert [tuple(r) for r in conn.execute(text(count))] == [(9, 3)]


def _staging_pages(conn: Any) -> int:
    return int(
        conn.execute(
            text(
                "SELECT sum(pg_relation_size(c.oid)) FROM pg_class c "
                "WHERE c.relname LIKE 'staging_%' AND c.relkind = 'r' "
                "AND c.relnamespace = CAST(current_schema() AS regnamespace)"
            )
        ).scalar_one()
        // 8192
    )


def test_postgresql_truncates_staging_when_only_this_run_is_staged(pg_store: Store) -> None:
    """A run whose rows are all that staging holds leaves no dead rows behind (TRUNCATE, so
    the tables take no pages), and the truncation is part of the run's transaction; with
    another run's rows there, only this run's rows go."""
    people = [RosterPerson(f"p-{i}", "student", given_name="Ann") for i in range(300)]
    with pg_store.write() as conn:
        stage(conn, 7, sort_batch(people))
    with pytest.raises(RuntimeError), pg_store.write() as conn:
        clear_staging(conn, 7)
        assert _staging_pages(conn) == 0
        raise RuntimeError("the apply failed after clearing")
    with pg_store.write() as conn:
        assert conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one() == 300
        stage(conn, 8, sort_batch(people[:1]))
    with pg_store.write() as conn:
        clear_staging(conn, 7)
    with pg_store.read() as conn:
        rows = conn.execute(text("SELECT run_id, count(*) FROM staging_person GROUP BY 1"))
        assert [tuple(r) for r in rows] == [(8, 1)]
        assert _staging_pages(conn) > 0  # deleted, not truncated
    with pg_store.write() as conn:
        clear_staging(conn, 8)
    with pg_store.read() as conn:
        assert _staging_pages(conn) == 0


def test_postgresql_clearing_staging_does_not_wait_for_another_reader(pg_store: Store) -> None:
    """Someone else using staging (another source's fetch) keeps the tables from being
    truncated: the run deletes its rows instead, at once, rather than waiting for them."""
    people = [RosterPerson(f"p-{i}", "student", given_name="Ann") for i in range(3)]
    with pg_store.write() as conn:
        stage(conn, 7, sort_batch(people))
    with pg_store.engine.connect() as other, other.begin():
        other.execute(text("SELECT count(*) FROM staging_org")).scalar_one()  # holds a lock
        with pg_store.write() as conn:
            # A regression that waited for the lock fails here instead of hanging.
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            clear_staging(conn, 7)
            assert conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one() == 0
            assert _staging_pages(conn) > 0
    with pg_store.write() as conn:
        clear_staging(conn, 7)  # nobody else now: truncated
        assert _staging_pages(conn) == 0


def test_staged_dates_keep_their_instant(store: Store) -> None:
    """Rows carry dateLastModified as UTC text (formatted by the decode workers); both
    databases store the instant it names, whatever offset the source gave."""
    when = datetime(2026, 3, 1, 8, 30, 15, 250, tzinfo=timezone(timedelta(hours=-5)))
    dated = RosterPerson("p-1", "student", given_name="Ann", date_last_modified=when)
    undated = RosterPerson("p-2", "student", given_name="Bea")
    assert person_tuple(dated)[-3] == "2026-03-01 13:30:15.000250"
    in_utc = RosterPerson("p-1", "student", date_last_modified=when.astimezone(UTC))
    assert person_tuple(in_utc)[-3] == "2026-03-01 13:30:15.000250"
    with store.write() as conn:
        if store.is_postgres:  # a server whose zone is not UTC must not shift the text
            conn.exec_driver_sql("SET LOCAL TimeZone = 'Asia/Tokyo'")
        stage(conn, 7, sort_batch([dated, undated]))
    table = STAGING["person"]
    with store.read() as conn:
        got = dict(conn.execute(select(table.c.sourced_id, table.c.date_last_modified)).all())
    assert got["p-2"] is None
    stored = got["p-1"]
    assert (stored if stored.tzinfo else stored.replace(tzinfo=UTC)) == when


def test_mirror_statistics_are_refreshed_after_large_changes_only(store: Store) -> None:
    """PostgreSQL re-samples a mirror table after a merge that changed it by autovacuum's
    measure (50 rows plus a tenth of it), not after every small delta; SQLite never does."""
    people = [{"sid": f"p-{n}", "yes": True} for n in range(200)]
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_person (source, sourced_id, role, given_name, family_name,"
                " enabled, org_ids, status, row_hash) VALUES ('mem', :sid, 'student', 'A', 'B',"
                " :yes, '', 'active', 'h')"
            ),
            people,
        )
        first = refresh_statistics(conn, {"person": 200, "class": 0})
    if not store.is_postgres:
        assert first == []
        return
    assert first == ["roster_person"]  # never analysed: any real change counts
    with store.write() as conn:
        assert refresh_statistics(conn, {"person": 60}) == []  # below 50 + 200 / 10
        assert refresh_statistics(conn, {"person": 70}) == ["roster_person"]


@pytest.mark.postgres
def test_statistics_are_sampled_at_the_smaller_target_for_that_transaction_only(
    pg_store: Store,
) -> None:
    """The ANALYZE after a load samples at STATISTICS_TARGET (a histogram of at most that
    many buckets over 200 distinct ids, where the server's default gives 100), and the
    setting ends with the transaction: later work on the connection samples as configured."""
    people = [{"sid": f"p-{n:03}"} for n in range(200)]
    with pg_store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_person (source, sourced_id, role, given_name, family_name,"
                " enabled, org_ids, status, row_hash) VALUES ('mem', :sid, 'student', 'A', 'B',"
                " true, '', 'active', 'h')"
            ),
            people,
        )
        assert refresh_statistics(conn, {"person": 200}) == ["roster_person"]
    bounds = (
        "SELECT cardinality(histogram_bounds) FROM pg_stats "
        "WHERE schemaname = current_schema() AND tablename = 'roster_person' "
        "AND attname = 'sourced_id'"
    )
    with pg_store.read() as conn:
        assert 2 <= conn.execute(text(bounds)).scalar_one() <= STATISTICS_TARGET + 1
        default = conn.execute(text("SHOW default_statistics_target")).scalar_one()
    assert int(default) > STATISTICS_TARGET


def test_directory_statistics_are_refreshed_on_postgresql(store: Store) -> None:
    """After a bulk load the planner sees the directory tables as they are, not as empty."""
    add_user(store, "a@example.org")
    with store.write() as conn:
        refresh_directory_statistics(conn)
        refresh_directory_statistics(conn, members=False)
    if not store.is_postgres:
        # SQLite plans these queries without statistics: the call must not start keeping any.
        with store.read() as conn:
            stat = "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
            assert conn.execute(text(stat)).scalar_one() == 0
        return
    with store.read() as conn:
        rows: dict[str, float] = dict(
            conn.execute(
                text(
                    "SELECT relname, reltuples FROM pg_class WHERE relname IN "
                    "('user', 'user_identity', 'groups', 'group_owner', 'group_member') "
                    "AND relnamespace = current_schema()::regnamespace"
                )
            ).all()
        )
    assert rows["user"] == 1  # counted by the ANALYZE, not the -1 of a never-analyzed table
    assert set(rows) == {"user", "user_identity", "groups", "group_owner", "group_member"}


def test_a_store_that_must_exist_never_creates_its_file(tmp_path: Path) -> None:
    """create=False: a missing file is a StoreError naming it, and SQLite is told not to create it
    either (a file removed after the check stays removed)."""
    missing = tmp_path / "nodir" / "rs.db"
    with pytest.raises(StoreError, match=f"database {missing} does not exist"):
        Store(f"sqlite:///{missing}", create=False)
    assert not missing.parent.exists()
    existing = tmp_path / "rs.db"
    created = Store(f"sqlite:///{existing}")  # the default creates it on first use
    created.current_revision()
    created.dispose()
    assert existing.exists()
    store = Store(f"sqlite:///{existing}", create=False)
    existing.unlink()
    with pytest.raises(StoreError, match="cannot open database"):
        store.current_revision()
    assert not existing.exists()
    store.dispose()


def test_a_store_that_must_exist_refuses_to_migrate_an_empty_database(tmp_path: Path) -> None:
    """ensure_schema(auto_upgrade=False) on a database without tables says so and creates none."""
    db = tmp_path / "rs.db"
    db.touch()
    store = Store(f"sqlite:///{db}", create=False)
    with pytest.raises(StoreError, match="has no rostersync tables yet"):
        store.ensure_schema(auto_upgrade=False)
    assert store.current_revision() is None
    store.dispose()


def test_upgrade_to_0010_gives_every_person_its_one_role(tmp_path: Path) -> None:
    """Persons mirrored before 0010 (and a held run's staged ones) get ``roles`` = their role,
    lower-cased, so the teacher test finds them; a person with one role keeps its row hash."""
    store = store_at(tmp_path, "0009")
    ann = RosterPerson("p-1", "Teacher", "Ann", "Lee", "ann@example.org")
    with store.write() as conn:
        for table, key in (("roster_person", "source"), ("staging_person", "run_id")):
            conn.execute(
                text(
                    f"INSERT INTO {table} ({key}, sourced_id, role, given_name, family_name, "
                    "email, enabled, org_ids, status, row_hash) VALUES "
                    "(:k, 'p-1', 'Teacher', 'Ann', 'Lee', 'ann@example.org', 1, '', 'active', :h)"
                ),
                {"k": "mem" if key == "source" else 3, "h": ann.content_hash()},
            )
    store.upgrade()
    with store.read() as conn:
        for table in ("roster_person", "staging_person"):
            assert conn.execute(text(f"SELECT roles FROM {table}")).scalar_one() == "teacher"
    assert person_tuple(ann)[2] == "teacher"
    assert person_tuple(replace(ann, other_roles=("Aide",)))[2] == "aide,teacher"
    assert replace(ann, other_roles=("Aide",)).content_hash() != ann.content_hash()
    store.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def unmigrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store on each backend with no schema yet (migrate it with :func:`migrate`)."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'old.db'}")
        yield s
        s.dispose()
    else:
        from tests.conftest import _pg_schema_store

        yield from _pg_schema_store()


def migrate(store: Store, revision: str) -> None:
    from alembic import command

    with store.engine.connect() as conn:
        command.upgrade(store._alembic(conn), revision)
        conn.commit()


def test_upgrade_to_0017_stores_each_persons_member_values(unmigrated: Store) -> None:
    """0017 adds the member email and name as columns the database computes: the persons
    mirrored before it get them, with the expressions the resyncs used (a Unicode lower-case on
    SQLite too, spaces trimmed, an empty email NULL), and a later write recomputes them."""
    store = unmigrated
    migrate(store, "0016")
    people = [
        ("p-1", "Ann", "Lee", "  \u00c9L\u00c8VE@X.ORG "),
        ("p-2", "Bo", "", None),
        ("p-3", "", "", "   "),
    ]
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_person (source, sourced_id, role, given_name, family_name, "
                "email, enabled, org_ids, status, row_hash) "
                "VALUES ('mem', :sid, 'student', :given, :family, :email, true, '', 'active', 'h')"
            ),
            [{"sid": s, "given": g, "family": f, "email": e} for s, g, f, e in people],
        )
    store.upgrade()
    read = "SELECT sourced_id, member_email, member_name FROM roster_person ORDER BY sourced_id"
    with store.read() as conn:
        assert [tuple(r) for r in conn.execute(text(read))] == [
            ("p-1", "\u00e9l\u00e8ve@x.org", "Ann Lee"),
            ("p-2", None, "Bo"),
            ("p-3", None, ""),
        ]
    with store.write() as conn:
        conn.execute(
            text(
                "UPDATE roster_person SET email = 'Bo@X.org', family_name = 'Ray' "
                "WHERE sourced_id = 'p-2'"
            )
        )
    with store.read() as conn:
        assert tuple(conn.execute(text(read)).all()[1]) == ("p-2", "bo@x.org", "Bo Ray")
        with store.engine.connect() as raw:
            diff = schema_diff(raw)
    assert diff == []  # the rebuilt table kept its key and indexes


def test_upgrade_to_0018_indexes_each_persons_member_values_on_sqlite(unmigrated: Store) -> None:
    """0018 adds the person member index on SQLite, over the persons mirrored before it, and
    nothing on PostgreSQL; the member reads then find persons through it."""
    store = unmigrated
    migrate(store, "0017")
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_person (source, sourced_id, role, given_name, family_name, "
                "email, enabled, org_ids, status, row_hash) VALUES ('mem', 'p-1', 'student', "
                "'Ann', 'Lee', ' Ann@X.org', true, '', 'active', 'h')"
            )
        )
    store.upgrade()
    sqlite = store.engine.dialect.name == "sqlite"
    with store.read() as conn:
        names = {i["name"] for i in inspect(conn).get_indexes("roster_person")}
        assert (PERSON_MEMBER_INDEX in names) == sqlite
        assert schema_diff(conn) == []
        if sqlite:
            found = conn.execute(
                text(
                    f"SELECT sourced_id, member_email, member_name FROM roster_person "
                    f"INDEXED BY {PERSON_MEMBER_INDEX} WHERE source = 'mem' AND sourced_id = 'p-1'"
                )
            ).all()
            assert [tuple(r) for r in found] == [("p-1", "ann@x.org", "Ann Lee")]


def test_sqlite_member_reads_find_persons_through_the_member_index(sqlite_store: Store) -> None:
    """Every read of members (a new group's fill, an existing group's compare, a marked
    member, "has this class a student") takes a person from the member index: SQLite's
    planner, without statistics, took the key's index and then the wide row."""
    from rostersync.resync import members
    from rostersync.sync.mirror import populated

    with sqlite_store.write() as conn:
        conn.execute(
            text(
                "CREATE TEMP TABLE rs_member_marks "
                "(gid INTEGER, src VARCHAR(64), cls VARCHAR(256), person VARCHAR(256))"
            )
        )
        reads = [
            members._desired_members("sqlite").replace(":ids", "(1, 2)"),
            members._MARKED_MEMBERS,
            f"SELECT c.sourced_id FROM roster_class c WHERE {populated(conn)}",
        ]
        for sql in reads:
            plan = " / ".join(
                str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
            )
            assert f"INDEX {PERSON_MEMBER_INDEX} (source=? AND sourced_id=?" in plan, plan


class _DriverError(Exception):
    """A driver exception with the attributes sqlite3 and psycopg errors carry."""

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        for name, value in attrs.items():
            setattr(self, name, value)


@pytest.mark.parametrize(
    ("orig", "why"),
    [
        (_DriverError("database or disk is full", sqlite_errorcode=13), "the disk is full"),
        (_DriverError("disk I/O error", sqlite_errorcode=10 | (3 << 8)), "a disk I/O error"),
        (_DriverError("readonly", sqlite_errorcode=8), "the database file is read-only"),
        (_DriverError("malformed", sqlite_errorcode=11), "the database file is damaged"),
        (_DriverError("database is locked", sqlite_errorcode=5), None),  # waited for, retried
        (_DriverError("UNIQUE constraint failed", sqlite_errorcode=19), None),  # a bug
        (_DriverError("could not extend file", sqlstate="53100"), "the server ran out"),
        (_DriverError("terminating connection", sqlstate="57P01"), "the server shut down"),
        (_DriverError("server closed the connection", sqlstate="08006"), "the connection"),
        (_DriverError("duplicate key", sqlstate="23505"), None),
        (_DriverError("no schema has been selected", sqlstate="3F000"), "no schema to create"),
        (_DriverError("permission denied for schema", sqlstate="42501"), "the database user"),
        (_DriverError("no attributes"), None),
    ],
)
def test_unusable_names_what_the_operator_must_fix_and_nothing_else(
    orig: Exception, why: str | None
) -> None:
    from sqlalchemy.exc import OperationalError

    from rostersync.store.db import unusable

    found = unusable(OperationalError("SELECT 1", {}, orig))
    assert found == why if why is None else (found or "").startswith(why)


def test_a_failed_statement_names_no_roster_values(store: Store) -> None:
    """A statement's parameters stay out of its error's text, which goes into a run's error,
    the log and trace files: roster emails and names are not theirs to show."""
    with pytest.raises(Exception) as failed, store.write() as conn:
        conn.execute(
            text("INSERT INTO no_such_table (email, name) VALUES (:e, :n)"),
            {"e": "ada@example.org", "n": "Ada Lovelace-Byron"},
        )
    assert "no_such_table" in str(failed.value)
    assert "ada@example.org" not in str(failed.value)
    assert "Lovelace-Byron" not in str(failed.value)
    assert "hidden" in str(failed.value)  # SQLAlchemy says the parameters were left out


@pytest.mark.postgres
def test_a_lost_postgresql_connection_is_a_store_error_naming_the_server(
    pg_store: Store,
) -> None:
    """A server that drops the connection mid-transaction (a restart, an administrator's
    pg_terminate_backend) is the operator's to look at: StoreError naming the database
    without its password, and the next transaction works on a new connection."""
    with pytest.raises(StoreError) as lost, pg_store.write() as conn:
        add = text("INSERT INTO site (name) VALUES (:n)")
        conn.execute(add, {"n": "Kept Nowhere"})
        conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    assert "the server shut down" in str(lost.value)
    assert pg_store.location in str(lost.value)
    with pg_store.read() as conn:
        names = conn.execute(text("SELECT name FROM site")).scalars().all()
    assert "Kept Nowhere" not in names


@pytest.mark.parametrize(
    "ids", [[1, 3], (2, 3), [1, 2, 3], []], ids=["list", "tuple", "all", "empty"]
)
def test_list_parameters_select_the_same_rows_on_each_database(
    store: Store, ids: list[int] | tuple[int, ...]
) -> None:
    """``IN :ids`` and ``NOT IN :ids``, empty too: expanded on SQLite, one array on PostgreSQL
    (``= ANY``, ``<> ALL``, which takes a set as well), with the same rows either way."""
    for n in (1, 2, 3):
        add_user(store, f"u{n}@example.org")
    with store.read() as conn:
        uids = [u for (u,) in conn.execute(text('SELECT id FROM "user" ORDER BY id'))]
        chosen = [uids[i - 1] for i in ids]
        stmt = in_text(
            'SELECT id FROM "user" WHERE id IN :ids UNION ALL '
            'SELECT -id FROM "user" WHERE id NOT IN :ids',
            "ids",
            dialect=conn.dialect.name,
        )
        given: list[Any] = [type(ids)(chosen)]
        if store.is_postgres:
            assert "= ANY(:ids)" in str(stmt) and "<> ALL(:ids)" in str(stmt)
            given.append(set(chosen))
        want = sorted([u for u in uids if u in chosen] + [-u for u in uids if u not in chosen])
        for values in given:
            assert sorted(r[0] for r in conn.execute(stmt, {"ids": values})) == want


@pytest.mark.postgres
@pytest.mark.parametrize("way", ["snapshot", "migrations"])
def test_a_postgresql_search_path_naming_no_schema_is_said_in_a_line(
    way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL whose search_path names a schema that does not exist: the first sync's set-up
    says so as a store error (a line, not an internal error with a trace file)."""
    from tests.conftest import PG_BASE, require_postgres

    require_postgres()
    if way == "migrations":
        monkeypatch.setattr(snapshot, "load", lambda dialect: None)
    s = Store(f"{PG_BASE}?options=-csearch_path%3Drs_no_such_schema")
    try:
        with pytest.raises(StoreError, match="no schema to create the tables in exists"):
            s.ensure_schema()
    finally:
        s.dispose()


@pytest.mark.postgres
def test_a_postgresql_user_without_create_on_its_schema_is_said_in_a_line() -> None:
    """A database user that may use its schema but not create in it: the set-up fails as a
    store error naming the missing privilege, and leaves the schema empty."""
    import uuid

    import psycopg

    from tests.conftest import PG_BASE, require_postgres

    require_postgres()
    dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
    name = f"rs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{name}" LOGIN')
        admin.execute(f'CREATE SCHEMA "{name}"')
        admin.execute(f'GRANT USAGE ON SCHEMA "{name}" TO "{name}"')
    base = PG_BASE.replace("postgres@", f"{name}@", 1)
    s = Store(f"{base}?options=-csearch_path%3D{name}")
    try:
        with pytest.raises(StoreError, match="lacks a privilege"):
            s.ensure_schema()
        assert s.current_revision() is None
    finally:
        s.dispose()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{name}" CASCADE')
            admin.execute(f'DROP ROLE "{name}"')


def test_executemany_writes_every_row_in_multi_row_statements(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store.db.executemany: every row written, also past a statement's share of rows and
    with literals in the VALUES group; an ON CONFLICT clause after it applies to each row.
    (PostgreSQL sends many rows per INSERT; SQLite the driver's executemany.)"""
    from sqlalchemy import text

    from rostersync.store import db
    from rostersync.store.db import executemany

    monkeypatch.setattr(db, "MULTI_ROW_MAX", 7)  # several statements, the last one short
    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    with store.write() as conn:
        conn.execute(
            text("CREATE TEMPORARY TABLE em_t (k INTEGER PRIMARY KEY, v TEXT, tag TEXT, n INTEGER)")
        )
        insert = "INSERT INTO em_t (k, v, tag, n) VALUES (?, ?, 'a(b),''c', 0)"
        executemany(conn, insert, [(k, f"v{k}") for k in range(30)])
        executemany(
            conn,
            f"{insert} ON CONFLICT (k) DO UPDATE SET v = excluded.v, n = em_t.n + 1",
            [(k, f"w{k}") for k in range(25, 40)],
        )
        executemany(conn, insert.replace("(k, v", "(k,v") + " ON CONFLICT DO NOTHING", [(1, "x")])
        rows = conn.execute(text("SELECT k, v, tag, n FROM em_t ORDER BY k")).all()
    assert [tuple(r) for r in rows] == [
        (k, f"v{k}" if k < 25 else f"w{k}", "a(b),'c", 1 if 25 <= k < 30 else 0) for k in range(40)
    ]
    inserts = [sql for sql in sent if sql.startswith("INSERT INTO em_t")]
    # 30 rows in 5 statements of up to 7, 15 in 3, 1 in 1; the driver's one executemany each
    assert len(inserts) == (9 if store.is_postgres else 3)


@pytest.mark.postgres
@pytest.mark.parametrize(("query", "seconds"), [("", "10"), ("?connect_timeout=3", "3")])
def test_a_postgresql_connection_attempt_gives_up_after_its_timeout(
    query: str, seconds: str
) -> None:
    """A server behind a firewall that drops packets held a command for the system's TCP
    timeout (minutes): connections are opened with a 10 s timeout, unless the URL gives one."""
    from tests.conftest import PG_BASE

    store = Store(PG_BASE + query)
    try:
        with store.read() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            assert raw.info.get_parameters()["connect_timeout"] == seconds
    finally:
        store.dispose()
