"""The resync queue (rostersync.resync.queue): one queued job per user, leases that never
overlap and expire, retries with backoff, and release."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from rostersync.resync.queue import (
    INTERRUPTED_ERROR,
    MAX_INTERRUPTIONS,
    fail,
    lease,
    queue_depth,
    queue_resync,
    release,
)
from rostersync.store.db import Store
from tests.directoryrows import add_user


def test_queue_keeps_one_queued_job_per_user(store: Store) -> None:
    """Queuing a user twice leaves one queued job."""
    uid = add_user(store, "a@example.org")
    with store.write() as conn:
        queue_resync(conn, [uid, uid], reason="one", run_id=None)
    with store.write() as conn:
        queue_resync(conn, [uid], reason="two", run_id=None)
    with store.read() as conn:
        assert queue_depth(conn)["queued"] == 1
        assert conn.execute(text("SELECT reason FROM resync_job")).scalar_one() == "two"


def test_leases_do_not_overlap(store: Store) -> None:
    """Two workers leasing from one queue never get the same job."""
    ids = [add_user(store, f"u{i}@example.org") for i in range(10)]
    with store.write() as conn:
        queue_resync(conn, ids, reason="r", run_id=None)
    a = lease(store, "worker-a", limit=6, lease_for=timedelta(minutes=5))
    b = lease(store, "worker-b", limit=6, lease_for=timedelta(minutes=5))
    assert len(a) == 6 and len(b) == 4
    assert not {j.id for j in a} & {j.id for j in b}


def test_expired_lease_returns_to_the_queue(store: Store) -> None:
    """A job whose worker died comes back once its lease expires."""
    uid = add_user(store, "a@example.org")
    with store.write() as conn:
        queue_resync(conn, [uid], reason="r", run_id=None)
    taken = lease(store, "dead-worker", limit=5, lease_for=timedelta(seconds=-1))
    assert len(taken) == 1
    again = lease(store, "live-worker", limit=5, lease_for=timedelta(minutes=5))
    assert [j.id for j in again] == [taken[0].id]
    assert again[0].attempts == 2


def test_a_job_whose_lease_keeps_running_out_is_leased_alone_then_fails(store: Store) -> None:
    """An expired lease counts as an interruption (the holder may be stuck, or dead on another
    host): the job comes back to be leased alone, and its third expiry fails it for good with
    an error that says why, while a job never interrupted is leased as before."""
    stuck, other = (add_user(store, f"{n}@example.org") for n in "so")
    with store.write() as conn:
        queue_resync(conn, [stuck, other], reason="r", run_id=None)
    for expiry in range(1, MAX_INTERRUPTIONS + 1):
        taken = lease(store, "stuck-worker", limit=5, lease_for=timedelta(seconds=-1))
        assert len(taken) == (2 if expiry == 1 else 1)  # alone once interrupted
        with store.read() as conn:
            rows = {
                u: n for u, n in conn.execute(text("SELECT user_id, interruptions FROM resync_job"))
            }
        assert rows[stuck] == expiry - 1
    again = lease(store, "live-worker", limit=5, lease_for=timedelta(minutes=5))
    with store.read() as conn:
        state, interruptions, error = conn.execute(
            text("SELECT state, interruptions, last_error FROM resync_job WHERE user_id = :u"),
            {"u": stuck},
        ).one()
    assert (state, interruptions, error) == ("failed", MAX_INTERRUPTIONS, INTERRUPTED_ERROR)
    assert [j.user_id for j in again] == [other]


def test_failures_back_off_then_stop_in_failed(store: Store) -> None:
    """A failing job is retried later, then left failed with its last error."""
    uid = add_user(store, "a@example.org")
    with store.write() as conn:
        queue_resync(conn, [uid], reason="r", run_id=None)
    job = lease(store, "w", limit=1, lease_for=timedelta(minutes=5))[0]
    assert fail(store, job, "boom 1", max_attempts=2, backoff=timedelta(seconds=0)) == "queued"
    job = lease(store, "w", limit=1, lease_for=timedelta(minutes=5))[0]
    assert fail(store, job, "boom 2", max_attempts=2, backoff=timedelta(seconds=0)) == "failed"
    with store.read() as conn:
        state, err, attempts = conn.execute(
            text("SELECT state, last_error, attempts FROM resync_job")
        ).one()
    assert (state, err, attempts) == ("failed", "boom 2", 2)


def test_backoff_delays_the_retry(store: Store) -> None:
    """A retried job is not leased again before its backoff has passed."""
    uid = add_user(store, "a@example.org")
    with store.write() as conn:
        queue_resync(conn, [uid], reason="r", run_id=None)
    job = lease(store, "w", limit=1, lease_for=timedelta(minutes=5))[0]
    fail(store, job, "boom", max_attempts=5, backoff=timedelta(minutes=10))
    assert lease(store, "w", limit=1, lease_for=timedelta(minutes=5)) == []


def test_release_gives_leases_back(store: Store) -> None:
    """Released jobs are queued again without an attempt counted."""
    uid = add_user(store, "a@example.org")
    with store.write() as conn:
        queue_resync(conn, [uid], reason="r", run_id=None)
    jobs = lease(store, "w", limit=1, lease_for=timedelta(minutes=5))
    release(store, jobs)
    with store.read() as conn:
        assert conn.execute(text("SELECT state, attempts FROM resync_job")).one() == ("queued", 0)
