"""Debris of dead processes, planted in a store: leases, running runs with staging, leased jobs."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from rostersync.daemon import procs
from rostersync.source.records import RosterPerson
from rostersync.source.rows import StagedBatch, sort_batch
from rostersync.store.db import Store, utcnow
from rostersync.sync.staging import STAGING, stage
from tests.daemon.conftest import daemons, notify_socket, pg_url  # noqa: F401 - fixtures


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of this host that is not us."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    started: int | None
    scope: str | None


def local_holder(pid: int, *, started: int | None = None) -> Holder:
    host = socket.gethostname()
    return Holder(f"{host}:{pid}", host, pid, started or procs.start_ticks(pid), procs.pid_scope())


def remote_holder(pid: int = 4242) -> Holder:
    return Holder(f"far-away:{pid}", "far-away", pid, 1234, "another-boot/pid:[1]")


def register(
    store: Store, holder: Holder, *, kind: str = "command", beat: datetime | None = None
) -> None:
    now = utcnow()
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO instance (id, kind, host, pid, pid_started, pid_scope, started_at, "
                "heartbeat_at) VALUES (:id, :k, :h, :p, :s, :sc, :n, :b)"
            ),
            {
                "id": holder.owner,
                "k": kind,
                "h": holder.host,
                "p": holder.pid,
                "s": holder.started,
                "sc": holder.scope,
                "n": now,
                "b": beat or now,
            },
        )


def lease(store: Store, source: str, owner: str, expires_in: timedelta) -> None:
    with store.write() as conn:
        conn.execute(
            text("INSERT INTO source_lease (source, owner, expires_at) VALUES (:s, :o, :e)"),
            {"s": source, "o": owner, "e": utcnow() + expires_in},
        )


def running_run(store: Store, source: str, *, staged: int = 3) -> int:
    """A run left `running`, with a few staged person rows."""
    with store.write() as conn:
        run_id = int(
            conn.execute(
                text(
                    "INSERT INTO sync_run (source, mode, requested_mode, trigger, status, dry_run, "
                    "started_at, counts, fetched, warnings) VALUES (:s, 'full', 'full', 'cli', "
                    "'running', :no, :n, '{}', '{}', '[]') RETURNING id"
                ),
                {"s": source, "n": utcnow(), "no": False},
            ).scalar_one()
        )
        people = [
            RosterPerson(f"p-{i}", "student", "S", str(i), None, f"s{i}") for i in range(staged)
        ]
        batch: StagedBatch = sort_batch(people)
        stage(conn, run_id, batch)
    return run_id


def staged_rows(store: Store, run_id: int) -> int:
    with store.read() as conn:
        return sum(
            int(
                conn.execute(
                    text(f"SELECT count(*) FROM {t.name} WHERE run_id = :r"), {"r": run_id}
                ).scalar_one()
            )
            for t in STAGING.values()
        )


def run_row(store: Store, run_id: int) -> tuple[str, str | None]:
    with store.read() as conn:
        row = conn.execute(
            text("SELECT status, error FROM sync_run WHERE id = :r"), {"r": run_id}
        ).one()
    return row[0], row[1]


def lease_owner(store: Store, source: str) -> str | None:
    with store.read() as conn:
        owner: str | None = conn.execute(
            text("SELECT owner FROM source_lease WHERE source = :s"), {"s": source}
        ).scalar()
    return owner


def leased_job(store: Store, email: str, owner: str, *, attempts: int = 1) -> int:
    """A user and a job of theirs leased by ``owner``."""
    now = utcnow()
    with store.write() as conn:
        user_id = conn.execute(
            text(
                'INSERT INTO "user" (email, display_name, status, archived_by_sync, delegated, '
                "created_at, updated_at) VALUES (:e, 'X', 'active', :no, :no, :n, :n) RETURNING id"
            ),
            {"e": email, "n": now, "no": False},
        ).scalar_one()
        return int(
            conn.execute(
                text(
                    "INSERT INTO resync_job (user_id, state, reason, live, attempts, run_after, "
                    "created_at, result, lease_owner, lease_expires) VALUES (:u, 'running', "
                    "'manual resync', :no, :a, :n, :n, '{}', :o, :x) RETURNING id"
                ),
                {
                    "u": user_id,
                    "a": attempts,
                    "n": now,
                    "no": False,
                    "o": owner,
                    "x": now + timedelta(minutes=5),
                },
            ).scalar_one()
        )
