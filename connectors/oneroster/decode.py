"""One page of a collection, from response bytes to staging rows, in or out of process.

Parsing, normalizing and fingerprinting pages is most of a large district's client CPU. With
``decode_workers`` above zero the connector hands large pages to a process pool running :func:`decode_page`, so that
work runs beside the event loop (HTTP, signing) and the staging writes instead of taking
turns with them under one interpreter lock. Small pages are decoded inline: shipping them to
another process costs more than decoding them.

Nothing here may import the store: the worker processes load only this module, the
normalizer and :mod:`rostersync.source.rows`.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from connectors.oneroster.normalize import normalize_page, rows_page
from rostersync.daemon import procs
from rostersync.source.records import RosterRecord
from rostersync.source.rows import StagedBatch

try:
    import fcntl
except ImportError:  # not on Windows; the pipes keep their size there
    fcntl = None  # type: ignore[assignment]

#: Kernel buffer of each pipe between the sync process and the decode workers (Linux lets an
#: unprivileged process ask for up to 1 MiB: /proc/sys/fs/pipe-max-size).
PIPE_BYTES = 1 << 20

#: Pages smaller than this are decoded inline (a 1000-record page of enrollments is ~300 KB).
POOL_MIN_BYTES = 64 * 1024
#: A collection the server says is smaller than this (``X-Total-Count``) is decoded inline:
#: starting the workers costs a run about a quarter of a second, more than decoding a delta
#: run's few thousand changed records takes.
POOL_MIN_RECORDS = 20_000

#: A decode worker's first-generation collection threshold. A page's JSON is a tree, freed by
#: reference counting; at the default (700) the collector ran over every page's thousands of
#: dicts several times while they were alive, a third of a worker's CPU.
WORKER_GC_THRESHOLD = 100_000


class DecodeError(ValueError):
    """The page is not what the OneRoster binding says (the caller names the request)."""


@dataclass(frozen=True, slots=True)
class DecodedPage:
    """A decoded page, with what paging needs to know of the raw records.

    ``batch`` is the normalized records, or (``as_rows``) those records already turned into
    staging rows: records do not cross a process boundary cheaply, plain tuples do.
    """

    batch: list[RosterRecord] | StagedBatch
    length: int  # records on the page, rejected ones included
    first_id: str | None  # the first record's sourcedId (repeated-page detection)


def records_of(body: Any, key: str) -> list[Any]:
    """The page's record list (``{"users": [...]}``); ``null`` counts as an empty page."""
    records = body.get(key) if isinstance(body, dict) else None
    if records is None and isinstance(body, dict) and key in body:
        return []
    if not isinstance(records, list):
        raise DecodeError(f"no {key!r} list")
    return records


def decode_records(collection: str, records: list[Any], *, as_rows: bool) -> DecodedPage:
    first = records[0].get("sourcedId") if records and isinstance(records[0], dict) else None
    return DecodedPage(
        batch=rows_page(collection, records) if as_rows else normalize_page(collection, records),
        length=len(records),
        first_id=first if isinstance(first, str) and first else None,
    )


def decode_page(collection: str, content: bytes, as_rows: bool = False) -> DecodedPage:
    """Parse one answer of ``/{collection}`` and normalize its records (see DecodedPage)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise DecodeError("invalid JSON") from None
    return decode_records(collection, records_of(body, collection), as_rows=as_rows)


def default_workers() -> int:
    """One decode process per core, at most four: the sync process itself mostly waits (on
    the network, on SQLite, which works without the interpreter lock), and one worker fewer
    left decoding the bottleneck of a full run (tests/benchmarks/README.md)."""
    return max(1, min(4, os.cpu_count() or 1))


def start_pool(workers: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` decode processes; ``preload``: further modules their forkserver
    imports once for all of them (connectors.oneroster.direct, when they will send requests)."""
    # forkserver, not fork: the daemon runs threads (scheduler, metrics), and a forked copy of
    # a process holding a lock in another thread can deadlock.
    context = multiprocessing.get_context("forkserver")
    # Preload only what the workers use: the default also re-imports the program's __main__
    # in the server, which runs any script that lacks a main guard.
    context.set_forkserver_preload([__name__, *preload])
    me = os.getpid()
    # The workers are the forkserver's children, not ours: each watches this process and
    # exits with it, and the forkserver and resource tracker follow once no worker is left.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=start_worker,
        initargs=(me, procs.start_ticks(me)),
    )
    widen_pipes(pool)
    return pool


def start_worker(parent: int, started: int | None) -> None:
    """A decode worker's set-up: exit with the sync process; collect cycles rarely, and never
    among the modules already loaded (see WORKER_GC_THRESHOLD)."""
    procs.exit_with_parent(parent, started)
    gc.freeze()
    gc.set_threshold(WORKER_GC_THRESHOLD)


def widen_pipes(pool: ProcessPoolExecutor) -> bool:
    """Give the pool's two pipes (pages out, rows back) a buffer a page fits in; True if done.

    A page of enrollments is several times the default 64 KiB pipe: every hand-over then goes
    in chunks, each waiting for the other side's thread, and in the sync process those
    threads wait for the interpreter lock the event loop and the staging writes hold, so the
    worker sits idle. The pipes are the executor's own (``_call_queue``, ``_result_queue``): where they
    are not found, or the system refuses the size, the pool works as it is.
    """
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    queues = [getattr(pool, "_call_queue", None), getattr(pool, "_result_queue", None)]
    readers: list[Any] = [getattr(q, "_reader", None) for q in queues]
    if setsize is None or any(r is None or not hasattr(r, "fileno") for r in readers):
        return False
    try:
        for reader in readers:  # a pipe's size is set through either of its ends
            fcntl.fcntl(reader.fileno(), setsize, PIPE_BYTES)
    except OSError:
        return False
    return True
