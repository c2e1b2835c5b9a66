"""SQLite's write-ahead log copied into the database file in a thread of its own after a bulk
transaction commits (see :class:`Checkpointer`)."""

from __future__ import annotations

import sqlite3
import threading

import structlog

#: SQLite's own checkpoint threshold (pages of log), which every connection keeps outside
#: bulk transactions (see Store.write).
AUTOCHECKPOINT_PAGES = 1000


class Checkpointer:
    """Copies a SQLite database's write-ahead log into the database file, in a thread of its
    own, after a bulk transaction commits.

    SQLite does this in the connection that commits, once the log holds 1,000 pages, and the
    commit waits for it: a first sync's apply would spend most of its commit copying its
    large log, on the one core the sync's work runs on. A bulk commit hands that copy to this thread, where it runs beside the next work (the
    resync batches). Every other commit keeps SQLite's way: while the thread copies, their
    own checkpoints find it busy and skip; the first one after it copies the little that
    came since, and the writer after that starts the log over. (A thread checkpointing after
    every commit could not do that last part: the drain's batches begin a millisecond after
    the last committed, never after a checkpoint finished, and the log kept growing.)
    Checkpoints are PASSIVE: they never wait for, or block, readers and writers. A process
    that exits before the thread is done loses nothing: the log is the durable copy, read by
    the next connection to open the database (the last one to close also checkpoints).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.checkpoints = 0  # completed, and the log's length in pages at the last (tests)
        self.frames = 0

    def poke(self) -> None:
        """A bulk transaction committed: checkpoint now (the thread starts on first use)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stopping.is_set():
                    self._thread = threading.Thread(
                        target=self._run, name="rostersync-wal-checkpoint", daemon=True
                    )
                    self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        log = structlog.get_logger()
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                self._wake.clear()
                try:
                    # fetchall, not fetchone: a statement left unfinished keeps its read
                    # lock, and no writer can start the log over while anyone holds one.
                    ((_busy, frames, _done),) = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchall()
                    self.checkpoints += 1
                    self.frames = frames
                except sqlite3.Error as exc:  # the next commit checkpoints instead
                    log.warning("wal_checkpoint_failed", error=str(exc))
        finally:
            conn.close()

    def stop(self) -> None:
        """End the thread (a later bulk commit starts another)."""
        with self._start_lock:
            self._stopping.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join()
            self._thread = None
            self._stopping.clear()
            self._wake.clear()
