"""The daemon as systemd runs it: real processes on SQLite, a test NOTIFY_SOCKET, signals."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.store.db import Store, as_utc
from rostersync.sync.staging import STAGING
from tests.daemon.conftest import (
    SAMPLE,
    SAMPLE_TEACHERS,
    DaemonProcess,
    NotifySocket,
    base_config,
    cli,
    sqlite_url,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow


def _rows(store: Store, sql: str, **params: Any) -> list[Any]:
    with store.read() as conn:
        return list(conn.execute(text(sql), params).all())


def _assert_directory_consistent(store: Store) -> None:
    users = _rows(store, 'SELECT lower(email) FROM "user"')
    assert len(users) == len({u[0] for u in users}), "duplicate users"
    assert len(users) == SAMPLE_TEACHERS
    running = _rows(store, "SELECT id FROM sync_run WHERE status = 'running'")
    assert running == [], f"runs left running: {running}"


def test_daemon_is_ready_runs_its_schedule_and_serves_a_resync_within_5s(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """READY=1 and STATUS reach systemd, the schedule runs, and a resync from another process is done within 5 s."""
    url = sqlite_url(tmp_path)
    config = write_config(tmp_path / "rostersync.yaml", base_config(url))
    d = daemons(config, notify_socket)
    ready = notify_socket.wait_for("READY", "1")
    assert "STATUS" in ready and "sample" in ready["STATUS"]
    store = Store(url)
    wait_until(
        lambda: (
            len(
                _rows(
                    store,
                    "SELECT id FROM sync_run WHERE trigger IN ('startup', 'schedule') "
                    "AND status <> 'running'",
                )
            )
            >= 2
        ),
        15,
        "two scheduled runs",
    )
    # The source had never synced: its first run is the start's catch-up, then the schedule.
    triggers = [t for (t,) in _rows(store, "SELECT trigger FROM sync_run ORDER BY id")]
    assert triggers[0] == "startup" and set(triggers[1:]) == {"schedule"}, triggers
    assert any("sample: succeeded" in f.get("STATUS", "") for f in notify_socket.fields())
    wait_until(
        lambda: not _rows(store, "SELECT id FROM resync_job WHERE state <> 'succeeded'"),
        10,
        "first resyncs",
    )

    email = _rows(store, 'SELECT email FROM "user" ORDER BY id LIMIT 1')[0][0]
    started = time.monotonic()
    done = cli(config, "resync", "--user", email, "--wait", "--timeout", "10", "--json")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)["jobs"]
    assert [j["state"] for j in jobs] == ["succeeded"]
    created, finished = _rows(
        store, "SELECT created_at, finished_at FROM resync_job WHERE id = :i", i=jobs[0]["id"]
    )[0]
    pickup = (as_utc(finished) - as_utc(created)).total_seconds()  # type: ignore[operator]
    print(f"SQLite resync queued->done {pickup:.3f}s (resync --wait wall time {elapsed:.2f}s)")
    assert pickup < 5.0

    # Every stderr line is JSON; the sync lines carry source and run_id.
    lines = d.log_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)
    synced = [
        e for e in d.events() if e["event"] in ("sync_started", "fetch_done", "scheduled_sync_done")
    ]
    assert synced and all(e["source"] == "sample" and isinstance(e["run_id"], int) for e in synced)

    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    notify_socket.wait_for("STOPPING", "1", timeout=2)
    _assert_directory_consistent(store)
    store.dispose()


def test_sighup_keeps_the_old_config_when_the_new_one_is_broken_and_applies_a_good_one(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """SIGHUP with a broken config is rejected and logged, the old schedule keeps running; a good config is applied."""
    url = sqlite_url(tmp_path)
    good = base_config(url)
    config = write_config(tmp_path / "rostersync.yaml", good)
    d = daemons(config, notify_socket)
    notify_socket.wait_for("READY", "1")
    store = Store(url)

    config.write_text(
        "organization: [unclosed\nsources: {sample: {type: nope}}\n", encoding="utf-8"
    )
    d.signal(signal.SIGHUP)
    rejected = d.wait_event("config_reload_rejected")
    assert rejected["errors"] and rejected["level"] == "error"
    runs_before = len(_rows(store, "SELECT id FROM sync_run"))
    wait_until(
        lambda: len(_rows(store, "SELECT id FROM sync_run")) >= runs_before + 2,
        15,
        "runs on the old config",
    )
    assert d.proc.poll() is None

    # A cron the scheduler refuses: rejected like any config error, the old schedule stays,
    # and systemd hears READY=1 after RELOADING=1 (it used to wait for it forever).
    bad_cron = {**good["sources"]["sample"], "schedule": {"cron": "0 25 * * *"}}
    write_config(config, base_config(url, sources={"sample": bad_cron}))
    seen = len(notify_socket.fields())
    d.signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING", "1", after=seen)
    notify_socket.wait_for("READY", "1", after=seen + 1)
    rejections = [e for e in d.events() if e["event"] == "config_reload_rejected"]
    assert len(rejections) == 2 and "sources.sample.schedule.cron" in rejections[1]["errors"][0]
    runs_before = len(_rows(store, "SELECT id FROM sync_run"))
    wait_until(
        lambda: len(_rows(store, "SELECT id FROM sync_run")) >= runs_before + 1,
        15,
        "runs on the old schedule after the rejected cron",
    )
    assert "never retrieved" not in d.log_text() and "Traceback" not in d.log_text()

    second = {**good["sources"]["sample"], "schedule": {"interval": "1s", "jitter": 0}}
    write_config(
        config, base_config(url, sources={"sample": good["sources"]["sample"], "second": second})
    )
    d.signal(signal.SIGHUP)
    reloaded = d.wait_event("config_reloaded")
    assert reloaded["sources"] == ["sample", "second"]
    wait_until(
        lambda: _rows(
            store, "SELECT id FROM sync_run WHERE source = 'second' AND status <> 'running'"
        ),
        15,
        "a run of the new source",
    )

    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    store.dispose()


def test_sigterm_during_a_sync_lets_it_finish_and_exits_0(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """SIGTERM while a sync runs: no new work starts, the sync finishes, the daemon exits 0 promptly."""
    url = sqlite_url(tmp_path)
    config = write_config(tmp_path / "rostersync.yaml", base_config(url))
    store = Store(url)
    d = daemons(config, notify_socket)
    notify_socket.wait_for("READY", "1")
    run_id = wait_until(
        lambda: _rows(store, "SELECT id FROM sync_run WHERE status = 'running'"),
        10,
        "a running sync",
        every=0.01,
    )[0][0]
    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(15) == 0
    print(f"SIGTERM during a sync: exited after {time.monotonic() - sent:.2f}s")
    status = _rows(store, "SELECT status FROM sync_run WHERE id = :i", i=run_id)[0][0]
    assert status in ("succeeded", "succeeded_with_errors")
    assert _rows(store, "SELECT count(*) FROM sync_run")[0][0] == run_id  # nothing started after
    draining = d.wait_event("draining")
    assert draining["syncs"] == 1


def test_kill_9_during_a_sync_then_restart_leaves_the_database_consistent(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """kill -9 in the middle of a sync: the restarted daemon fails the orphaned run, frees the source, syncs again, no duplicates."""
    url = sqlite_url(tmp_path)
    config = write_config(tmp_path / "rostersync.yaml", base_config(url))
    store = Store(url)
    first = daemons(config, notify_socket)
    notify_socket.wait_for("READY", "1")
    run_id = wait_until(
        lambda: _rows(store, "SELECT id FROM sync_run WHERE status = 'running'"),
        15,
        "a running sync",
        every=0.01,
    )[0][0]
    first.kill()
    status = _rows(store, "SELECT status FROM sync_run WHERE id = :i", i=run_id)[0][0]

    second = daemons(config, notify_socket)
    if status == "running":  # killed before the apply committed, as intended
        recovered = second.wait_event("recovered_after_crash")
        assert run_id in recovered["interrupted_runs"]
        assert recovered["dead_owners"] == [f"{_hostname()}:{first.pid}"]
        row = _rows(store, "SELECT status, error FROM sync_run WHERE id = :i", i=run_id)[0]
        assert row[0] == "failed" and "interrupted" in row[1]
        for table in STAGING.values():
            assert (
                _rows(store, f"SELECT count(*) FROM {table.name} WHERE run_id = :i", i=run_id)[0][0]
                == 0
            )
    wait_until(
        lambda: _rows(
            store, "SELECT id FROM sync_run WHERE id > :i AND status LIKE 'succeeded%'", i=run_id
        ),
        15,
        "a successful run after the restart",
    )
    wait_until(
        lambda: not _rows(store, "SELECT id FROM resync_job WHERE state <> 'succeeded'"),
        10,
        "resyncs done",
    )
    second.signal(signal.SIGTERM)
    assert second.wait_exit(10) == 0
    _assert_directory_consistent(store)


def test_kill_9_with_leased_jobs_then_restart_requeues_them_at_once(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """Jobs leased by a killed daemon go back to the queue when the next one starts on this host,
    without waiting for their lease (5 min here) to expire and without counting the attempt."""
    url = sqlite_url(tmp_path)
    cfg = base_config(url)
    cfg["resync"] = {**cfg["resync"], "batch_size": 1, "workers": 1, "lease": "5m"}
    cfg["sources"]["sample"]["schedule"] = {"interval": "1h", "jitter": 0}
    config = write_config(tmp_path / "rostersync.yaml", cfg)
    store = Store(url)
    running = "SELECT id FROM resync_job WHERE state = 'running'"
    leased: list[Any] = []
    for _ in range(5):
        first = daemons(config, notify_socket)
        notify_socket.wait_for("READY", "1", after=len(notify_socket.fields()))
        wait_until(lambda: _rows(store, running), 20, "a leased job", every=0.005)
        first.kill()
        leased = _rows(store, running)
        if leased:
            break
        # The kill fell between one job's commit and the worker's next lease, when no job is
        # leased: start again on the jobs left (43 of them, one per batch).
    assert leased, "five kills in a row found no job leased"
    ids = [r[0] for r in leased]

    second = daemons(config, notify_socket)
    recovered = second.wait_event("recovered_after_crash")
    assert recovered["dead_owners"] == [f"{_hostname()}:{first.pid}"]
    assert recovered["requeued_jobs"] == len(ids)
    wait_until(
        lambda: not _rows(store, "SELECT id FROM resync_job WHERE state <> 'succeeded'"),
        20,
        "every job done",
    )
    rows = _rows(
        store, "SELECT attempts FROM resync_job WHERE id IN (" + ",".join(map(str, ids)) + ")"
    )
    assert all(r[0] == 1 for r in rows), rows  # the dead daemon's attempt did not count
    second.signal(signal.SIGTERM)
    assert second.wait_exit(10) == 0
    _assert_directory_consistent(store)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def test_a_scheduled_run_that_is_held_logs_how_to_review_and_approve_it(
    tmp_path: Path, notify_socket: NotifySocket, daemons: Callable[..., DaemonProcess]
) -> None:
    """The journal's `scheduled_sync_done` of a held run says what to run next, as `sync`
    prints it: the commands to review and approve it, with the daemon's --config."""
    drop = tmp_path / "district"
    shutil.copytree(SAMPLE, drop)
    cfg = base_config(sqlite_url(tmp_path), safety={"max_removals": 3})
    cfg["sources"]["sample"]["path"] = str(drop)
    config = write_config(tmp_path / "rostersync.yaml", cfg)
    assert cli(config, "sync").returncode == 0
    users = drop / "users.csv"
    kept = [line for line in users.read_text().splitlines() if not line.startswith("t-000")]
    users.write_text("\n".join(kept) + "\n")
    d = daemons(config, notify_socket)
    done = d.wait_event("scheduled_sync_done", status="held")
    rid = done["run_id"]
    assert done["next"] == (
        f"review with `rostersync --config {config} runs show {rid} --changes`, apply with "
        f"`rostersync --config {config} runs approve {rid}`"
    )
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
