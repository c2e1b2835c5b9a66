"""Log output: syslog priorities when stderr is the journal, JSON only on a non-terminal stderr."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
import yaml

from rostersync import logs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    logs.configure(fmt="json")  # the module's own notion of the format, back to a pipe's


def journal_env(monkeypatch: pytest.MonkeyPatch, stream: TextIO) -> None:
    """Make ``stream`` look like the journal's stream, as systemd says it in JOURNAL_STREAM."""
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def _log_all_levels() -> None:
    log = structlog.get_logger()
    log.debug("a_debug")
    log.info("an_info", source="district")
    log.warning("a_warning")
    log.error("an_error")
    log.critical("a_critical")


def test_every_line_to_the_journal_starts_with_its_syslog_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """<7> debug, <6> info, <4> warning, <3> error, <2> critical; the JSON keeps its level."""
    with (tmp_path / "journal").open("w+", encoding="utf-8") as stream:
        journal_env(monkeypatch, stream)
        assert logs.is_journal(stream)
        logs.configure("debug", "auto", stream)
        _log_all_levels()
        stream.seek(0)
        lines = stream.read().splitlines()
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["level"] for e in events] == ["debug", "info", "warning", "error", "critical"]
    assert events[1]["event"] == "an_info" and events[1]["source"] == "district"


def test_a_stream_that_is_not_the_journal_gets_no_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr was redirected does not match it."""
    with (tmp_path / "other").open("w+", encoding="utf-8") as elsewhere:
        journal_env(monkeypatch, elsewhere)
        with (tmp_path / "log").open("w+", encoding="utf-8") as stream:
            assert not logs.is_journal(stream)
            logs.configure("info", "json", stream)
            structlog.get_logger().warning("a_warning")
            stream.seek(0)
            line = stream.read()
    assert json.loads(line)["level"] == "warning"
    monkeypatch.setenv("JOURNAL_STREAM", "not-a-pair")
    assert not logs.is_journal(sys.stderr)


def test_console_lines_to_the_journal_are_prefixed_line_by_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `logging.format: console`, a multi-line entry (a traceback) keeps its priority on every line."""
    with (tmp_path / "journal").open("w+", encoding="utf-8") as stream:
        journal_env(monkeypatch, stream)
        logs.configure("info", "console", stream)
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger().exception("it_failed")
        stream.seek(0)
        lines = [line for line in stream.read().splitlines() if line]
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines), lines


def test_plain_error_lines_carry_the_error_priority_on_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command's `rostersync: ...` error line is <3> on the journal and unchanged elsewhere."""
    assert logs.stderr_line("rostersync: x") == "rostersync: x"
    with (tmp_path / "journal").open("w+", encoding="utf-8") as stream:
        journal_env(monkeypatch, stream)
        monkeypatch.setattr(sys, "stderr", stream)
        assert logs.stderr_line("rostersync: x") == "<3>rostersync: x"
        assert logs.stderr_line("rostersync: x", "warning") == "<4>rostersync: x"


def test_a_notice_is_a_json_line_off_a_terminal_whatever_the_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command's notice reaches a pipe as JSON even when logging.level would hide info lines."""
    logs.configure("warning", "json")
    logs.notice("resync_processing_here", "processing the queue here", jobs=3)
    line = json.loads(capsys.readouterr().err)
    assert line["event"] == "resync_processing_here" and line["level"] == "info"
    assert line["message"] == "processing the queue here" and line["jobs"] == 3


def test_a_notice_is_plain_text_with_console_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """With console logs (a terminal, or `format: console`) a notice reads as a sentence."""
    logs.configure("info", "console")
    logs.notice("resync_no_daemon", "no daemon is running", "warning")
    assert capsys.readouterr().err == "rostersync: no daemon is running\n"


# -- the CLI as a process -----------------------------------------------------------------------


def _sample_config(tmp_path: Path, level: str = "info") -> Path:
    shutil.copytree(REPO / "config" / "sample-district", tmp_path / "sample-district")
    data: dict[str, Any] = yaml.safe_load((REPO / "config" / "rostersync.example.yaml").read_text())
    data["database"] = "sqlite:///rostersync.db"
    data["logging"] = {"level": level, "format": "auto"}
    path = tmp_path / "rostersync.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    return {**env, **extra}


@pytest.mark.slow
def test_sync_piped_writes_only_json_lines_to_stderr(tmp_path: Path) -> None:
    """`rostersync sync 2>&1 >/dev/null | jq .event` works: no progress line, only JSON."""
    config = _sample_config(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "rostersync", "--config", str(config), "sync"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line)["event"] for line in done.stderr.splitlines()]
    assert "sync_started" in events and "sync_applied" in events
    if shutil.which("jq"):
        piped = subprocess.run(
            ["jq", "-r", ".event"], input=done.stderr, capture_output=True, text=True, check=True
        )
        assert piped.stdout.splitlines() == events


@pytest.mark.slow
def test_a_command_whose_stderr_is_the_journal_prefixes_every_line(tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM naming stderr) each log line has its priority, and a
    warning is <4>, so `journalctl -p warning` finds it."""
    config = _sample_config(tmp_path)
    journal = tmp_path / "journal"
    with journal.open("w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        for command in (["sync"], ["resync", "--all"]):
            done = subprocess.run(
                [sys.executable, "-m", "rostersync", "--config", str(config), *command],
                stdout=subprocess.DEVNULL,
                stderr=stream,
                timeout=120,
                env=_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
                check=False,
            )
            assert done.returncode == 0, journal.read_text(encoding="utf-8")
    lines = journal.read_text(encoding="utf-8").splitlines()
    assert lines
    by_event = {}
    for line in lines:
        assert line[:1] == "<" and line[2:3] == ">", line
        event = json.loads(line[3:])
        assert logs.priority_prefix(event["level"]) == line[:3]
        by_event[event["event"]] = line[:3]
    assert by_event["sync_started"] == "<6>"
    assert by_event["resync_no_daemon"] == "<4>"  # no daemon runs: a warning


class _GoneReader(io.StringIO):
    """stderr whose reader went away: every write is a broken pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_log_line_to_a_reader_that_went_away_raises_nothing() -> None:
    """A closed pipe on stderr loses the log lines, not the program."""
    try:
        logs.configure("info", "json", _GoneReader())
        structlog.get_logger().info("anything", n=1)
        structlog.get_logger().warning("again")
    finally:
        logs.configure("info", "json")


def test_the_daemon_stops_on_sigterm_when_its_log_reader_is_gone(tmp_path: Path) -> None:
    """`rostersync run 2>&1 | head -3`: once head has exited, SIGTERM still stops the daemon
    (it hung: the stop handler's log line raised before it set the stop)."""
    import signal
    import time

    from tests.daemon.conftest import SAMPLE, base_config, write_config

    config = base_config(f"sqlite:///{tmp_path / 'rs.db'}")
    config["sources"]["sample"]["schedule"] = {"interval": "1h", "jitter": 0}
    path = write_config(tmp_path / "rostersync.yaml", config)
    assert SAMPLE.is_dir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "rostersync", "--config", str(path), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert daemon.stderr is not None
        # The database's set-up and the schedules come first, then daemon_started.
        first = b""
        for _ in range(10):
            first += daemon.stderr.readline()
            if b"daemon_started" in first:
                break
        assert b"daemon_started" in first, first
        started = json.loads(first.splitlines()[-1])
        assert started["database"] == str(tmp_path / "rs.db")  # the file, not a repr
        daemon.stderr.close()  # the reader goes away
        time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()


def test_a_urls_password_is_masked_wherever_it_appears() -> None:
    """A URL's ``user:password@`` (a database URL in an error, a base URL with credentials)
    keeps its user and host and loses its password, in logs and messages alike."""
    text = (
        "cannot open postgresql+psycopg://rs:Pg-Secret-9@db.internal:5432/rs; retry http://a:b@h/"
    )
    assert logs.scrub(text) == (
        "cannot open postgresql+psycopg://rs:***@db.internal:5432/rs; retry http://a:***@h/"
    )
    assert logs.scrub("sqlite:////var/lib/rostersync/rs.db and https://h:443/x") == (
        "sqlite:////var/lib/rostersync/rs.db and https://h:443/x"
    )
