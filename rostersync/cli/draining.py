"""The resync drain a command runs in the foreground once it has queued jobs (`sync` after its
runs, `import` and `teachers import` after their commit): progress lines on a terminal, and
SIGTERM taken as Ctrl-C so that leased jobs go back at once."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rostersync.cli.app import EXIT_FAILED, App, fail

if TYPE_CHECKING:
    from rostersync.progress import SyncProgress
    from rostersync.sync.engine import SyncEngine
    from rostersync.sync.runs import RunReport


@contextmanager
def terminal_progress(app: App, *, show: bool = True) -> Iterator[SyncProgress | None]:
    """Progress lines on stderr while the block runs, only on a terminal: elsewhere stderr
    carries JSON log lines and nothing else. Log lines print above the live display."""
    from rostersync.logs import configure as configure_logging
    from rostersync.progress import SyncProgress

    progress = SyncProgress(sys.stderr) if show and sys.stderr.isatty() else None
    if progress is None:
        yield None
        return
    settings = app.settings
    configure_logging(
        app.log_level or settings.logging.level, settings.logging.format, progress.log_stream
    )
    try:
        yield progress
    finally:
        progress.close()
        configure_logging(app.log_level or settings.logging.level, settings.logging.format)


def stop_on_sigterm() -> None:
    """In a process of its own, SIGTERM (systemctl stop, a timer's time limit) as Ctrl-C: what
    the command holds is given back now, not at the next command's recovery. Call it from
    inside the running event loop."""
    import asyncio

    if App.whole_process:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, os.kill, os.getpid(), signal.SIGINT
        )


async def drain_with_progress(app: App, engine: SyncEngine, progress: SyncProgress | None) -> int:
    """engine.drain(), reporting jobs done and still queued after every batch; returns how
    many jobs it processed."""
    from rostersync.resync.queue import queue_depth

    def queued() -> int:
        with app.store.read() as conn:
            return int(queue_depth(conn)["queued"])

    def report(done: int) -> None:
        if progress is not None:
            progress.resync(done, queued(), final=False)

    done = await engine.drain(on_batch=report)
    if progress is not None and done:
        progress.resync(done, queued(), final=True)
    return done


def resync_states(app: App, reports: Sequence[RunReport]) -> dict[int, dict[str, int]]:
    """After the command's drain: each real run's resync jobs by state (report.print_run)."""
    from rostersync.resync.queue import run_job_states

    real = [r for r in reports if not r.dry_run]
    if not real:
        return {}
    with app.store.read() as conn:
        return {r.id: run_job_states(conn, r.id) for r in real}


def drain_now(app: App, done: str) -> int:
    """Process the due resync jobs here, as `sync` does after its runs (for a command that
    queued some: groups appear before it returns, daemon or not). ``done``: what stands
    whatever happens to the drain, for the message when it is stopped. Returns how many jobs
    were processed."""
    import asyncio

    async def drain() -> int:
        stop_on_sigterm()
        with terminal_progress(app) as progress:
            return await drain_with_progress(app, app.engine(), progress)

    try:
        return asyncio.run(drain())
    except KeyboardInterrupt:
        fail(
            f"stopped while processing the resync jobs: {done}; the jobs left wait for the "
            "daemon, or the next `sync` or `run --once`",
            EXIT_FAILED,
        )
