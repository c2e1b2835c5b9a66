"""Database access: engine set-up for SQLite (WAL, busy timeout) and PostgreSQL, transactions,
and the Alembic schema upgrade.

Everything runs on SQLAlchemy Core connections: the sync engine moves rows in bulk with
set-based statements, where ORM objects would cost memory and time per row.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import (
    BindParameter,
    Connection,
    DateTime,
    Dialect,
    Engine,
    TextClause,
    bindparam,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.types import NullType, TypeDecorator

from rostersync import hints
from rostersync.errors import StoreError
from rostersync.source.rows import utc_text
from rostersync.store.checkpoint import AUTOCHECKPOINT_PAGES, Checkpointer
from rostersync.store.postgres import postgresql_connect_args, postgresql_setup
from rostersync.store.sqlitefile import (
    not_writable,
    open_existing_sqlite,
    require_folder,
    sqlite_file,
)

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: A migration file's ``revision = "..."`` and ``down_revision = "..."`` (or None) lines.
_REVISION_LINE = re.compile(
    r'^(down_revision|revision)\s*(?::[^=\n]*)?=\s*(?:"([^"]*)"|None)\s*$', re.M
)


#: SQLite's primary result codes for a database that cannot be used as it is, and what to say.
_SQLITE_UNUSABLE = {
    8: "the database file is read-only",  # SQLITE_READONLY
    10: "a disk I/O error",  # SQLITE_IOERR
    11: "the database file is damaged",  # SQLITE_CORRUPT
    13: "the disk is full",  # SQLITE_FULL
    14: "the database file cannot be opened",  # SQLITE_CANTOPEN
    26: "the file is not a database",  # SQLITE_NOTADB
}
#: PostgreSQL's SQLSTATE classes and codes of the same kind.
_PG_UNUSABLE = {
    "08": "the connection to the server was lost",  # connection exception
    "53": "the server ran out of resources (disk, memory or connections)",
    "57P01": "the server shut down",
    "57P02": "the server shut down",
    "57P03": "the server is not accepting connections yet",
    "58": "a system error on the server (an I/O error)",
    # The set-up's first CREATE TABLE finds no schema on the search path (the URL's
    # options name one that does not exist), or the user may not create or use the tables.
    "3F000": "no schema to create the tables in exists (see the URL's search_path)",
    "42501": "the database user lacks a privilege on the schema or its tables",
}


def unusable(exc: BaseException) -> str | None:
    """Why the database cannot be used, if ``exc`` says it cannot (a full disk, an I/O error,
    a lost server): the operator's to fix, not a bug, so commands report it in a line. None
    for any other error."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return None
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _SQLITE_UNUSABLE.get(code & 0xFF)
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str):
        return _PG_UNUSABLE.get(state) or _PG_UNUSABLE.get(state[:2])
    if getattr(exc, "connection_invalidated", False):
        return "the connection to the server was lost"
    return None


def _one_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def schema_head() -> str | None:
    """The newest migration's revision, read from the files' ``revision`` lines, or None
    when they do not name one head plainly (Alembic then decides). Read without importing
    Alembic: every command that opens the database checks the schema, and importing Alembic
    would be a large part of a read-only command's start-up."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("[0-9]*.py"):
        found = dict((key, value) for key, value in _REVISION_LINE.findall(path.read_text("utf-8")))
        if "revision" not in found or "down_revision" not in found:
            return None
        revisions.add(found["revision"])
        if found["down_revision"]:
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def dialect_insert(dialect: str) -> Any:
    """The INSERT construct with ON CONFLICT of ``dialect``, importing that dialect's module
    alone: PostgreSQL's, with all its drivers' modules, is a visible part of a SQLite
    process's start-up."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | str | None) -> datetime | None:
    """SQLite hands back naive datetimes (strings from text() queries); all are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


#: Bind type for timestamps in text() statements: formats them exactly as the columns store
#: them, so SQLite's string comparisons order them correctly.
TIMESTAMP = DateTime(timezone=True)


def ts_params(*names: str) -> list[BindParameter[Any]]:
    return [bindparam(n, type_=TIMESTAMP) for n in names]


#: Most memory one SQLite connection may use for its page cache.
SQLITE_CACHE_KIB = 128 * 1024

#: The page size of a SQLite database rostersync creates (SQLite's default: 4 KiB). A first
#: load's bulk inserts, index builds and member fills fill fewer, larger pages; the runs that
#: change little measured the same or faster (tests/benchmarks/README.md). A database keeps
#: the size it was created with.
SQLITE_PAGE_BYTES = 16 * 1024


#: SQLite's sort memory while it builds an index on a table of at least
#: SORT_RUNS_MIN_ROWS rows (see index_build).
SQLITE_SORT_KIB = 8 * 1024
SORT_RUNS_MIN_ROWS = 500_000


@contextmanager
def index_build(conn: Connection, table: str) -> Iterator[None]:
    """Around ``CREATE INDEX`` statements on ``table`` (a rowid table): on SQLite, when it is
    large, sort in runs of 8 MiB with a helper thread and merge them, instead of in one run
    as large as the page cache.

    SQLite sizes its sort runs by the connection's page cache (128 MiB): a million-entry index
    was sorted in one run, 1.5-2.2 s, against 0.7-1.1 s in 8 MiB runs, which stay in the
    processor's caches. At 260,000 entries one run was as fast or faster, and the cache lets
    go of pages the rest of the transaction reads again, so smaller tables keep it."""
    if conn.dialect.name != "sqlite":
        yield
        return
    # The largest rowid: about the row count of these append-mostly tables, found in one probe.
    size = conn.exec_driver_sql(f"SELECT max(rowid) FROM {table}").scalar() or 0
    if size < SORT_RUNS_MIN_ROWS:
        yield
        return
    conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_SORT_KIB}")
    conn.exec_driver_sql("PRAGMA threads=2")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        conn.exec_driver_sql("PRAGMA threads=0")


def _unicode_lower(value: object) -> object:
    """SQL ``LOWER()`` for SQLite connections: Python's case folding, NULL stays NULL."""
    if value is None:
        return None
    return (value if isinstance(value, str) else str(value)).lower()


#: How long a SQLite connection waits for a lock another one holds.
BUSY_TIMEOUT_MS = 30_000


def _wal_mode(cur: sqlite3.Cursor) -> None:
    """Put the database in WAL mode. On a database another process is setting up at the same
    moment, SQLite can refuse the lock this takes at once ("database is locked") instead of
    waiting out the busy timeout: tried again until the timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY")
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Before WAL mode: a new database takes it before its first table; an existing one
        # keeps its own (only a VACUUM outside WAL mode changes it).
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_BYTES}")
        _wal_mode(cur)
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        # A page cache of up to 128 MiB (the default is 2 MiB): the set-based steps of a
        # large district walk million-row indexes, and with the default cache they re-read
        # the same pages from the OS again and again. SQLite grows the cache only as far as
        # a query needs it; a larger bound made the pooled connections' memory too large.
        cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cur.close()
        # SQLite's LOWER() folds ASCII only: "ÉLÈVE@X.ORG" became "ÉlÈve@x.org", unlike
        # PostgreSQL and the Python side, which compares str.lower() values (an imported
        # username with a capital É was not found).
        dbapi_conn.create_function("lower", 1, _unicode_lower, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the write lock up front; a deferred BEGIN that later upgrades can
        # fail at once with SQLITE_BUSY when another writer got there first.
        write = conn.get_execution_options().get("rostersync_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


#: Seed of the group directory's advisory lock key, which is hashed with the schema name so
#: that instances sharing a database in different schemas do not wait on each other.
DIRECTORY_LOCK = 0x7273_6772_6F75_7073  # "rsgroups"


def lock_directory(conn: Connection, *, exclusive: bool) -> None:
    """Serialise a sync's apply with the resync batches that materialise groups.

    A sync changes the mirror, marks what changed and may update members itself; a resync
    reads the marks and the mirror, then clears the marks it acted on. On PostgreSQL, under
    READ COMMITTED, a sync committing between a resync's statements could see its marks
    cleared or its member updates undone by a resync working from what it read before, and
    the groups would stay stale until the next full refresh. Syncs take this transaction lock
    exclusively and resync batches take it shared (they may run side by side), first thing
    in their transactions, so neither holds other locks while it waits. SQLite needs none:
    its writers already take turns (BEGIN IMMEDIATE).
    """
    if conn.dialect.name == "postgresql":
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        conn.exec_driver_sql(f"SELECT {fn}(hashtextextended(current_schema(), {DIRECTORY_LOCK}))")


def in_text(sql: str, *names: str, dialect: str | None = None) -> TextClause:
    """A text() statement whose ``:name`` parameters take lists (``IN :ids``).

    ``dialect`` "postgresql": each ``IN :name`` becomes ``= ANY(:name)`` and ``NOT IN :name``
    ``<> ALL(:name)``, the list sent as one array: one statement text for every list, where
    an expanded ``IN`` renders and binds one parameter per value (see the benchmarks README's
    history for what that cost)."""
    if dialect != "postgresql":
        return text(sql).bindparams(*(bindparam(n, expanding=True) for n in names))
    for name in names:
        sql = re.sub(rf"\bNOT\s+IN\s+:{name}\b", f"<> ALL(:{name})", sql)
        sql = re.sub(rf"\bIN\s+:{name}\b", f"= ANY(:{name})", sql)
    return text(sql).bindparams(*(bindparam(n, type_=_ArrayParam()) for n in names))


class _ArrayParam(TypeDecorator[Any]):
    """A list parameter sent as a PostgreSQL array: any collection (a set, a tuple) as a list,
    which psycopg adapts to an array. Untyped, so no cast is rendered after it."""

    impl = NullType
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else list(value)


def executemany(
    conn: Connection, sql: str, rows: Sequence[tuple[Any, ...]], *, timestamps: bool = False
) -> None:
    """Plain driver ``executemany`` for bulk writes on hot paths (``?`` markers, rewritten for
    psycopg): one prepared statement, no per-row parameter processing by SQLAlchemy.
    ``timestamps``: rows hold datetimes, formatted here as the columns store them on SQLite."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        if timestamps:
            rows = [tuple(utc_text(v) if isinstance(v, datetime) else v for v in r) for r in rows]
        conn.exec_driver_sql(sql, list(rows))
        return
    values = _VALUES.match(sql)
    if values is None or len(rows) == 1:
        conn.exec_driver_sql(sql.replace("?", "%s"), list(rows))
        return
    # psycopg runs an INSERT once per row (pipelined, but each one bound and executed by the
    # server): a first load's 2,500 teachers cost 0.1-0.3 s per table. One INSERT of many
    # VALUES groups costs what one row did. (The rows must not repeat a key that an ON
    # CONFLICT ... DO UPDATE settles: one statement cannot update a row twice.)
    head, group, tail = (part.replace("?", "%s") for part in values.groups())
    per = max(1, min(MULTI_ROW_MAX, PARAMETERS_MAX // max(1, group.count("%s"))))
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.exec_driver_sql(
            head + ", ".join([group] * len(chunk)) + tail, tuple(v for r in chunk for v in r)
        )


#: An ``INSERT ... VALUES (...)`` statement: its head, its one VALUES group (literals in quotes
#: may hold anything but a quote) and what follows (ON CONFLICT ...).
_VALUES = re.compile(r"^(INSERT\s.*?\sVALUES\s*)(\((?:[^()']|'[^']*')*\))(.*)$", re.S | re.I)
#: Rows per multi-row INSERT on PostgreSQL, and the parameters one statement may carry (the
#: protocol's limit is 65,535).
MULTI_ROW_MAX = 1000
PARAMETERS_MAX = 60_000


def copy_rows(conn: Connection, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """PostgreSQL ``COPY ... FROM STDIN`` of these rows on the connection's own transaction:
    one stream where psycopg's executemany sends a statement per row."""
    raw: Any = conn.connection.dbapi_connection
    with raw.cursor() as cursor, cursor.copy(sql) as copy:
        for row in rows:
            copy.write_row(row)


class Store:
    """One database: directory, mirror, staging and operations tables."""

    def __init__(self, url: str, *, echo: bool = False, create: bool = True) -> None:
        """``create=False`` (commands that only read): a SQLite file that does not exist is a
        StoreError naming it, and no file or folder is ever created; on PostgreSQL a lock
        that keeps a read waiting ends it after a while (postgres.READ_LOCK_WAIT_S).
        Otherwise a missing file is created, in a folder that must exist (a ConfigError on
        `database`)."""
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._checkpointer: Checkpointer | None = None
        # Both engines hide_parameters: a failed statement's values (roster emails and names)
        # would go into its exception's text, and from there into a run's error, the log and
        # internal-error traces.
        if self.dialect == "sqlite":
            db = sqlite_file(url)
            kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
            if db is not None:
                if create:
                    require_folder(db)  # a ConfigError: a mistyped path makes no new tree
                else:
                    kwargs = {"creator": open_existing_sqlite(db)}
                self._checkpointer = Checkpointer(str(db))
            # Pooled connections keep their PRAGMAs; opening one per batch would cost more
            # than the batch's insert. A connection is only ever used by one thread at a time.
            self.engine = create_engine(url, echo=echo, pool_size=8, hide_parameters=True, **kwargs)
            _sqlite_setup(self.engine)
        elif self.dialect == "postgresql":
            self.engine = create_engine(
                url,
                echo=echo,
                pool_pre_ping=True,
                pool_size=10,
                hide_parameters=True,
                connect_args=postgresql_connect_args(parsed.query),
            )
            postgresql_setup(self.engine, reader=not create)
        else:
            raise StoreError(
                f"unsupported database {parsed.drivername!r}: use sqlite or postgresql"
            )

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"

    @property
    def location(self) -> str:
        """The SQLite file, or the server URL without its password: for messages."""
        parsed = make_url(self.url)
        if self.dialect == "sqlite" and parsed.database:
            return parsed.database
        return parsed.render_as_string(hide_password=True)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._usable(), self.engine.connect() as conn:
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self._discard(conn)
                raise

    @contextmanager
    def _usable(self) -> Iterator[None]:
        """A database that cannot be used (:func:`unusable`) raises StoreError naming it and
        why; its transaction was rolled back, so nothing it wrote is kept."""
        try:
            yield
        except DBAPIError as exc:
            why = unusable(exc)
            if why is None:
                raise
            detail = _one_line(str(getattr(exc, "orig", exc)))
            raise StoreError(
                f"database {self.location}: {why} ({detail}); nothing this transaction "
                "wrote was kept: fix that, then run the command again"
            ) from exc

    def _discard(self, conn: Connection) -> None:
        """SQLite: close the connection of a transaction that failed, instead of returning it
        to the pool. A statement whose result was not read to the end (the exception came
        between two statements) stays open on the connection while the traceback keeps its
        result alive, and an open statement makes a later DROP INDEX there fail with "database
        table is locked". Closing the connection finalizes them all; PostgreSQL has no such
        state to leak past a rollback. (An in-memory database lives only in its connection:
        it is kept.)"""
        if self._checkpointer is not None:  # a SQLite file
            conn.invalidate()

    @contextmanager
    def write(self, *, bulk: bool = False) -> Iterator[Connection]:
        """A write transaction: commits on success, rolls back on any exception.

        The sync engine relies on this to undo a held or dry run (it raises inside the
        transaction; see "rollback by exception" in :mod:`rostersync.sync.engine`).

        ``bulk``: a large transaction (a sync's apply). On SQLite its commit returns once its
        pages are in the write-ahead log, and the store's checkpointer thread copies them
        into the database file (see Checkpointer)."""
        handoff = bulk and self._checkpointer is not None
        with self._usable(), self.engine.connect() as conn:
            conn = conn.execution_options(rostersync_write=True)
            # The raw connection: a statement through SQLAlchemy would begin a transaction.
            raw: Any = conn.connection.dbapi_connection if handoff else None
            if raw is not None:
                raw.execute("PRAGMA wal_autocheckpoint=0")
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self._discard(conn)  # the discarded connection takes its PRAGMA with it
                raise
            if raw is not None:
                raw.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        if handoff and self._checkpointer is not None:
            self._checkpointer.poke()

    def dispose(self) -> None:
        """Close every connection (on SQLite the last one to close checkpoints the log), after
        the checkpointer thread is done."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()

    # -- schema ------------------------------------------------------------------------

    def _alembic(self, conn: Connection | None = None) -> AlembicConfig:
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        if conn is not None:
            cfg.attributes["connection"] = conn
        return cfg

    def head_revision(self) -> str | None:
        if (head := schema_head()) is not None:
            return head
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic()).get_current_head()

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                # Read plainly when there is one row (the usual case): Alembic is not imported.
                if not inspect(conn).has_table("alembic_version"):
                    return None
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
                if len(rows) <= 1:
                    return str(rows[0][0]) if rows else None
                from alembic.runtime.migration import MigrationContext

                return MigrationContext.configure(conn).get_current_revision()
        except DBAPIError as exc:
            # Refused, missing or not a database at all (a config pointing at another file).
            if not isinstance(exc, OperationalError) and unusable(exc) is None:
                raise
            why = str(exc.orig)
            if (path := sqlite_file(self.url)) is not None and (ro := not_writable(path)):
                why = f"{why}: {ro}"
            raise StoreError(f"cannot open database {self.location}: {why}") from None

    def upgrade(self) -> tuple[str | None, str | None]:
        """Apply pending migrations; returns (revision before, revision after). A database
        without tables is set up from the schema snapshot when it is at the head."""
        before = self.current_revision()
        self._upgrade_from(before)
        return before, self.current_revision()

    def _upgrade_from(self, before: str | None) -> bool:
        """Upgrade from ``before``; True if this process created the schema (not another
        one setting the same new database up at the same moment)."""
        from rostersync.store import snapshot

        if before is None and (how := snapshot.set_up(self)) is not None:
            return how == snapshot.REPLAYED
        self.migrate()
        return before is None

    def migrate(self) -> None:
        """Run the pending migrations through Alembic, in one transaction."""
        from alembic import command

        with self._usable(), self.engine.connect() as conn:
            command.upgrade(self._alembic(conn), "head")
            conn.commit()

    def has_tables(self) -> bool:
        with self._usable(), self.engine.connect() as conn:
            return bool(inspect(conn).get_table_names())

    def ensure_schema(self, *, auto_upgrade: bool = True) -> None:
        """Upgrade an empty database on first use (``auto_upgrade``); refuse to run on an
        outdated schema, and, without ``auto_upgrade``, on an empty database."""
        current = self.current_revision()
        head = self.head_revision()
        if current == head:
            return
        if current is None:
            has_tables = self.has_tables()
            if has_tables:
                # Another process may have set the new database up since the first look.
                current = self.current_revision()
                if current == head:
                    return
            if not has_tables and auto_upgrade:
                # Said once, by the process that set it up: a config copied elsewhere, whose
                # relative SQLite path now points at a new file, would otherwise start afresh
                # unnoticed.
                if self._upgrade_from(None):
                    structlog.get_logger().info(
                        "database_created", database=self.location, revision=head
                    )
                return
            if not has_tables:
                raise StoreError(
                    f"database {self.location} has no rostersync tables yet: a sync or "
                    f"`{hints.command('db upgrade')}` creates them"
                )
        raise StoreError(
            f"database schema is at {current or 'an unknown revision'}, this version needs "
            f"{head}: run `{hints.command('db upgrade')}`"
        )
