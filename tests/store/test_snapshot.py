"""The schema snapshots (rostersync.store.snapshot): a new database is set up by replaying what
the migrations ran, and ends exactly as the migrations leave it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.store import snapshot
from rostersync.store.db import Store, schema_head
from tests.conftest import _pg_schema_store
from tests.schemadump import schema_of

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """A factory of URLs of empty databases on each backend."""
    if request.param == "sqlite":
        count = iter(range(1_000))
        yield lambda: f"sqlite:///{tmp_path / f'db{next(count)}.db'}"
        return
    with ExitStack() as stack:

        def new() -> str:
            # conftest's schema store: a schema of its own, dropped when the test ends.
            made = _pg_schema_store()
            url = next(made).url
            stack.callback(next, made, None)
            return url

        yield new


def _schema_of(store: Store) -> dict[str, Any]:
    with store.read() as conn:
        return schema_of(conn)


def test_the_kept_snapshots_are_what_the_migrations_run_now(
    empty_url: Callable[[], str],
) -> None:
    """Recording again on an empty database gives the kept snapshot, statement for statement:
    a migration added or changed without recording it fails here."""
    fresh = snapshot.record(empty_url())
    kept = snapshot.load(fresh.dialect)
    how = "record them again: python -m rostersync.store.snapshot --postgresql <empty db URL>"
    assert kept is not None, how
    assert kept.revision == fresh.revision == schema_head(), how
    # As sorted lists: Alembic's SQLite table rebuilds create a table's indexes in an order
    # that changes from one process to the next. Replayed in either order they give one
    # schema, which the next test compares with the migrated one.
    assert sorted(kept.statements) == sorted(fresh.statements), how


def test_a_database_set_up_from_the_snapshot_is_the_migrated_one(
    empty_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables, columns, types, defaults, generated columns, constraints, indexes, storage
    options and the version row: the same as the migrations leave them, and without them."""
    migrated = Store(empty_url())
    migrated.migrate()
    replayed = Store(empty_url())

    def no_alembic(_self: Store) -> None:
        raise AssertionError("the migrations ran")

    monkeypatch.setattr(Store, "migrate", no_alembic)
    assert replayed.upgrade() == (None, schema_head())
    try:
        assert _schema_of(replayed) == _schema_of(migrated)
        assert _schema_of(replayed)["versions"] == [schema_head()]
    finally:
        migrated.dispose()
        replayed.dispose()


@pytest.mark.parametrize(
    "kept",
    [
        pytest.param(lambda d: snapshot.Snapshot(d, "0001", ("SELECT 1",)), id="behind"),
        pytest.param(lambda d: None, id="missing"),
    ],
)
def test_without_a_snapshot_of_the_head_the_migrations_set_the_database_up(
    kept: Callable[[str], snapshot.Snapshot | None],
    empty_url: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot of another revision (a migration added, its snapshot not recorded) or none
    at all: Alembic sets the new database up, as before."""
    monkeypatch.setattr(snapshot, "load", kept)
    ran: list[str] = []
    migrate = Store.migrate

    def counted(self: Store) -> None:
        ran.append(self.location)
        migrate(self)

    monkeypatch.setattr(Store, "migrate", counted)
    store = Store(empty_url())
    try:
        store.ensure_schema()
        assert len(ran) == 1
        assert store.current_revision() == schema_head()
    finally:
        store.dispose()


def test_an_unreadable_snapshot_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged file, or one of another dialect, is not replayed: load gives None."""
    monkeypatch.setattr(snapshot, "SNAPSHOTS", tmp_path)
    assert snapshot.load("sqlite") is None  # no file
    (tmp_path / "sqlite.json").write_text('{"dialect": "sqlite", "revision": "0017"', "utf-8")
    assert snapshot.load("sqlite") is None  # cut short
    (tmp_path / "sqlite.json").write_text(
        '{"dialect": "postgresql", "revision": "0017", "statements": []}', "utf-8"
    )
    assert snapshot.load("sqlite") is None  # another dialect's
    (tmp_path / "sqlite.json").write_text(
        '{"dialect": "sqlite", "revision": "0017", "statements": [1]}', "utf-8"
    )
    assert snapshot.load("sqlite") is None
    (tmp_path / "sqlite.json").write_text(
        '{"dialect": "sqlite", "revision": "0017", "statements": ["CREATE TABLE t (x int)"]}',
        "utf-8",
    )
    assert snapshot.load("sqlite") == snapshot.Snapshot(
        "sqlite", "0017", ("CREATE TABLE t (x int)",)
    )


def test_a_database_with_tables_is_left_to_the_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`db upgrade` on a database holding other tables and no version: the snapshot is not
    replayed over them; Alembic decides, as before."""
    store = Store(f"sqlite:///{tmp_path / 'other.db'}")
    with store.write() as conn:
        conn.execute(text("CREATE TABLE something (id integer)"))
    replayed: list[int] = []
    monkeypatch.setattr(snapshot, "replay", lambda conn, kept: replayed.append(1))
    try:
        assert store.upgrade() == (None, schema_head())
        assert replayed == []
        with store.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM something")).scalar() == 0
    finally:
        store.dispose()


def test_two_processes_setting_one_database_up_at_once_both_find_it_set_up(
    empty_url: Callable[[], str],
) -> None:
    """Two stores on one new database set it up side by side: one replays the snapshot, the
    other waits for it (SQLite's write lock) or fails on its tables and finds them there
    (PostgreSQL); both go on at the head, and the schema is whole."""
    url = empty_url()
    stores = [Store(url), Store(url)]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def set_up(store: Store) -> None:
        try:
            start.wait()
            store.ensure_schema()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=set_up, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        for store in stores:
            assert store.current_revision() == schema_head()
        assert _schema_of(stores[0])["versions"] == [schema_head()]
    finally:
        for store in stores:
            store.dispose()


def test_record_refuses_a_database_that_is_not_empty(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'set-up.db'}"
    store = Store(url)
    store.ensure_schema()
    store.dispose()
    with pytest.raises(ValueError, match="not an empty database"):
        snapshot.record(url)


@pytest.mark.parametrize("window", ["after its first look", "after its check for tables"])
def test_only_the_process_that_set_a_new_database_up_says_it_created_it(
    empty_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch, window: str, info_logged: None
) -> None:
    """Of two processes starting on one new database, the second may have seen no schema
    (and no tables) before the first set it up: it goes on at the head, without an error
    ("schema at an unknown revision") and without logging ``database_created`` (both said
    they had created it)."""
    import structlog.testing

    url = empty_url()
    first, second = Store(url), Store(url)
    try:
        with structlog.testing.capture_logs() as logs:
            first.ensure_schema()
        assert [e["event"] for e in logs] == ["database_created"]
        # What the second process read before the first one's set-up committed.
        stale_revisions = [None]
        stale_tables = [False] if window == "after its check for tables" else []
        revision, tables = second.current_revision, second.has_tables
        monkeypatch.setattr(
            second,
            "current_revision",
            lambda: stale_revisions.pop() if stale_revisions else revision(),
        )
        monkeypatch.setattr(
            second, "has_tables", lambda: stale_tables.pop() if stale_tables else tables()
        )
        with structlog.testing.capture_logs() as logs:
            second.ensure_schema()
        assert [e["event"] for e in logs] == []
        assert revision() == schema_head()
        assert snapshot.set_up(second) == snapshot.FOUND
    finally:
        first.dispose()
        second.dispose()
