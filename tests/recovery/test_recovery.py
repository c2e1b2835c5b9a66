"""recover(): what dead processes of this host left is put right; nothing of a live process is
touched. release_owner(): a stopping daemon gives back what it holds."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.daemon import recovery
from rostersync.errors import ConfigError, InstanceInUse
from rostersync.store.db import Store, utcnow
from tests.recovery.conftest import (
    Holder,
    dead_pid,
    lease,
    lease_owner,
    leased_job,
    local_holder,
    register,
    remote_holder,
    run_row,
    running_run,
    staged_rows,
)


def jobs(
    store: Store, columns: str = "state, attempts, lease_owner"
) -> dict[int, tuple[str, int, str | None]]:
    """job id -> (state, attempts, lease owner), or the three ``columns`` named."""
    with store.read() as conn:
        return {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute(text(f"SELECT id, {columns} FROM resync_job ORDER BY id"))
        }


def registered(store: Store) -> set[str]:
    with store.read() as conn:
        return {r[0] for r in conn.execute(text("SELECT id FROM instance"))}


def test_recovery_puts_right_what_a_dead_local_process_left_and_nothing_else(
    store: Store, sleeper: subprocess.Popen[bytes]
) -> None:
    """A dead holder's run fails as interrupted with its staging cleared, its lease is dropped,
    its jobs are queued again at once (the attempt not counted), its registry row goes; the
    leases, runs and jobs of a live local process and of another host stay as they are."""
    dead = local_holder(dead_pid(), started=1)
    alive = local_holder(sleeper.pid)
    far = remote_holder()
    for holder in (dead, alive, far):
        register(store, holder)
    lease(store, "a", dead.owner, timedelta(minutes=30))
    lease(store, "b", far.owner, timedelta(minutes=-5))  # expired: still not ours to judge here
    lease(store, "c", alive.owner, timedelta(minutes=-5))
    run_a, run_b, run_c = (running_run(store, s) for s in "abc")
    run_orphan = running_run(store, "d")  # a run without any lease
    job_dead = leased_job(store, "d@example.org", dead.owner)
    job_far = leased_job(store, "f@example.org", far.owner)
    job_alive = leased_job(store, "l@example.org", alive.owner)

    found = recovery.recover(store, "me")

    assert found.dead_owners == [dead.owner]
    assert found.interrupted_runs == [run_a, run_orphan]
    assert found.requeued_jobs == 1
    status, error = run_row(store, run_a)
    assert status == "failed" and error is not None
    assert error.startswith(f"interrupted: {dead.owner}")
    assert run_row(store, run_orphan)[0] == "failed"
    assert staged_rows(store, run_a) == staged_rows(store, run_orphan) == 0
    assert run_row(store, run_b) == run_row(store, run_c) == ("running", None)
    assert staged_rows(store, run_b) == staged_rows(store, run_c) == 3
    assert [lease_owner(store, s) for s in "abc"] == [None, far.owner, alive.owner]
    assert jobs(store) == {
        job_dead: ("queued", 0, None),
        job_far: ("running", 1, far.owner),
        job_alive: ("running", 1, alive.owner),
    }
    assert registered(store) == {alive.owner, far.owner}
    assert not recovery.recover(store, "me")  # nothing left to do


def test_a_dead_holders_jobs_fold_into_a_queued_job_of_the_same_user(store: Store) -> None:
    """A user keeps one queued job: a dead holder's job for a user who has one queued is
    dropped, and of two such jobs for one user the older is kept."""
    dead = local_holder(dead_pid())
    first = leased_job(store, "a@example.org", dead.owner)
    with store.write() as conn:
        user_id = conn.execute(
            text("SELECT user_id FROM resync_job WHERE id = :j"), {"j": first}
        ).scalar_one()
        now = utcnow()
        for state in ("running", "queued"):
            conn.execute(
                text(
                    "INSERT INTO resync_job (user_id, state, reason, live, attempts, run_after, "
                    "created_at, result, lease_owner) VALUES (:u, :s, 'r', :no, 1, :n, :n, '{}', "
                    ":o)"
                ),
                {"u": user_id, "s": state, "n": now, "no": False, "o": dead.owner},
            )
    other = leased_job(store, "b@example.org", dead.owner)
    second = leased_job(store, "c@example.org", dead.owner)
    with store.write() as conn:  # two running jobs of one user, both the dead holder's
        conn.execute(
            text(
                "UPDATE resync_job SET user_id = (SELECT user_id FROM resync_job WHERE id = :a) WHERE id = :b"
            ),
            {"a": other, "b": second},
        )
    recovery.recover(store, "me")
    states = jobs(store)
    assert [s for s, _, _ in states.values()].count("queued") == 2
    assert first not in states and second not in states
    assert states[other] == ("queued", 0, None)


def test_at_start_an_owner_name_taken_into_use_frees_what_an_earlier_process_held(
    store: Store,
) -> None:
    """With --instance-id reused across restarts, the new process takes back the old one's
    lease; the running daemon's own sweep never treats its own name as dead."""
    lease(store, "a", "fixed-id", timedelta(minutes=30))
    run_a = running_run(store, "a")
    assert not recovery.recover(store, "fixed-id", previous_self=False)
    assert run_row(store, run_a)[0] == "running"
    found = recovery.recover(store, "fixed-id")
    assert found.dead_owners == ["fixed-id"] and found.interrupted_runs == [run_a]
    assert lease_owner(store, "a") is None


def test_an_owner_name_a_running_process_of_this_host_holds_is_refused_at_start(
    store: Store, sleeper: subprocess.Popen[bytes]
) -> None:
    """A second daemon given the --instance-id of one still running here is refused, and the
    running one keeps its lease and run (it took them back as an earlier process's: the live
    daemon's run failed as interrupted under it). Once that process is gone the name is free."""
    live = local_holder(sleeper.pid)
    register(store, Holder("node1", live.host, live.pid, live.started, live.scope), kind="daemon")
    lease(store, "a", "node1", timedelta(minutes=30))
    run_a = running_run(store, "a")
    with pytest.raises(InstanceInUse) as refused:
        recovery.recover(store, "node1")
    assert str(refused.value) == (
        f"instance id 'node1' is in use by process {sleeper.pid} on this host, which is "
        "running: give this one another --instance-id (each running instance needs its own), "
        "or stop that process first"
    )
    assert run_row(store, run_a)[0] == "running" and lease_owner(store, "a") == "node1"
    assert not recovery.recover(store, "node1", previous_self=False)  # the sweep: unchanged
    sleeper.kill()
    sleeper.wait()
    found = recovery.recover(store, "node1")
    assert found.dead_owners == ["node1"] and found.interrupted_runs == [run_a]


def test_release_at_stop_fails_cut_off_runs_and_returns_jobs_but_leaves_finished_ones(
    store: Store,
) -> None:
    """A stopping daemon: its cut-off run fails with the given error and loses its staging, its
    leased jobs go back untouched, jobs that finished (and others' jobs) stay as they are."""
    recovery.register(store, "me", "daemon")
    lease(store, "a", "me", timedelta(minutes=2))
    run_a = running_run(store, "a")
    mine = leased_job(store, "m@example.org", "me")
    theirs = leased_job(store, "t@example.org", "other")
    done = leased_job(store, "d@example.org", "me")
    with store.write() as conn:
        conn.execute(
            text("UPDATE resync_job SET state = 'succeeded', lease_owner = NULL WHERE id = :j"),
            {"j": done},
        )
    found = recovery.release_owner(store, "me", "interrupted: the daemon stopped")
    assert found.interrupted_runs == [run_a] and found.requeued_jobs == 1
    assert run_row(store, run_a) == ("failed", "interrupted: the daemon stopped")
    assert staged_rows(store, run_a) == 0
    assert lease_owner(store, "a") is None
    assert jobs(store) == {
        mine: ("queued", 0, None),
        theirs: ("running", 1, "other"),
        done: ("succeeded", 1, None),
    }
    assert "me" not in registered(store)


def test_live_daemons_are_known_by_pid_here_and_by_heartbeat_elsewhere(
    store: Store, sleeper: subprocess.Popen[bytes]
) -> None:
    """A daemon of this host counts while its process runs; one elsewhere while it beat within
    leases.expire_after; commands never count."""
    register(store, local_holder(sleeper.pid), kind="daemon")
    register(store, local_holder(dead_pid()), kind="daemon")
    register(store, remote_holder(1), kind="daemon")
    register(store, remote_holder(2), kind="daemon", beat=utcnow() - timedelta(minutes=5))
    register(store, remote_holder(3), kind="command")
    assert recovery.live_daemons(store, timedelta(minutes=2)) == sorted(
        [local_holder(sleeper.pid).owner, "far-away:1"]
    )


def test_leases_expire_after_two_minutes_by_default_and_never_under_a_second(
    make_settings: Callable[..., Settings],
) -> None:
    """`leases.expire_after` is a Duration (2m by default); a value under 1s is refused, with its path."""
    assert make_settings().leases.expire_after == timedelta(minutes=2)
    assert make_settings(leases={"expire_after": "45s"}).leases.expire_after == timedelta(
        seconds=45
    )
    with pytest.raises(ConfigError, match=r"leases\.expire_after: line \d+: must be at least 1s"):
        make_settings(leases={"expire_after": 0})


def test_an_approval_cut_off_by_a_kill_is_held_again_with_its_staged_rows(store: Store) -> None:
    """An approval's apply rolled back when its process died: the run goes back to `held`
    with the snapshot the admin reviewed, to be approved again, not failed and emptied."""
    dead = local_holder(dead_pid(), started=1)
    register(store, dead)
    lease(store, "a", dead.owner, timedelta(minutes=30))
    run_id = running_run(store, "a")
    with store.write() as conn:
        conn.execute(
            text("UPDATE sync_run SET approved_at = :n WHERE id = :r"), {"n": utcnow(), "r": run_id}
        )
    found = recovery.recover(store, "me")
    assert found.interrupted_runs == [run_id]
    assert run_row(store, run_id) == ("held", None)
    assert staged_rows(store, run_id) == 3
    with store.read() as conn:
        approved = conn.execute(
            text("SELECT approved_at FROM sync_run WHERE id = :r"), {"r": run_id}
        ).scalar()
    assert approved is None


def interruptions(store: Store) -> dict[int, tuple[str, int, str | None]]:
    """job id -> (state, interruptions, last error)."""
    return jobs(store, "state, interruptions, last_error")


def die_holding(store: Store, job_ids: list[int]) -> str:
    """These jobs' lease passes to a process that then dies; returns its owner name."""
    dead = local_holder(dead_pid())
    with store.write() as conn:
        conn.execute(
            text(
                "UPDATE resync_job SET state = 'running', lease_owner = :o WHERE id IN ("
                + ", ".join(str(j) for j in job_ids)
                + ")"
            ),
            {"o": dead.owner},
        )
    return dead.owner


def test_a_job_that_kills_its_process_is_leased_alone_and_fails_after_three_deaths(
    store: Store,
) -> None:
    """A dead process's jobs go back counting the interruption; from then on each is leased
    alone, so the job that kills its process every time fails on its third death with an
    error that says so, and takes none of its batch-mates with it."""
    from rostersync.resync import queue

    owner = local_holder(dead_pid()).owner
    poison, mate, other = (leased_job(store, f"{n}@example.org", owner) for n in "pmo")
    found = recovery.recover(store, "me")
    assert found.requeued_jobs == 3 and found.abandoned_jobs == 0
    assert {j: s[:2] for j, s in interruptions(store).items()} == {
        poison: ("queued", 1),
        mate: ("queued", 1),
        other: ("queued", 1),
    }
    assert jobs(store)[poison] == ("queued", 0, None)  # the attempt is not counted
    for death in (2, 3):
        leased = queue.lease(store, "worker", limit=10, lease_for=timedelta(minutes=5))
        assert [j.id for j in leased] == [poison]  # alone, though ten were asked for
        die_holding(store, [poison])
        found = recovery.recover(store, "me")
        assert (found.requeued_jobs, found.abandoned_jobs) == ((1, 0) if death == 2 else (0, 1))
    state, count, error = interruptions(store)[poison]
    assert (state, count) == ("failed", queue.MAX_INTERRUPTIONS)
    assert error == queue.INTERRUPTED_ERROR and "3 times" in error and "resync --user" in error
    assert {j: s[:2] for j, s in interruptions(store).items() if j != poison} == {
        mate: ("queued", 1),
        other: ("queued", 1),
    }
    leased = queue.lease(store, "worker", limit=10, lease_for=timedelta(minutes=5))
    assert [j.id for j in leased] == [mate]


def test_a_batch_ends_before_the_first_interrupted_job(store: Store) -> None:
    """Jobs without interruptions are leased together up to the first one with some."""
    from rostersync.resync import queue

    owner = local_holder(dead_pid()).owner
    first, second, suspect, last = (leased_job(store, f"{n}@example.org", owner) for n in "abcd")
    with store.write() as conn:
        conn.execute(
            text("UPDATE resync_job SET state = 'queued', lease_owner = NULL, interruptions = 0")
        )
        conn.execute(text("UPDATE resync_job SET interruptions = 1 WHERE id = :j"), {"j": suspect})
    lease = queue.lease  # the batches a worker would take, one after another
    batches = [
        [j.id for j in lease(store, "w", limit=10, lease_for=timedelta(minutes=5))]
        for _ in range(4)
    ]
    assert batches == [[first, second], [suspect], [last], []]


def test_a_queued_job_that_absorbs_a_dead_ones_takes_its_interruptions(store: Store) -> None:
    """The dead holder's job is dropped for the user's queued one, which inherits the count:
    folding must not reset it, or the job would again be retried for ever."""
    owner = local_holder(dead_pid()).owner
    dead_job = leased_job(store, "u@example.org", owner)
    now = utcnow()
    with store.write() as conn:
        conn.execute(text("UPDATE resync_job SET interruptions = 1 WHERE id = :j"), {"j": dead_job})
        queued = conn.execute(
            text(
                "INSERT INTO resync_job (user_id, state, reason, live, attempts, run_after, "
                "created_at, result) SELECT user_id, 'queued', 'r', :no, 0, :n, :n, '{}' "
                "FROM resync_job WHERE id = :j RETURNING id"
            ),
            {"j": dead_job, "n": now, "no": False},
        ).scalar_one()
    recovery.recover(store, "me")
    found = interruptions(store)
    assert dead_job not in found
    assert found[queued][:2] == ("queued", 2)


def test_a_daemon_that_stops_returns_its_jobs_without_an_interruption(store: Store) -> None:
    """A clean stop is not a death: the jobs go back as they were."""
    recovery.register(store, "me", "daemon")
    mine = leased_job(store, "m@example.org", "me")
    assert recovery.release_owner(store, "me", "interrupted: the daemon stopped").requeued_jobs == 1
    assert interruptions(store)[mine][:2] == ("queued", 0)
