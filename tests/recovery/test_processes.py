"""Real processes killed or stopped mid-run: the next sync succeeds and the directory is the
one an uninterrupted run gives; a daemon whose stop cut a sync off leaves nothing behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.resync.queue import INTERRUPTED_ERROR
from rostersync.sampledata import DistrictSpec, generate_district
from rostersync.store.db import Store
from tests.daemon.conftest import (
    DaemonProcess,
    NotifySocket,
    base_config,
    sqlite_url,
    wait_until,
    write_config,
)
from tests.fakes.oneroster_server import FakeOneRoster, Faults
from tests.recovery.conftest import run_row, staged_rows
from tests.recovery.killing import (
    REPO,
    Bench,
    approval_attack,
    fake_district,
    fake_server,
    run_trials,
    source_of,
)
from tests.recovery.procs_helpers import descendants, wait_all_gone

pytestmark = pytest.mark.slow

#: Kills per backend in CI; `python -m tests.recovery.killing --kills N` runs many more.
KILLS = int(os.environ.get("ROSTERSYNC_TEST_KILLS", "3"))


@pytest.fixture(scope="module")
def district() -> Iterator[dict[str, Any]]:
    with fake_district() as source:
        yield source


@pytest.fixture(scope="module")
def reference(
    district: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[tuple[Any, Any], float]:
    """The directory after one uninterrupted sync, and how long that sync took."""
    workdir = tmp_path_factory.mktemp("reference")
    bench = Bench(workdir, f"sqlite:///{workdir / 'rs.db'}", district)
    done, seconds = bench.sync()
    assert done.returncode == 0, done.stderr[-3000:]
    return bench.directory(), seconds


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_syncs_killed_at_random_instants_then_a_sync_gives_the_uninterrupted_directory(
    backend: str,
    district: dict[str, Any],
    reference: tuple[tuple[Any, Any], float],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL during start-up, fetch, apply or drain: no later sync is refused as busy, the
    killed sync's decode processes exit, and the final sync leaves no running run, staged row,
    unfinished job or lease, and the directory of an uninterrupted run."""
    database = request.getfixturevalue("pg_url") if backend == "postgres" else sqlite_url(tmp_path)
    directory, seconds = reference
    seed = random.randrange(1 << 30)
    print(f"seed {seed} (`python -m tests.recovery.killing --kills {KILLS} --seed {seed}`)")
    phases = run_trials(Bench(tmp_path, database, district), directory, seconds, KILLS, seed)
    print(f"{KILLS} kills on {backend}: {dict(phases)}")


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_approvals_killed_at_random_instants_apply_all_or_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL of `runs approve` during its start-up, its apply or its drain: until the apply
    commits the directory is as before and the run is approvable again; after it, one more
    sync finishes the drain, is not held for the removals approved, and gives the directory
    of an uninterrupted approval (tests.recovery.killing.run_approval_trials)."""
    database = request.getfixturevalue("pg_url") if backend == "postgres" else sqlite_url(tmp_path)
    seed = random.randrange(1 << 30)
    print(
        f"seed {seed} (`python -m tests.recovery.killing --approve --kills {KILLS} --seed {seed}`)"
    )
    with fake_server() as server:
        phases = approval_attack(server, tmp_path, database, KILLS, seed)
    print(f"{KILLS} killed approvals on {backend}: {dict(phases)}")
    assert sum(phases.values()) >= 1


def test_a_daemon_stopped_mid_sync_fails_the_run_and_clears_its_staging(
    tmp_path: Path,
    notify_socket: NotifySocket,
    daemons: Callable[..., DaemonProcess],
) -> None:
    """SIGTERM with a sync still fetching past --stop-timeout: the run is failed ("interrupted:
    the daemon stopped"), its staged rows are gone, and no lease or registration is left."""
    roster = generate_district(DistrictSpec(seed=3, teachers=20, students=400, classes=40))
    with FakeOneRoster(roster, faults=Faults(delay=0.2), record_requests=False) as srv:
        url = sqlite_url(tmp_path)
        cfg = base_config(url)
        cfg["sources"] = {
            "district": srv.source_config(page_size=20, schedule={"interval": "1h", "jitter": 0})
        }
        config = write_config(tmp_path / "rostersync.yaml", cfg)
        store = Store(url)
        d = daemons(config, notify_socket, "--stop-timeout", "0.5")
        notify_socket.wait_for("READY", "1")
        run_id = wait_until(
            lambda: _scalar(store, "SELECT max(id) FROM sync_run WHERE status = 'running'"),
            30,
            "a running sync",
        )
        wait_until(lambda: staged_rows(store, run_id), 30, "rows staged by the sync")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(30) == 0
    assert run_row(store, run_id) == ("failed", "interrupted: the daemon stopped")
    assert staged_rows(store, run_id) == 0
    assert _scalar(store, "SELECT count(*) FROM source_lease") == 0
    assert _scalar(store, "SELECT count(*) FROM instance") == 0
    assert d.wait_event("drain_cut_short")["unfinished"] >= 1
    store.dispose()


def _scalar(store: Store, sql: str) -> Any:
    with store.read() as conn:
        return conn.execute(text(sql)).scalar()


def test_a_job_given_up_after_repeated_kills_is_resynced_as_its_error_says(
    district: dict[str, Any], reference: tuple[tuple[Any, Any], float], tmp_path: Path
) -> None:
    """Kills that land in drain after drain can interrupt one job MAX_INTERRUPTIONS times: it
    fails for good by design. The attack then does what the job's error tells an operator
    (`rostersync resync --user EMAIL`) and still requires the uninterrupted directory; any
    other unfinished job is still a leftover."""
    directory, seconds = reference
    bench = Bench(tmp_path, sqlite_url(tmp_path), district)
    done, _ = bench.sync()
    assert done.returncode == 0, done.stderr[-3000:]
    store = Store(sqlite_url(tmp_path))
    try:
        with store.write() as conn:
            uid = conn.execute(text("SELECT min(user_id) FROM group_owner")).scalar_one()
            # As if its last job had been killed three times before it built the groups.
            conn.execute(
                text(
                    "UPDATE resync_job SET state = 'failed', last_error = :e "
                    "WHERE id = (SELECT max(id) FROM resync_job WHERE user_id = :u)"
                ),
                {"e": INTERRUPTED_ERROR, "u": uid},
            )
            owned = "SELECT group_id FROM group_owner WHERE user_id = :u"
            conn.execute(text(f"DELETE FROM group_member WHERE group_id IN ({owned})"), {"u": uid})
            conn.execute(text(f"DELETE FROM groups WHERE id IN ({owned})"), {"u": uid})
    finally:
        store.dispose()
    assert bench.directory() != directory
    assert bench.given_up() != []
    phases = run_trials(bench, directory, seconds, 0, 1)
    assert phases["jobs given up after kills"] == 1
    assert bench.leftovers()["unfinished jobs"] == 0


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_sync_stopped_by_ctrl_c_or_sigterm_ends_its_run_as_interrupted_saying_only_json(
    tmp_path: Path, how: str
) -> None:
    """Ctrl-C (SIGINT to the whole process group, decode workers included) or SIGTERM (a
    timer's stop) while the workers decode: the command exits 1 within seconds, its run is
    failed as interrupted at once (not by the next command's recovery), the source is free,
    every line on stderr is JSON but the last, which says so (no worker's KeyboardInterrupt
    traceback, no resource tracker warning), and no process it started is left."""
    with fake_server() as srv:
        srv.faults = Faults(delay=0.15)  # pages slow enough to stop the fetch half-way
        bench = Bench(tmp_path, sqlite_url(tmp_path), source_of(srv))
        log = tmp_path / "sync.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rostersync",
                    "--config",
                    str(bench.config),
                    "sync",
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=bench._env(),
                start_new_session=True,  # its own process group, as a terminal's job
            )
            wait_until(lambda: b'"decode pool started"' in log.read_bytes(), 120, "the pool")
            below = descendants(proc.pid)
            assert below, "no decode worker to interrupt"
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        wait_all_gone(below, 30, "the stopped sync's child processes to exit")
    assert proc.returncode == 1
    *logged, last = log.read_text(encoding="utf-8").splitlines()
    assert [line for line in logged if not line.startswith("{")] == []
    assert last == "rostersync: stopped: a run it had not finished is failed as interrupted"
    with bench.read() as conn:
        status, error = conn.execute(text("SELECT status, error FROM sync_run")).one()
        leases = conn.execute(text("SELECT count(*) FROM source_lease")).scalar_one()
    assert status == "failed" and error.startswith("interrupted: the command was stopped"), error
    assert leases == 0
