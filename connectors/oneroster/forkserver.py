"""The decode workers' fork server: the process their workers are forked from, and what it
imports once for all of them.

Standard library only: a command about to sync starts the server ahead
(:func:`start_ahead`, from ``OneRosterSourceConfig.prepare_workers``) before it imports the
store, the HTTP client and the decoders itself, so that the server loads the workers' modules
on another core meanwhile, instead of after the fetch has begun.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext

#: The decoder every worker runs, and what workers that send the requests need besides
#: (the request sender and a TLS context built once for all of them).
DECODE = "connectors.oneroster.decode"
REQUESTS = "connectors.oneroster.preload"
#: The driver a worker reads the mirror's fingerprints with, by the store's dialect
#: (connectors.oneroster.decode; SQLite's is the standard library's).
STORE_DRIVERS: dict[str, tuple[str, ...]] = {"postgresql": ("psycopg",)}


def store_driver(dialect: str | None) -> tuple[str, ...]:
    """What the fork server preloads for workers that read a store of ``dialect``: imported
    once there, not once in each worker while the fetch waits for its pages."""
    return STORE_DRIVERS.get(dialect or "", ())


def context(preload: Sequence[str]) -> ForkServerContext:
    """The workers' start method, the server to import ``preload`` when it starts.

    forkserver, not fork: the daemon runs threads (scheduler, metrics), and a forked copy of a
    process holding a lock in another thread can deadlock. Only what the workers use is
    preloaded: the default also re-imports the program's ``__main__`` in the server, which runs
    any script that lacks a main guard."""
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    ctx.set_forkserver_preload(list(preload))
    return ctx


def start_ahead(preload: Sequence[str] = (DECODE, REQUESTS)) -> bool:
    """Start the fork server now, not when the first pool submits work; False where it could
    not start (the pool then tries, and fails over to decoding in the sync process as before).
    One server serves the process's every pool: one started later finds it running."""
    try:
        context(preload)
    except Exception:  # a head start only: the pool's own start tries again, and fails over
        return False
    return ensure_running()


def ensure_running() -> bool:
    """Start the fork server unless it runs, with Ctrl-C blocked in it and so in every worker
    it forks, from their first instruction: Ctrl-C reaches the whole process group, and a
    worker it caught starting (before its initializer ignores it) printed a traceback. The
    signal mask is the calling thread's and outlives the server's exec; a Ctrl-C meanwhile
    waits for this thread, or goes to another, not lost. (The stdlib's resource tracker
    protects its own start so, bpo-33613.) False where it could not start (the pool's own
    start then tries again, and fails over)."""
    from multiprocessing import forkserver, resource_tracker

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        # First: the fork server starts the tracker, whose start unblocks Ctrl-C when done.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        forkserver.ensure_running()
    except Exception:
        return False
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return True
