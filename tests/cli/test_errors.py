"""What `main()` prints when a command fails: known errors keep their exit codes; anything
unexpected is one line naming a private file that holds the full (scrubbed) trace."""

from __future__ import annotations

import json
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from rostersync import directory
from rostersync.cli.main import main
from rostersync.config import loader
from rostersync.errors import RunNotFound
from rostersync.store.db import Store
from tests.conftest import BASE_CONFIG

SECRET = "smtp-pass-4f1b2c9d"  # the config's SMTP password: registered, so scrubbed anywhere
LINE = re.compile(
    r"rostersync: internal error: RuntimeError: boom with \[redacted\] and "
    r"password=\[redacted\] \.\.\. \(full trace in (?P<path>\S+)\)"
)


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    yield
    structlog.reset_defaults()


def _config(tmp_path: Path, log_format: str = "json") -> Path:
    data: dict[str, Any] = {
        **BASE_CONFIG,
        "database": "sqlite:///rs.db",
        "logging": {"level": "info", "format": log_format},
        "smtp": {"host": "127.0.0.1", "password": SECRET, "from": "rs@example.org"},
    }
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    # The database exists, as after a first sync: read-only commands refuse a missing one.
    store = Store(f"sqlite:///{tmp_path / 'rs.db'}")
    store.upgrade()
    store.dispose()
    return path


def _boom(*_args: object, **_kwargs: object) -> Any:
    raise RuntimeError(f"boom with {SECRET} and password=hunter2\nsecond line")


def _main(*argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert isinstance(done.value.code, int)
    return done.value.code


def test_internal_error_is_one_line_and_a_private_trace_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that raises something unexpected exits 1 with one line naming a 0600 file in
    the XDG state folder; the file has the scrubbed trace, stderr has no raw traceback."""
    monkeypatch.setattr(directory, "list_users", _boom)
    assert _main("--config", str(_config(tmp_path)), "users", "list") == 1
    out, err = capsys.readouterr()
    assert out == ""
    *log_lines, last = err.splitlines()
    match = LINE.fullmatch(last)
    assert match is not None, last
    trace = Path(match["path"])
    assert trace.parent == tmp_path / "state" / "rostersync"
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600
    assert stat.S_IMODE(trace.parent.stat().st_mode) == 0o700
    saved = trace.read_text()
    assert "Traceback (most recent call last)" in saved and "_boom" in saved
    assert "users list" in saved and "second line" in saved
    # The JSON log line carries the trace too, inside one line, scrubbed.
    assert not any(line.startswith(("Traceback", "  File")) for line in err.splitlines())
    [event] = [json.loads(line) for line in log_lines if '"internal_error"' in line]
    assert event["level"] == "error" and event["trace_file"] == str(trace)
    assert "_boom" in event["exception"]
    for text in (err, saved):
        assert SECRET not in text and "hunter2" not in text


def test_on_a_console_the_log_line_has_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With console logs (a terminal), stderr gets the log event and the line, not the trace."""
    monkeypatch.setattr(directory, "list_users", _boom)
    assert _main("--config", str(_config(tmp_path, "console")), "users", "list") == 1
    err = capsys.readouterr().err
    assert "internal_error" in err and LINE.fullmatch(err.splitlines()[-1])
    assert "Traceback" not in err and "_boom" not in err


def test_failure_before_the_config_is_read_keeps_stdout_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logging is not set up yet: the error log still goes to stderr, never stdout."""
    monkeypatch.setattr(loader, "load_settings", _boom)
    assert _main("--config", str(_config(tmp_path)), "users", "list", "--json") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "internal_error" in err
    assert err.splitlines()[-1].startswith("rostersync: internal error: RuntimeError: boom")


def test_trace_goes_to_the_systemd_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under systemd (StateDirectory=), the trace is kept in $STATE_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "var-lib"))
    monkeypatch.setattr(directory, "list_users", _boom)
    assert _main("--config", str(_config(tmp_path)), "users", "list") == 1
    match = LINE.fullmatch(capsys.readouterr().err.splitlines()[-1])
    assert match is not None
    assert Path(match["path"]).parent == tmp_path / "var-lib" / "internal-errors"


def test_unwritable_state_folder_falls_back_to_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the state folder cannot be made, the trace is a private file in the temp dir."""
    (tmp_path / "state").write_text("a file where the folder should be")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(directory, "list_users", _boom)
    assert _main("--config", str(_config(tmp_path)), "users", "list") == 1
    match = LINE.fullmatch(capsys.readouterr().err.splitlines()[-1])
    assert match is not None
    trace = Path(match["path"])
    assert trace.parent == temp and stat.S_IMODE(trace.stat().st_mode) == 0o600


def test_nowhere_to_save_prints_the_trace_as_the_last_resort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no folder writable, the line says why and the (scrubbed) trace is logged instead."""
    (tmp_path / "state").write_text("not a folder")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    monkeypatch.setattr(directory, "list_users", _boom)
    assert _main("--config", str(_config(tmp_path, "console")), "users", "list") == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("rostersync: internal error: RuntimeError: boom")
    assert "the trace could not be saved (" in last and str(tmp_path / "missing") in last
    assert "_boom" in err and SECRET not in err


def test_known_errors_keep_their_exit_codes_and_save_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A RostersyncError exits 1 and a click usage error exits 2, each without a trace file."""

    def missing(*_args: object, **_kwargs: object) -> Any:
        raise RunNotFound("run 7 does not exist")

    config = str(_config(tmp_path))
    monkeypatch.setattr(directory, "list_users", missing)
    assert _main("--config", config, "users", "list") == 1
    assert capsys.readouterr().err.splitlines()[-1] == "rostersync: run 7 does not exist"
    assert _main("--config", config, "users", "lisst") == 2
    assert "internal error" not in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_a_path_that_cannot_be_written_is_a_plain_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --output into a missing folder names the path and the reason: exit 1, no trace."""
    target = tmp_path / "nodir" / "template.xlsx"
    config = str(_config(tmp_path))
    assert (
        _main("--config", config, "import", "template", "--format", "xlsx", "--output", str(target))
        == 1
    )
    assert capsys.readouterr().err == f"rostersync: {target}: No such file or directory\n"
    assert not (tmp_path / "state").exists()


def test_a_database_another_process_keeps_locked_is_a_plain_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SQLite write transaction held by another process past the busy timeout stops a
    command that writes with one line saying so (exit 1), not an internal error."""
    import sqlite3

    from rostersync.store import db

    config = _config(tmp_path)
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 50)
    holder = sqlite3.connect(tmp_path / "rs.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        code = _main("--config", str(config), "resync", "--all")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines()[-1] == (
        "rostersync: the database is locked: another process has held a write transaction on "
        "it for more than 0.05 s (a sync, an import, the daemon applying a run, or a tool such as "
        "sqlite3); what this command was writing was rolled back: run it again when that "
        "process is done"
    )
    assert "internal error" not in out + err
    assert not list((tmp_path / "state").rglob("*internal-error*"))
