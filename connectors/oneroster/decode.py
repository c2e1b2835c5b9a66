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

import functools
import operator
import os
import signal
import sqlite3
from array import array
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, ParamSpec

import msgspec
import orjson
import xxhash

from connectors.oneroster import forkserver, normalize
from connectors.oneroster.normalize import normalize_page, rows_page
from rostersync.daemon import procs
from rostersync.source import records as _records
from rostersync.source import rows as _rows
from rostersync.source.fingerprints import parse_fingerprints
from rostersync.source.records import RosterRecord
from rostersync.source.rows import FP_LIMIT, KnownSpec, StagedBatch, fp_slices

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


def decoder_failed(exc: Exception) -> DecodeError:
    """``exc`` if a DecodeError, else one for a page the decoder itself failed on (a bug a
    record's shape set off): named by the caller like any page that does not decode, and,
    unlike the exception it stands for, sure to cross back from a decode worker (a str is
    all it carries)."""
    if isinstance(exc, DecodeError):
        return exc
    text = " ".join(str(exc).split())[:200]  # one line, whatever the exception's text
    shown = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return DecodeError(f"the decoder failed on it ({shown}): an internal error, please report it")


_P = ParamSpec("_P")


def _named_failures(decode: Callable[_P, DecodedPage]) -> Callable[_P, DecodedPage]:
    """``decode`` raising DecodeError for every failure: in a decode worker another exception
    came back to the connector without the page it failed on named."""

    @functools.wraps(decode)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> DecodedPage:
        try:
            return decode(*args, **kwargs)
        except DecodeError:
            raise
        except Exception as exc:
            raise decoder_failed(exc) from exc  # the cause for a trace in this process

    return guarded


def records_of(body: Any, key: str) -> list[Any]:
    """The page's record list (``{"users": [...]}``); ``null`` counts as an empty page."""
    records = body.get(key) if isinstance(body, dict) else None
    if records is None and isinstance(body, dict) and key in body:
        return []
    if not isinstance(records, list):
        raise DecodeError(f"no {key!r} list")
    return records


def decode_records(
    collection: str, records: list[Any], *, as_rows: bool, fps: Sequence[int] | None = None
) -> DecodedPage:
    head = records[0] if records else None
    # A dict, a typed struct (normalize.typed_page), or a record that is not an object.
    first = head.get("sourcedId") if isinstance(head, dict) else getattr(head, "sourcedId", None)
    batch: list[RosterRecord] | StagedBatch
    if as_rows:
        batch = staged = rows_page(collection, records, fps)
        if fps is not None:
            staged.order[normalize.ROW_BUILDERS[collection][1]] = array("q", fps)
    else:
        batch = normalize_page(collection, records)
    return DecodedPage(
        batch=batch,
        length=len(records),
        first_id=first if isinstance(first, str) and first else None,
    )


@_named_failures
def decode_page(
    collection: str, content: bytes, as_rows: bool = False, skip: Collection[int] | None = None
) -> DecodedPage:
    """Parse one answer of ``/{collection}`` and normalize its records (see DecodedPage).

    As rows, each record is fingerprinted (:func:`fingerprint`), and a record whose
    fingerprint is in ``skip`` (the mirror's, rostersync.sync.known) is neither parsed nor
    normalized: the batch's ``order`` says where it was (see StagedBatch)."""
    if not as_rows:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise DecodeError("invalid JSON") from None
        return decode_records(collection, records_of(body, collection), as_rows=False)
    raws = split_page(collection, content)
    fps = array("q", [fingerprint(raw) for raw in raws])
    try:
        if not skip:
            # Nothing to skip (a first load): one parse of the page is cheaper than one per
            # record, and yields the same list.
            typed = normalize.typed_page(collection, content)
            records = records_of(orjson.loads(content), collection) if typed is None else typed
            return decode_records(collection, records, as_rows=True, fps=fps)
        order = array("q")
        kept: list[Any] = []
        kept_fps: list[int] = []
        held = skip.holds(fps) if isinstance(skip, Fingerprints) else [fp in skip for fp in fps]
        for raw, fp, known in zip(raws, fps, held, strict=True):
            if known:
                order.append(~fp)
            else:
                order.append(fp)
                kept.append(normalize.typed_record(collection, memoryview(raw)))
                kept_fps.append(fp)
        head = orjson.loads(memoryview(raws[0])) if raws else None
    except orjson.JSONDecodeError:
        raise DecodeError("invalid JSON") from None
    batch = rows_page(collection, kept, kept_fps)
    kind = normalize.ROW_BUILDERS[collection][1]
    batch.order[kind] = order
    batch.skipped[kind] = len(raws) - len(kept)
    first_id = head.get("sourcedId") if isinstance(head, dict) else None
    return DecodedPage(
        batch=batch,
        length=len(raws),
        first_id=first_id if isinstance(first_id, str) and first_id else None,
    )


@_named_failures
def decode_known(collection: str, content: bytes, known: KnownSpec | None) -> DecodedPage:
    """:func:`decode_page` as rows in a decode worker, leaving out the records whose
    fingerprint the mirror holds (``known``: where to read them; None: none left out)."""
    skip = known_fingerprints(known, normalize.ROW_BUILDERS[collection][1]) if known else None
    return decode_page(collection, content, True, skip)


class Fingerprints:
    """A set of fingerprints in 8 bytes each: sorted, with the start of each of 4,096
    buckets of their top bits. A Python set of ints took 117 bytes a fingerprint (151 MiB
    per worker at district L, 375 MiB at XL); a lookup here is a bisection within a bucket,
    in C (a few steps more with 4,096 buckets than with 65,536, whose starts alone took a
    worker 31 ms to find for each kind it read)."""

    BITS = 12
    SHIFT = 63 - BITS

    def __init__(self, fps: Iterable[int] = ()) -> None:
        values = array("q", fps)
        if not all(map(operator.le, values, islice(values, 1, None))):
            values = array("q", sorted(values))
        self._fps = values
        starts = array("q", (bisect_left(values, b << self.SHIFT) for b in range(1 << self.BITS)))
        starts.append(len(values))
        self._starts = starts

    def __contains__(self, fp: object) -> bool:
        if not isinstance(fp, int) or not 0 <= fp < FP_LIMIT:
            return False
        bucket = fp >> self.SHIFT
        high = self._starts[bucket + 1]
        at = bisect_left(self._fps, fp, self._starts[bucket], high)
        return at < high and self._fps[at] == fp

    def holds(self, fps: Iterable[int]) -> list[bool]:
        """``fp in self`` for each of ``fps`` (fingerprints: ints within ``FP_LIMIT``), without
        a method call for each: a page's worth at a time."""
        values, starts, shift = self._fps, self._starts, self.SHIFT
        return [
            (at := bisect_left(values, fp, starts[b := fp >> shift], high := starts[b + 1])) < high
            and values[at] == fp
            for fp in fps
        ]

    def __len__(self) -> int:
        return len(self._fps)

    def __iter__(self) -> Iterator[int]:
        return iter(self._fps)


#: This worker's reads of the mirror's fingerprints, by (spec, kind): one run's only.
_known: dict[tuple[KnownSpec, str], Fingerprints] = {}


def known_fingerprints(spec: KnownSpec, kind: str) -> Fingerprints:
    """The fingerprints the mirror holds for ``kind`` of the spec's source, read once per run
    and kind by each worker. Anything that fails (the database cannot be opened, a lock held
    too long) gives none: every record is then normalized and compared in the sync process,
    slower and as correct."""
    found = _known.get((spec, kind))
    if found is None:
        if any(have != spec for have, _ in _known):
            _known.clear()  # a new run
        found = _known[(spec, kind)] = Fingerprints(_read_fingerprints(spec, kind))
    return found


def forget_known() -> None:
    """Drop this process's reads of the mirror's fingerprints. The sync process calls it when
    a fetch ends: between runs the daemon holds none (a worker's die with it)."""
    _known.clear()


def _read_fingerprints(spec: KnownSpec, kind: str) -> Iterator[int]:
    """From the mirror's fingerprint index alone, in its order (sorted, as the index is),
    joined by the database a slice of their range at a time: a string to split instead of a
    row per record, and a few MB of it at once."""
    mark = "?" if spec.dialect == "sqlite" else "%s"
    agg = "group_concat" if spec.dialect == "sqlite" else "string_agg"
    sql = (
        f"SELECT {agg}(CAST(fp AS TEXT), ',') FROM (SELECT fp FROM roster_{kind} "
        f"WHERE source = {mark} AND fp BETWEEN {mark} AND {mark} ORDER BY fp) AS f"
    )
    slices = fp_slices()
    try:
        if spec.dialect == "sqlite":
            uri = f"{Path(spec.where).as_uri()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
                parts = [db.execute(sql, (spec.source, *bounds)).fetchone()[0] for bounds in slices]
        elif spec.dialect == "postgresql":
            import psycopg  # only a PostgreSQL store's workers load the driver

            with psycopg.connect(spec.where) as pg:
                parts = [
                    (pg.execute(sql, (spec.source, *bounds)).fetchone() or (None,))[0]
                    for bounds in slices
                ]
        else:
            return iter(())
    except Exception:  # none left out: see known_fingerprints
        return iter(())
    return chain.from_iterable(parse_fingerprints(part) for part in parts if part)


_ENVELOPE = msgspec.json.Decoder(dict[str, msgspec.Raw])
_RECORDS = msgspec.json.Decoder(list[msgspec.Raw] | None)


def split_page(collection: str, content: bytes) -> list[msgspec.Raw]:
    """The page's records as the bytes the server sent, unparsed (``null``: none)."""
    try:
        envelope = _ENVELOPE.decode(content)
        raw = envelope.get(collection)
        if raw is None:
            raise DecodeError(f"no {collection!r} list")
        return _RECORDS.decode(raw) or []
    except msgspec.ValidationError:
        raise DecodeError(f"no {collection!r} list") from None
    except msgspec.DecodeError:
        raise DecodeError("invalid JSON") from None
    except RecursionError:  # msgspec's answer to a hostile nesting (no record nests deep)
        raise DecodeError("invalid JSON") from None


def _seed() -> int:
    """The fingerprints' seed: a digest of the code that turns a record into its row. Any
    change to it (an upgrade) changes every fingerprint, so no mirror row made by the old
    code is taken for what the new code would make; the next full run normalizes all."""
    digest = xxhash.xxh3_64()
    for module in (normalize, _rows, _records):
        with open(str(module.__file__), "rb") as code:
            digest.update(code.read())
    return digest.intdigest()


SEED = _seed()


def fingerprint(raw: msgspec.Raw | bytes) -> int:
    """A record's fingerprint: 63 bits of XXH3 of its bytes (a signed 64-bit column holds it;
    ``~fp`` marks a skipped record)."""
    return xxhash.xxh3_64_intdigest(raw, SEED) >> 1


def default_workers() -> int:
    """One decode process per core, at most four: the sync process itself mostly waits (on
    the network, on SQLite, which works without the interpreter lock), and one worker fewer
    left decoding the bottleneck of a full run (tests/benchmarks/README.md)."""
    return max(1, min(4, os.cpu_count() or 1))


#: The most decode workers a source gets by default when they send the requests.
MAX_DEFAULT_WORKERS = 8
#: When every page the sync process asked for before the pool starts took this long to come,
#: the default pool is as large as ``max_concurrency``: its workers would mostly wait. The
#: fastest page, not the slowest: the benchmark's server on the same machine answered a first
#: request in 20 ms (the connection, a cold cache) and the next in 4-8 ms, 13-19 ms at
#: district L while the machine's two cores also ran the sync; there two workers are faster.
SLOW_PAGE_SECONDS = 0.04


def pool_size(
    configured: int | None, max_concurrency: int, requests: bool, fastest_page: float | None
) -> int:
    """The decode pool's size: ``decode_workers`` if set; else one a core, or, when the
    workers send the requests and the fastest page so far took ``SLOW_PAGE_SECONDS`` or more,
    as many as ``max_concurrency`` allows requests (at most ``MAX_DEFAULT_WORKERS``). A
    worker has one request in flight: with fewer, the other slots sat idle while a server far
    away answered (district M with 50 ms a page: a no-op 9.4 s with two, 5.4 s with four);
    from a server that answers at once two are busy, and two more processes cost more than
    they wait (tests/benchmarks/README.md)."""
    if configured is not None:
        return configured
    if requests and fastest_page is not None and fastest_page >= SLOW_PAGE_SECONDS:
        return max(default_workers(), min(max_concurrency, MAX_DEFAULT_WORKERS))
    return default_workers()


def start_pool(workers: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` decode processes; ``preload``: further modules their fork server
    imports once for all of them (forkserver.REQUESTS, when they will send requests)."""
    context = forkserver.context([__name__, *preload])
    forkserver.ensure_running()  # unless started ahead: with Ctrl-C blocked (it says why)
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
    among the modules already loaded (procs.settle_collector: a page's JSON is a tree freed by
    reference counting, and at the default threshold the collector ran over every page's
    thousands of dicts several times while they were alive, a third of a worker's CPU)."""
    # Ctrl-C reaches the whole process group: the sync process stops the run and the pool;
    # a worker's own KeyboardInterrupt would only print its traceback on the terminal. (A
    # fork server started by forkserver.ensure_running blocks it in the workers already.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs.exit_with_parent(parent, started)
    procs.settle_collector()


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
