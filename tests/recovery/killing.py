"""Kill real `rostersync sync` processes with SIGKILL at random instants, then sync again.

The test (``test_processes.py``) runs a handful of kills; run many more by hand::

    python -m tests.recovery.killing --kills 30 [--database postgres] [--seed N]

With ``--approve`` it kills ``runs approve`` of a held run instead (see approval_attack).

A fake OneRoster server in this process serves a generated district of about 5,000 people and
26,000 enrollments, enough for the sync to use its decode workers. Each trial starts
``rostersync sync``, kills it after a random delay (anywhere from start-up to the drain of
the resync jobs), checks that every process it started (decode workers, forkserver, resource
tracker) exits too, and goes on with the next trial on the same database. At the end one more
``sync`` must succeed, and the directory must equal that of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Connection, text

from rostersync.resync.queue import INTERRUPTED_ERROR
from rostersync.store.db import Store
from rostersync.sync.staging import STAGING
from tests.recovery.procs_helpers import descendants, wait_all_gone

REPO = Path(__file__).resolve().parents[2]
SOURCE = "district"
#: The district: one collection (enrollments) is over the decode pool's 20,000 records.
SIZE = {"schools": 4, "teachers": 240, "students": 5000, "classes": 1000}
PHASE_EVENTS = (
    ("sync_started", "fetch"),
    ("fetch_done", "apply"),
    ("held_run_approval_started", "apply"),
    ("sync_applied", "drain"),
    ("held_run_approved", "drain"),
)


@contextlib.contextmanager
def fake_server(seed: int = 5) -> Iterator[Any]:
    """The fake server (a ``FakeOneRoster``) with the district."""
    from tests.benchmarks.bench_oneroster import Scale, aged_roster
    from tests.fakes.oneroster_server import FakeOneRoster

    roster = aged_roster(Scale(**SIZE), seed)
    with FakeOneRoster(roster, record_requests=False) as srv:
        yield srv


def source_of(server: Any) -> dict[str, Any]:
    """The config block of a source on :func:`fake_server`."""
    config: dict[str, Any] = server.source_config(page_size=1000, decode_workers=2)
    return config


@contextlib.contextmanager
def fake_district(seed: int = 5) -> Iterator[dict[str, Any]]:
    """The fake server with the district; yields the source's config block."""
    with fake_server(seed) as srv:
        yield source_of(srv)


@dataclass
class Trial:
    delay: float
    phase: str  # where the kill found the sync: startup, fetch, apply, drain, or done
    exit_code: int | None  # None: killed
    stderr: str


class Bench:
    """One config and database; syncs started, killed and inspected."""

    def __init__(
        self,
        workdir: Path,
        database: str,
        source: dict[str, Any],
        safety: dict[str, Any] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.database = database
        self.config = workdir / "rostersync.yaml"
        config = {
            "organization": "Springfield Public Schools",
            "database": database,
            "roles": ["Teacher"],
            "sites": ["North High"],
            "provisioning": {"default_role": "Teacher", "default_site": "North High"},
            "logging": {"level": "info", "format": "json"},
            "sources": {SOURCE: source},
            **({"safety": safety} if safety is not None else {}),
        }
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rostersync", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=self._env(),
            check=False,
        )

    def sync(self) -> tuple[subprocess.CompletedProcess[str], float]:
        """One sync to its end; also the seconds from its `sync_started` to its exit."""
        done = self.cli("sync")
        ended = datetime.now(UTC)
        started = next(
            (e["timestamp"] for e in events(done.stderr) if e.get("event") == "sync_started"),
            None,
        )
        seconds = (ended - datetime.fromisoformat(started)).total_seconds() if started else 0.0
        return done, seconds

    def kill_after(
        self,
        delay: float,
        *,
        after: str | None = "sync_started",
        command: tuple[str, ...] = ("sync",),
    ) -> Trial:
        """Start ``command`` (a sync), SIGKILL it ``delay`` seconds after it logged the event
        ``after`` (None: after the process started, to hit its start-up), and wait until every
        process it started has exited."""
        log = self.workdir / f"{command[0]}-{uuid.uuid4().hex[:8]}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rostersync", "--config", str(self.config), *command],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
                env=self._env(),
            )
            deadline = time.monotonic() + 120
            while after and proc.poll() is None and time.monotonic() < deadline:
                if f'"event": "{after}"' in log.read_text(encoding="utf-8", errors="replace"):
                    break
                time.sleep(0.01)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                below = descendants(proc.pid)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                wait_all_gone(below, 30, "the killed sync's child processes to exit")
                code = None
            else:
                code = proc.returncode
        stderr = log.read_text(encoding="utf-8", errors="replace")
        return Trial(delay, "done" if code is not None else phase_of(stderr), code, stderr)

    def snapshot(self) -> Callable[[], None] | None:
        """A SQLite database's files copied now; returns what puts them back (None for other
        databases). Only while no process has the database open."""
        if not self.database.startswith("sqlite:///"):
            return None
        path = Path(self.database.removeprefix("sqlite:///"))
        files = [path.with_name(path.name + suffix) for suffix in ("", "-wal")]
        saved = {f: f.read_bytes() for f in files if f.exists()}

        def restore() -> None:
            for f in [*files, path.with_name(path.name + "-shm")]:
                f.unlink(missing_ok=True)
            for f, data in saved.items():
                f.write_bytes(data)

        return restore

    def directory(self) -> tuple[Any, Any]:
        """Users and groups as `users list --json` and `groups list --json` show them."""
        users = self.cli("users", "list", "--json")
        groups = self.cli("groups", "list", "--json")
        assert users.returncode == 0 and groups.returncode == 0, users.stderr + groups.stderr
        return canonical(json.loads(users.stdout)), canonical(json.loads(groups.stdout))

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction on the database, with a store opened and disposed of for it."""
        store = Store(self.database)
        try:
            with store.read() as conn:
                yield conn
        finally:
            store.dispose()

    def leftovers(self) -> dict[str, int]:
        """What a finished, uninterrupted state must not hold."""
        with self.read() as conn:

            def count(sql: str, **params: Any) -> int:
                return int(conn.execute(text(sql), params).scalar_one())

            return {
                "running runs": count("SELECT count(*) FROM sync_run WHERE status = 'running'"),
                "staged rows": sum(
                    count(f"SELECT count(*) FROM {t.name}") for t in STAGING.values()
                ),
                "unfinished jobs": count(
                    "SELECT count(*) FROM resync_job WHERE state <> 'succeeded' "
                    "AND NOT (state = 'failed' AND last_error = :given_up)",
                    given_up=INTERRUPTED_ERROR,
                ),
                "source leases": count("SELECT count(*) FROM source_lease"),
                "registered processes": count("SELECT count(*) FROM instance"),
            }

    def given_up(self) -> list[str]:
        """The users whose resync jobs failed for good because the processes running them were
        killed ``MAX_INTERRUPTIONS`` times (a job that keeps killing its process must not
        crash-loop the daemon): with drains killed again and again, the designed outcome."""
        with self.read() as conn:
            rows = conn.execute(
                text(
                    'SELECT DISTINCT u.email FROM resync_job j JOIN "user" u '
                    "ON u.id = j.user_id WHERE j.state = 'failed' AND j.last_error = :e"
                ),
                {"e": INTERRUPTED_ERROR},
            )
            return sorted(str(email) for (email,) in rows)


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines among a command's stderr (progress lines are plain text)."""
    out = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out


def phase_of(stderr: str) -> str:
    phase = "startup"
    for event in events(stderr):
        for name, after in PHASE_EVENTS:
            if event.get("event") == name:
                phase = after
    return phase


def canonical(value: Any) -> Any:
    """Lists sorted (as JSON text), so that equal directories compare equal on any backend."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    return value


def run_trials(
    bench: Bench, reference: tuple[Any, Any], seconds: float, kills: int, seed: int
) -> Counter[str]:
    """``kills`` trials, then a final sync; fails on anything left wrong. Half the kills fall
    anywhere in an uninterrupted sync's ``seconds`` from its start; the others are aimed at
    the short phases: the command's start-up, the apply (after the fetch ended) and the
    drain (after the apply committed). Returns how many kills found each phase."""
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    aims: list[tuple[str | None, float]] = [
        (None, 2.0),  # start-up: recovery, taking the lease
        ("fetch_done", 0.4),
        ("sync_applied", 1.0),
    ]
    for n in range(kills):
        if rng.random() < 0.5:
            after, within = aims[rng.randrange(len(aims))]
            trial = bench.kill_after(rng.uniform(0.0, within), after=after)
        else:
            trial = bench.kill_after(rng.uniform(0.0, seconds * 1.2))
        phases[trial.phase] += 1
        assert "is being synced by" not in trial.stderr, f"trial {n} (seed {seed}):\n{trial.stderr}"
        assert trial.exit_code in (None, 0), f"trial {n} (seed {seed}):\n{trial.stderr[-3000:]}"
    final, _ = bench.sync()
    assert final.returncode == 0, f"seed {seed}:\n{final.stdout}\n{final.stderr[-3000:]}"
    if given_up := bench.given_up():
        # What the job's error tells an operator to do.
        phases["jobs given up after kills"] += len(given_up)
        users = [arg for email in given_up for arg in ("--user", email)]
        resynced = bench.cli("resync", *users, "--wait")
        assert resynced.returncode == 0, f"seed {seed}:\n{resynced.stderr[-3000:]}"
    left = bench.leftovers()
    assert left == dict.fromkeys(left, 0), f"seed {seed}: left behind {left}"
    assert bench.directory() == reference, f"seed {seed}: the directory differs"
    return phases


#: Safety limits that hold the run after :func:`remove_teachers`, to be approved.
HOLDING = {"max_removals": 5, "max_removal_percent": 100}


def remove_teachers(server: Any, count: int) -> list[str]:
    """Take ``count`` teachers with classes out of the fake server's feed (their users are to
    be archived, more than :data:`HOLDING` lets a run do); returns their sourcedIds."""
    enrolled = sorted({e.user_id for e in server.roster.enrollments if e.role == "teacher"})
    gone = enrolled[:count]
    for sourced_id in gone:
        server.remove("user", sourced_id)
    return gone


def held_run(bench: Bench) -> int:
    """A sync that the safety limits hold; returns its run id."""
    done = bench.cli("sync", "--json")
    assert done.returncode == 1, done.stderr[-3000:]
    (run,) = json.loads(done.stdout)["runs"]
    assert run["status"] == "held", run
    return int(run["id"])


def run_status(bench: Bench, run_id: int) -> tuple[str, bool]:
    """The run's stored status and whether its apply committed (``approved_at`` alone is
    set when an approval starts)."""
    with bench.read() as conn:
        status = conn.execute(
            text("SELECT status FROM sync_run WHERE id = :r"), {"r": run_id}
        ).scalar_one()
    return str(status), str(status) not in ("held", "running")


def run_approval_trials(
    bench: Bench,
    run_id: int,
    before: tuple[Any, Any],
    reference: tuple[Any, Any],
    timing: tuple[float, float],
    kills: int,
    seed: int,
) -> Counter[str]:
    """``kills`` trials of ``runs approve`` killed at random instants, each checked: until an
    approval's apply commits, the directory is the one before it (the apply is one
    transaction), and the run is held again once the next command has recovered; after it
    has, the users are the approved run's at once, and after one more sync (which drains the
    queue the killed approval left) the directory is the uninterrupted approval's, with no
    running run, staged row, unfinished job or lease. ``timing``: the uninterrupted approval's
    seconds in all and in its apply. A SQLite database goes back to its held state after an
    applied trial, so every trial kills an approval; on others the trials end there.
    Returns how many kills found each phase."""
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    seconds, applying = timing
    approve = ("runs", "approve", str(run_id), "--yes")
    restore = bench.snapshot()

    def finish(where: str) -> None:
        if not run_status(bench, run_id)[1]:
            done = bench.cli(*approve)
            assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"
        final = bench.cli("sync")
        assert final.returncode == 0, f"{where}\n{final.stdout}\n{final.stderr[-3000:]}"
        assert run_status(bench, run_id)[1], where
        assert bench.leftovers() == dict.fromkeys(bench.leftovers(), 0), where
        assert bench.directory() == reference, f"{where}\nthe directory differs"

    for n in range(kills):
        aim = rng.randrange(3)
        if aim == 0:  # the apply: one transaction
            delay, after = rng.uniform(0.0, applying * 1.5), "held_run_approval_started"
        elif aim == 1:  # the drain of the jobs it queued
            delay, after = rng.uniform(0.0, 1.0), "held_run_approved"
        else:  # anywhere, start-up included
            delay, after = rng.uniform(0.0, seconds * 1.2), None
        trial = bench.kill_after(delay, after=after, command=approve)
        phases[trial.phase] += 1
        where = f"trial {n} (seed {seed}, {trial.phase}):\n{trial.stderr[-3000:]}"
        status, applied = run_status(bench, run_id)
        if trial.exit_code is not None:
            assert trial.exit_code == 0 and applied, where
        users, groups = bench.directory()
        if not applied:
            assert (users, groups) == before, f"{where}\nthe directory changed, run {status}"
            continue
        assert users == reference[0], f"{where}\nthe users are not the approved run's"
        finish(where)
        if restore is None:
            return phases
        restore()
    finish(f"seed {seed}, after the trials")
    return phases


def approval_attack(
    server: Any, workdir: Path, database: str, kills: int, seed: int
) -> Counter[str]:
    """Two databases synced from ``server``; teachers leave the feed, so the next sync of
    each is held; one approval runs uninterrupted (the reference), the other is killed
    ``kills`` times (:func:`run_approval_trials`)."""
    source = source_of(server)
    ref = Bench(
        workdir / "reference", f"sqlite:///{workdir / 'reference' / 'rs.db'}", source, HOLDING
    )
    bench = Bench(workdir / "killed", database, source, HOLDING)
    for each in (ref, bench):
        done, _ = each.sync()
        assert done.returncode == 0, done.stderr[-3000:]
    before = bench.directory()
    remove_teachers(server, 12)
    held = held_run(ref)
    started = time.monotonic()
    done = ref.cli("runs", "approve", str(held), "--yes")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    stamps = {e["event"]: datetime.fromisoformat(e["timestamp"]) for e in events(done.stderr)}
    applying = stamps["held_run_approved"] - stamps["held_run_approval_started"]
    assert ref.cli("sync").returncode == 0
    reference = ref.directory()
    assert reference != before  # the approval archived the teachers who left
    run_id = held_run(bench)
    assert bench.directory() == before  # a held run changes nothing
    timing = (seconds, applying.total_seconds())
    return run_approval_trials(bench, run_id, before, reference, timing, kills, seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--approve",
        action="store_true",
        help="kill `runs approve` of a held run instead of syncs",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    import tempfile

    if args.approve:
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server = stack.enter_context(fake_server())
            if args.database == "postgres":
                database = stack.enter_context(_postgres_schema())
            else:
                database = f"sqlite:///{workdir / 'killed' / 'rs.db'}"
            print(f"seed {seed}", flush=True)
            phases = approval_attack(server, workdir, database, args.kills, seed)
        print(f"{args.kills} killed approvals on {args.database}, all recovered: {dict(phases)}")
        return 0
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        source = stack.enter_context(fake_district())
        ref = Bench(workdir / "reference", f"sqlite:///{workdir / 'reference' / 'rs.db'}", source)
        done, seconds = ref.sync()
        assert done.returncode == 0, done.stderr[-3000:]
        reference = ref.directory()
        if args.database == "postgres":
            database = stack.enter_context(_postgres_schema())
        else:
            database = f"sqlite:///{workdir / 'killed' / 'rs.db'}"
        bench = Bench(workdir / "killed", database, source)
        print(f"uninterrupted sync: {seconds:.1f}s; seed {seed}", flush=True)
        phases = run_trials(bench, reference, seconds, args.kills, seed)
    print(f"{args.kills} kills on {args.database}, all recovered: {dict(phases)}")
    return 0


@contextlib.contextmanager
def _postgres_schema() -> Iterator[str]:
    import psycopg

    from tests.conftest import PG_BASE

    schema = f"rs_{uuid.uuid4().hex[:12]}"
    dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
