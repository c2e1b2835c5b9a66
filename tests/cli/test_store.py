"""Which commands may create or migrate the database: those that write do on first use; those
that only read never do, so a mistyped path is an error naming it rather than an empty list."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import inspect

from rostersync.cli.main import main
from rostersync.config.loader import load_settings
from rostersync.store.db import Store, schema_head
from rostersync.store.sqlitefile import sqlite_file
from tests.conftest import _pg_schema_store
from tests.fulldisk import fill_up_after

REPO = Path(__file__).resolve().parents[2]

READ_ONLY = [
    ["users", "list"],
    ["groups", "list"],
    ["queue", "list"],
    ["runs", "list"],
    ["runs", "show", "1"],
    ["teachers", "list", "--source", "sample"],
    ["status"],
]


def write_config(tmp_path: Path, database: str) -> Path:
    data = yaml.safe_load((REPO / "config" / "rostersync.example.yaml").read_text())
    data["database"] = database
    data["logging"] = {"level": "warning", "format": "json"}
    data["sources"]["sample"]["path"] = str(REPO / "config" / "sample-district")
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run `rostersync --config CONFIG ARGS` through main(): exit code and all output."""
    code: int | str | None = 0
    try:
        main(["--config", str(config), *args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert isinstance(code, int)
    return code, out.out + out.err


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_read_only_command_on_a_mistyped_sqlite_path_is_an_error_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`users list` and the other listings name the missing file and create neither it nor its folder."""
    config = write_config(tmp_path, "sqlite:///nodir/rs.db")
    code, output = invoke(config, capsys, *command)
    assert code == 1, output
    assert f"database {tmp_path / 'nodir' / 'rs.db'} does not exist" in output
    assert "Traceback" not in output
    assert not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_read_only_command_whose_database_folder_is_missing_says_to_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """With the folder missing too, the message says so and asks for it first: its
    `db upgrade` alone, pasted, would be refused for that folder."""
    config = write_config(tmp_path, "sqlite:///nodir/rs.db")
    code, output = invoke(config, capsys, *command)
    assert code == 1, output
    assert (
        f"database {tmp_path / 'nodir' / 'rs.db'} does not exist, nor its folder "
        f"{tmp_path / 'nodir'}: check `database` in the config, or create the folder; then a "
        "sync or `rostersync --config"
    ) in output


def test_config_check_never_opens_the_database_but_notes_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`config check` passes (the first sync creates the file) and says the file is not there
    yet, or that its folder is missing too (not an error: systemd's StateDirectory creates
    /var/lib/rostersync when the unit first starts, after the install guide's check)."""
    (tmp_path / "state").mkdir()
    config = write_config(tmp_path, "sqlite:///state/rs.db")
    code, output = invoke(config, capsys, "config", "check")
    assert code == 0, output
    assert f"note: database {tmp_path / 'state' / 'rs.db'} does not exist yet" in output
    config = write_config(tmp_path, "sqlite:///nodir/rs.db")
    code, output = invoke(config, capsys, "config", "check")
    assert code == 0, output
    assert (
        f"note: database {tmp_path / 'nodir' / 'rs.db'} does not exist, nor its folder "
        f"{tmp_path / 'nodir'}: a sync refuses it until the folder is created" in output
    )
    assert not (tmp_path / "nodir").exists()


def test_a_read_only_command_does_not_migrate_an_empty_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing file without rostersync's tables is an error for a listing; no table appears."""
    db = tmp_path / "rs.db"
    db.touch()
    config = write_config(tmp_path, f"sqlite:///{db}")
    code, output = invoke(config, capsys, "users", "list")
    assert code == 1
    assert f"database {db} has no rostersync tables yet" in output
    store = Store(f"sqlite:///{db}", create=False)
    with store.engine.connect() as conn:
        assert inspect(conn).get_table_names() == []
    store.dispose()


@pytest.mark.parametrize(
    "command", [["sync"], ["db", "upgrade"], ["resync", "--all"]], ids=" ".join
)
def test_commands_that_write_create_and_migrate_the_database_on_first_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`sync`, `db upgrade` and `resync` create the file and the schema in an existing folder."""
    (tmp_path / "state").mkdir()
    config = write_config(tmp_path, "sqlite:///state/rs.db")
    code, output = invoke(config, capsys, *command)
    assert code == 0, output
    store = Store(f"sqlite:///{tmp_path / 'state' / 'rs.db'}", create=False)
    assert store.current_revision() == store.head_revision()
    store.dispose()
    code, output = invoke(config, capsys, "users", "list")
    assert code == 0, output


@pytest.mark.parametrize(
    "command", [["sync"], ["db", "upgrade"], ["resync", "--all"]], ids=" ".join
)
@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_a_database_in_a_missing_folder_is_a_config_error_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], relative: bool
) -> None:
    """A mistyped folder (`sqlite:////var/lib/rostersync/typo-dir/x.db`) used to be created,
    with a new empty database in it: now exit 2, naming the key, the folder and the config."""
    missing = tmp_path / "typo-dir" / "sub"
    url = "sqlite:///typo-dir/sub/rs.db" if relative else f"sqlite:///{missing / 'rs.db'}"
    config = write_config(tmp_path, url)
    code, output = invoke(config, capsys, *command)
    assert code == 2, output
    assert f"rostersync: {config}: 1 configuration error(s):" in output
    assert f"  database: the folder {missing} does not exist" in output
    assert "Traceback" not in output
    assert not (tmp_path / "typo-dir").exists()


def test_the_example_configs_database_folder_ships_with_the_repository() -> None:
    """The README's first command syncs the example config in a fresh clone, and rostersync
    never creates a database's folder: var/ is in the repository (a .gitkeep holds it)."""
    settings = load_settings(REPO / "config" / "rostersync.example.yaml", check_files=False)
    assert sqlite_file(settings.database) == REPO / "var" / "rostersync.db"
    assert (REPO / "var" / ".gitkeep").is_file()


def test_the_first_sync_names_the_database_it_set_up_and_later_runs_do_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config copied elsewhere points its relative SQLite path at a new file: the sync that
    creates it says so, with the file's path."""
    (tmp_path / "state").mkdir()
    config = write_config(tmp_path, "sqlite:///state/rs.db")
    data = yaml.safe_load(config.read_text())
    data["logging"] = {"level": "info", "format": "json"}
    config.write_text(yaml.safe_dump(data))
    code, output = invoke(config, capsys, "sync")
    assert code == 0, output
    created = [line for line in output.splitlines() if '"database_created"' in line]
    assert len(created) == 1, output
    assert str(tmp_path / "state" / "rs.db") in created[0]
    code, output = invoke(config, capsys, "sync")
    assert code == 0, output
    assert "database_created" not in output


@pytest.fixture
def empty_pg_url() -> Iterator[str]:
    """A PostgreSQL URL on a fresh, empty schema."""
    for store in _pg_schema_store():
        yield store.url


@pytest.mark.postgres
def test_a_read_only_command_does_not_migrate_an_empty_postgresql_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], empty_pg_url: str
) -> None:
    """On PostgreSQL a listing on an empty schema is an error and creates no table; `sync` migrates it."""
    config = write_config(tmp_path, empty_pg_url)
    code, output = invoke(config, capsys, "runs", "list")
    assert code == 1
    assert "has no rostersync tables yet" in output
    store = Store(empty_pg_url)
    with store.engine.connect() as conn:
        assert inspect(conn).get_table_names() == []
    code, output = invoke(config, capsys, "sync")
    assert code == 0, output
    assert store.current_revision() == store.head_revision()
    store.dispose()


def test_a_full_disk_is_one_line_naming_the_database_and_the_next_sync_recovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's "database or disk is full" mid-sync is the operator's to fix, not a bug: the
    run fails with one line naming the file and the cause, exit 1, no internal-error report
    or trace, nothing half-written; with room again (here: the page limit lifted), the next
    sync gives what an undisturbed one does."""
    database = tmp_path / "rs.db"
    config = write_config(tmp_path, f"sqlite:///{database}")
    assert invoke(config, capsys, "db", "upgrade")[0] == 0
    lift = fill_up_after(monkeypatch, database, 8)
    code, out = invoke(config, capsys, "sync")
    assert code == 1
    assert f"error: database {database}: the disk is full" in out  # the run's report
    assert "internal error" not in out and "Traceback" not in out
    lift()
    code, out = invoke(config, capsys, "runs", "show", "1", "--json")
    assert code == 0
    assert json.loads(out)["status"] == "failed"
    assert "the disk is full" in json.loads(out)["error"]
    assert invoke(config, capsys, "sync")[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    fresh = write_config(other, f"sqlite:///{other / 'rs.db'}")
    assert invoke(fresh, capsys, "sync")[0] == 0
    listed = [json.loads(invoke(c, capsys, "users", "list", "--json")[1]) for c in (config, fresh)]
    assert len(listed[0]) == 43
    assert [u["email"] for u in listed[0]] == [u["email"] for u in listed[1]]


def test_db_upgrade_says_which_database_went_from_which_revision_to_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db upgrade` names the database file (not a Python repr) and the revisions: a new one
    is set up from empty; an up-to-date one says it is at the head already, with nothing to
    do (not `0019 -> 0019`), exit 0."""
    database = tmp_path / "rs.db"
    config = write_config(tmp_path, f"sqlite:///{database}")
    head = schema_head()
    assert invoke(config, capsys, "db", "upgrade") == (0, f"database {database}: empty -> {head}\n")
    assert invoke(config, capsys, "db", "upgrade") == (
        0,
        f"database {database}: already at {head}, the newest revision (nothing to do)\n",
    )
    # The store is closed as the command ends: no SQLite -wal or -shm file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("rs.db")) == ["rs.db"]


def test_a_database_path_naming_another_kind_of_file_is_an_error_that_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`database:` pointing at a file that is not SQLite (the config itself, a CSV): config
    check names it (exit 2); a listing and a sync say they cannot open it in one line (exit 1),
    without a traceback, and leave the file as it was."""
    other = tmp_path / "notes.txt"
    other.write_text("not a database\n" * 100)
    before = other.read_bytes()
    config = write_config(tmp_path, f"sqlite:///{other}")
    code, output = invoke(config, capsys, "config", "check")
    assert code == 2, output
    assert f"database: {other} is not a SQLite database" in output
    for command in (["users", "list"], ["sync", "--full"]):
        code, output = invoke(config, capsys, *command)
        assert code == 1, output
        assert f"cannot open database {other}: file is not a database" in output
        assert "Traceback" not in output and "internal error" not in output
    assert other.read_bytes() == before


def test_ctrl_c_while_a_command_closes_the_database_waits_for_the_close(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as a command closes its database (after its work and output) is delivered once
    the close is done: inside it, SQLAlchemy's pool logged the interrupted connection close
    with a traceback."""
    import os
    import signal

    from rostersync.cli.app import App

    closed: list[bool] = []
    dispose = Store.dispose

    def interrupted_dispose(self: Store) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands here
        dispose(self)
        closed.append(True)

    app = App(str(config), None)
    app.store  # noqa: B018 (opens and migrates the database)
    monkeypatch.setattr(Store, "dispose", interrupted_dispose)
    with pytest.raises(KeyboardInterrupt):
        app.close()
    assert closed == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_read_only_sqlite_file_or_folder_is_named_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says only "unable to open database file" for a read-only folder or file (it
    writes its -wal and -shm beside the database even to read); the message names which is not
    writable and what to do. (os.access is faked: the tests may run as root, whom a chmod does
    not stop.)"""
    from rostersync.store import sqlitefile

    db = tmp_path / "rs.db"
    assert sqlitefile.not_writable(db) is None  # no file: the missing-file message says it
    db.write_bytes(b"")
    assert sqlitefile.not_writable(db) is None
    monkeypatch.setattr(
        "rostersync.store.sqlitefile.os.access", lambda p, mode: Path(p) != tmp_path
    )
    assert sqlitefile.not_writable(db) == (
        f"the database folder {tmp_path} is not writable (read-only, or owned by another "
        "user): SQLite writes beside the database even to read it; make it writable by the "
        "user rostersync runs as"
    )
    monkeypatch.setattr("rostersync.store.sqlitefile.os.access", lambda p, mode: False)
    assert (sqlitefile.not_writable(db) or "").startswith(f"the database file {db} is not")


@pytest.mark.postgres
@pytest.mark.parametrize("command", [["status"], ["runs", "list"]], ids=" ".join)
def test_a_read_only_command_held_by_a_lock_on_postgresql_says_so_in_time(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pg_store: Store,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """A session holding a lock against reads (a VACUUM FULL, a migration, LOCK TABLE) kept
    `status` waiting without end, where SQLite's busy timeout ends the wait: a command that
    only reads waits READ_LOCK_WAIT_S, then says why in one line (exit 1); a command that
    writes still waits for its turn."""
    from sqlalchemy import text

    from rostersync.store import postgres

    monkeypatch.setattr(postgres, "READ_LOCK_WAIT_S", 0.3)
    config = write_config(tmp_path, pg_store.url)
    with pg_store.engine.connect() as holder:
        holder.execute(text("LOCK TABLE sync_run IN ACCESS EXCLUSIVE MODE"))
        code, output = invoke(config, capsys, *command)
        holder.rollback()
    assert code == 1, output
    assert output.strip().splitlines()[-1] == (
        "rostersync: the database is locked: another session has held a lock on a table this "
        "command reads for more than 0.3 s (a VACUUM FULL, a migration, LOCK TABLE, a first "
        "sync's apply; PostgreSQL's pg_locks names it); run it again when that session is done"
    )
    code, output = invoke(config, capsys, *command)
    assert code == 0, output
    with pg_store.engine.connect() as conn:  # the store's own connections wait, as before
        timeout = conn.execute(text("SHOW lock_timeout")).scalar_one()
    assert timeout == "0"
