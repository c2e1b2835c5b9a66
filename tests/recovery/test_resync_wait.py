"""`resync --wait`: says what it queued at once; with no daemon alive it processes the jobs
itself and says so; with one it waits for it; a timeout is reported and exits 1."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text

from rostersync.store.db import Store, utcnow
from tests.recovery.conftest import local_holder, register, remote_holder
from tests.recovery.test_commands import TEACHER, invoke, write_config


def synced(tmp_path: Path, sqlite_store: Store) -> Path:
    config = write_config(tmp_path, sqlite_store)
    assert invoke(config, "sync").exit_code == 0
    return config


def job_states(store: Store) -> list[str]:
    with store.read() as conn:
        return [
            r[0]
            for r in conn.execute(
                text("SELECT state FROM resync_job WHERE reason = 'manual resync' ORDER BY id")
            )
        ]


def test_without_a_daemon_wait_processes_the_jobs_here_and_says_so(
    tmp_path: Path, sqlite_store: Store
) -> None:
    """No daemon runs against the database: the command processes the queue itself, saying so."""
    config = synced(tmp_path, sqlite_store)
    result = invoke(config, "resync", "--user", TEACHER, "--wait", "--timeout", "60")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "queued 1 resync job(s)"
    assert "no daemon is running against this database: processing the queue here" in (
        result.stderr
    )
    assert job_states(sqlite_store) == ["succeeded"]


def test_json_mode_prints_one_document_saying_who_processed_the_jobs(
    tmp_path: Path, sqlite_store: Store
) -> None:
    """--json: stdout is one document; it says the command processed the jobs itself."""
    config = synced(tmp_path, sqlite_store)
    result = invoke(config, "resync", "--user", TEACHER, "--wait", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["queued"] == 1 and doc["processed_by"] == "this command"
    assert doc["timed_out"] is False and [j["state"] for j in doc["jobs"]] == ["succeeded"]


def test_with_a_live_daemon_wait_leaves_the_jobs_to_it_and_a_timeout_says_so(
    tmp_path: Path, sqlite_store: Store, sleeper: subprocess.Popen[bytes]
) -> None:
    """A daemon of this host is alive: the command only waits; when the time is up it says how
    many jobs are unfinished and exits 1, and the jobs stay for the daemon."""
    config = synced(tmp_path, sqlite_store)
    register(sqlite_store, local_holder(sleeper.pid), kind="daemon")
    result = invoke(config, "resync", "--user", TEACHER, "--wait", "--timeout", "0.5")
    assert result.exit_code == 1
    assert f"waiting for the daemon {local_holder(sleeper.pid).owner}" in result.stderr
    assert "timed out after 0.5s: 1 of 1 job(s) not finished (1 queued); the daemon goes on" in (
        result.stderr
    )
    assert job_states(sqlite_store) == ["queued"]
    as_json = invoke(config, "resync", "--user", TEACHER, "--wait", "--timeout", "0", "--json")
    assert as_json.exit_code == 1
    doc = json.loads(as_json.stdout)
    assert doc["timed_out"] is True and doc["processed_by"] == "daemon"


def test_a_daemon_elsewhere_whose_heartbeat_stopped_counts_as_gone(
    tmp_path: Path, sqlite_store: Store
) -> None:
    """A daemon of another host that has not beaten within leases.expire_after is not waited for."""
    config = synced(tmp_path, sqlite_store)
    register(sqlite_store, remote_holder(), kind="daemon", beat=utcnow() - timedelta(minutes=5))
    result = invoke(config, "resync", "--user", TEACHER, "--wait", "--timeout", "60")
    assert result.exit_code == 0, result.output
    assert job_states(sqlite_store) == ["succeeded"]


def test_queueing_without_wait_and_without_a_daemon_says_how_the_jobs_get_done(
    tmp_path: Path, sqlite_store: Store
) -> None:
    """Without --wait the jobs are only queued; with no daemon alive the command says so."""
    config = synced(tmp_path, sqlite_store)
    result = invoke(config, "resync", "--user", TEACHER)
    assert result.exit_code == 0
    assert "no daemon is running against this database" in result.stderr
    # The hint is the command to paste, with the --config this one was given.
    assert f"rostersync --config {config} run --once" in result.stderr
    # No half command in backticks to paste (`resync --wait` alone names no user).
    assert "`resync --wait`" not in result.stderr
    assert "(with --wait, resync does it itself)" in result.stderr
    assert job_states(sqlite_store) == ["queued"]
