"""directory.list_jobs: a running job whose process stopped is marked so (read only), and a
limit below 0 is refused."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from sqlalchemy import text

from rostersync import directory
from rostersync.daemon.recovery import stopped_jobs
from rostersync.store.db import Store, utcnow
from tests.recovery.conftest import dead_pid, leased_job, local_holder, register, remote_holder


def _expire(store: Store, job_id: int) -> None:
    with store.write() as conn:
        conn.execute(
            text("UPDATE resync_job SET lease_expires = :x WHERE id = :j"),
            {"x": utcnow() - timedelta(minutes=1), "j": job_id},
        )


def _jobs(store: Store) -> dict[int, dict[str, object]]:
    with store.read() as conn:
        return {int(j["id"]): j for j in directory.list_jobs(conn)}


def test_a_running_job_of_a_dead_process_is_marked_interrupted_and_left_running(
    store: Store,
) -> None:
    """The job of a process of this host that is gone keeps `running` (nothing is written) but
    says its process stopped and who puts it back; a live process's job is plainly running."""
    dead = local_holder(dead_pid())
    register(store, dead)
    alive = local_holder(os.getpid())
    register(store, alive)
    job_dead = leased_job(store, "dead@example.org", dead.owner)
    job_alive = leased_job(store, "alive@example.org", alive.owner)
    jobs = _jobs(store)
    assert jobs[job_dead]["state"] == "running" and jobs[job_dead]["interrupted"] is True
    assert jobs[job_dead]["interrupted_reason"] == (
        f"its process {dead.owner} (process {dead.pid} on this host) stopped; the next sync "
        "or the daemon puts it back in the queue"
    )
    assert jobs[job_alive]["state"] == "running" and jobs[job_alive]["interrupted"] is False
    assert jobs[job_alive]["interrupted_reason"] is None
    with store.read() as conn:  # read only: the dead owner's lease is still in the table
        owners: dict[int, str | None] = dict(
            conn.execute(text("SELECT id, lease_owner FROM resync_job")).all()
        )
    assert owners == {job_dead: dead.owner, job_alive: alive.owner}


def test_an_unregistered_dead_owner_is_known_by_its_default_name(store: Store) -> None:
    """An owner with no registry row (an older version) is judged by its HOST:PID name."""
    dead = local_holder(dead_pid())
    job = leased_job(store, "dead@example.org", dead.owner)
    assert _jobs(store)[job]["interrupted"] is True


def test_a_running_job_whose_lease_ran_out_is_marked_interrupted(store: Store) -> None:
    """A process on another host cannot be judged by its pid: its job is marked once its lease
    has run out, and not before."""
    far = remote_holder()
    register(store, far)
    job = leased_job(store, "far@example.org", far.owner)
    assert _jobs(store)[job]["interrupted"] is False
    _expire(store, job)
    shown = _jobs(store)[job]
    assert shown["state"] == "running" and shown["interrupted"] is True
    reason = str(shown["interrupted_reason"])
    assert reason.startswith("its lease ran out at ")
    assert f"(its process {far.owner} stopped or is stuck)" in reason
    with store.read() as conn:
        assert stopped_jobs(conn) == {job: reason}


def test_jobs_that_are_not_running_are_never_marked(store: Store) -> None:
    """A queued or finished job has no process to have stopped."""
    dead = local_holder(dead_pid())
    job = leased_job(store, "dead@example.org", dead.owner)
    with store.write() as conn:
        conn.execute(text("UPDATE resync_job SET state = 'failed' WHERE id = :j"), {"j": job})
    assert _jobs(store)[job]["interrupted"] is False
    with store.read() as conn:
        assert stopped_jobs(conn) == {}


def test_a_negative_limit_is_refused(store: Store) -> None:
    """list_jobs refuses a limit below 0 (SQLite reads LIMIT -1 as no limit); 0 lists none."""
    leased_job(store, "a@example.org", "someone")
    with store.read() as conn:
        with pytest.raises(ValueError, match="limit must be 0 or more, not -1"):
            directory.list_jobs(conn, limit=-1)
        assert directory.list_jobs(conn, limit=0) == []
        assert len(directory.list_jobs(conn, limit=1)) == 1
