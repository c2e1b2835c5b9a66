"""The daemon's resync workers, and the LISTEN side of the resync channel that wakes them.

The NOTIFY side is sent where jobs are queued (:data:`RESYNC_CHANNEL` is the one name both
use). On SQLite there is no NOTIFY: a sync in this process wakes the workers itself, and idle
workers poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from sqlalchemy.engine import make_url

from rostersync.daemon.metrics import Metrics
from rostersync.logs import scrub
from rostersync.resync.queue import RESYNC_CHANNEL, job_due_soonest
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine

#: Idle workers look for due jobs this often on SQLite (the bound is 5 s; no NOTIFY there).
SQLITE_POLL = 1.0
#: With LISTEN/NOTIFY, polling only catches leases that expired and jobs whose backoff ended.
PG_POLL = 5.0
#: An idle worker calls the queue's lease step at least this often even when nothing looks
#: due, because that step is also what returns expired leases to the queue.
LEASE_SWEEP = 5.0


def pg_conninfo(url: str) -> str:
    """The libpq URI for a SQLAlchemy ``postgresql+psycopg://`` URL (options kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Worker:
    index: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    retire: bool = False
    task: asyncio.Task[None] | None = None


class ResyncWorkers:
    """The worker tasks that drain the resync queue, resized on reload.

    ``engine`` returns the engine in force (a reload replaces it); ``stopping`` says whether
    the daemon is draining, after which no worker leases another batch.
    """

    def __init__(
        self,
        store: Store,
        *,
        engine: Callable[[], SyncEngine],
        metrics: Metrics,
        stopping: Callable[[], bool],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.stopping = stopping
        self.log = log
        self.workers: list[Worker] = []
        self.listening = False

    def resize(self, want: int) -> None:
        live = [w for w in self.workers if not w.retire]
        for w in live[want:]:
            w.retire = True  # finishes its batch, then leaves
            w.wake.set()
        next_index = max((w.index for w in self.workers), default=-1) + 1
        for i in range(max(0, want - len(live))):
            worker = Worker(next_index + i)
            worker.task = asyncio.create_task(self._run(worker), name=f"worker:{worker.index}")
            self.workers.append(worker)

    def wake(self) -> None:
        for w in self.workers:
            w.wake.set()

    def poll_interval(self) -> float:
        return PG_POLL if self.listening else SQLITE_POLL

    async def _run(self, me: Worker) -> None:
        structlog.contextvars.bind_contextvars(worker=me.index)
        last_lease = 0.0
        try:
            while not self.stopping() and not me.retire:
                me.wake.clear()
                started = time.monotonic()
                last_lease = started
                try:
                    outcomes = await self.engine().process_batch()
                except Exception as exc:
                    self.log.error(
                        "resync_worker_error", error=scrub(str(exc)), error_type=type(exc).__name__
                    )
                    await self._idle(me, 5.0)
                    continue
                if outcomes:
                    self.metrics.record_jobs((o for _, o in outcomes), time.monotonic() - started)
                    for job, outcome in outcomes:
                        # One line per job only at debug for successes; a batch line is at info.
                        self.log.log(
                            logging.DEBUG if outcome == "succeeded" else logging.WARNING,
                            "resync_job_done",
                            job_id=job.id,
                            user_id=job.user_id,
                            run_id=job.run_id,
                            attempt=job.attempts,
                            outcome=outcome,
                        )
                    continue
                # Nothing was due. Sleep until woken (NOTIFY, a local sync) or until the next
                # job's backoff ends, checking cheaply (a read) before leasing again (a write).
                while not self.stopping() and not me.retire:
                    due = await asyncio.to_thread(self._due_soonest)
                    if due == 0.0:
                        # Due but not leased: another worker or instance holds it for a moment.
                        await self._idle(me, 0.1)
                        break
                    if time.monotonic() - last_lease >= LEASE_SWEEP:
                        break
                    wait = self.poll_interval() if due is None else min(due, self.poll_interval())
                    if await self._idle(me, wait):
                        break
        finally:
            self.workers = [w for w in self.workers if w is not me]

    async def _idle(self, me: Worker, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if woken early."""
        try:
            await asyncio.wait_for(me.wake.wait(), timeout=max(seconds, 0.01))
        except TimeoutError:
            return False
        me.wake.clear()
        return True

    def _due_soonest(self) -> float | None:
        with self.store.read() as conn:
            return job_due_soonest(conn)

    async def listen(self) -> None:
        """LISTEN on the resync channel and wake the workers on every NOTIFY; reconnects."""
        import psycopg

        conninfo = pg_conninfo(self.store.url)
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {RESYNC_CHANNEL}")
                    self.listening = True
                    delay = 1.0
                    self.log.debug("listening", channel=RESYNC_CHANNEL)
                    self.wake()  # whatever was queued while we were not listening
                    async for _ in conn.notifies():
                        self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("listen_failed", error=scrub(str(exc)), retry_in=delay)
            finally:
                self.listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
