"""The OneRoster REST benchmark (issues 3 and 18): whole ``rostersync sync`` processes.

Run from the repository root::

    python -m tests.benchmarks.bench_oneroster [--scale S,M,L] [--database URL]

For each district size asked, it starts the fake OneRoster server in its own process serving
a generated district, then measures against that one server:

1. the fetch floor: a plain ``httpx.AsyncClient`` (same page size, concurrency and auth as the
   source) downloading and JSON-parsing every page of /orgs, /users, /classes, /enrollments;
   measured again at the end, the faster of the two counts;
2. a first load: ``rostersync sync --full`` into a fresh database;
3. a no-op full run (nothing changed on the server) and the rows it changed;
4. a steady-state full run after 1% of users, classes and enrollments changed;
5. a delta run after another 1% changed.

On PostgreSQL the first load is followed by a ``VACUUM (ANALYZE)`` (not timed): the next
night's run finds its tables vacuumed by autovacuum, not as a load left them seconds before.

Each sync is a whole ``rostersync`` process, started as an operator starts it (interpreter,
imports, config, migration check, recovery, then the sync and its resync jobs); its phases
come from the timestamps of its JSON log, its peak RSS from ``VmHWM`` (see PeakRss). Every figure is printed
as a ratio to the floor. See README.md next to this file for what each printed line means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "district"
#: The server dates each 1% of changes over the day before it (seconds), as a nightly run
#: finds a day's changes: a delta then re-reads only what changed in the last
#: ``delta_overlap`` before the previous run, not every change that run read.
CHANGES_SPREAD = 86_400
COLLECTIONS = ("orgs", "users", "classes", "enrollments")
#: Tables a no-op full run must leave exactly as they were: the directory, the mirror and
#: the queue (a run writes its own record in ``sync_run`` and ``source_state``).
UNWRITTEN_BY_NOOP = (
    "user",
    "user_role",
    "user_site",
    "user_identity",
    "groups",
    "group_owner",
    "group_member",
    "roster_org",
    "roster_person",
    "roster_class",
    "roster_enrollment",
    "resync_job",
    "dirty_class",
    "dirty_member",
)
#: Issue 18's targets: whole processes as ratios to the fetch floor of the same run.
TARGET_FIRST_LOAD = 3.0
TARGET_NOOP = 1.2
TARGET_STEADY = 1.3
TARGET_RSS_MIB = 1024
TARGET_DELTA_SHARE = 0.10


@dataclass(frozen=True)
class Scale:
    schools: int
    teachers: int
    students: int
    classes: int
    students_per_class: int = 25


SCALES = {
    "S": Scale(schools=10, teachers=1_000, students=20_000, classes=4_000),
    "M": Scale(schools=25, teachers=2_500, students=50_000, classes=10_000),
    "L": Scale(schools=100, teachers=10_000, students=200_000, classes=40_000),
    # The mission's largest district: 500,000 students (about 2,600,000 enrollments).
    "XL": Scale(schools=250, teachers=25_000, students=500_000, classes=100_000),
}


def say(text: str) -> None:
    """Progress on stderr; the figures alone go to stdout."""
    print(f"... {text}", file=sys.stderr, flush=True)


# -- the server process ---------------------------------------------------------------------------


def guid(sourced_id: str) -> str:
    """A sourcedId as a real feed spells it: a GUID (the same one for the same id)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, sourced_id))


def with_guids(record: Any) -> Any:
    """``record`` with its own id and every id it refers to as GUIDs (see ``guid``)."""
    from rostersync.source.records import RosterClass, RosterEnrollment, RosterOrg, RosterPerson

    if isinstance(record, RosterEnrollment):
        return replace(
            record,
            sourced_id=guid(record.sourced_id),
            class_id=guid(record.class_id),
            user_id=guid(record.user_id),
        )
    if isinstance(record, RosterPerson):
        return replace(
            record,
            sourced_id=guid(record.sourced_id),
            org_ids=tuple(guid(o) for o in record.org_ids),
        )
    if isinstance(record, RosterClass):
        school = guid(record.school_id) if record.school_id else None
        return replace(record, sourced_id=guid(record.sourced_id), school_id=school)
    if isinstance(record, RosterOrg):
        parent = guid(record.parent_id) if record.parent_id else None
        return replace(record, sourced_id=guid(record.sourced_id), parent_id=parent)
    return record


def aged_roster(scale: Scale, seed: int, ids: str = "serial") -> Any:
    """The generated district with dateLastModified spread over the year before its date.

    The generator stamps every record with one fixed date, so the high-water mark would equal
    every record's date and a delta run (which re-reads ``delta_overlap`` before the mark)
    would re-read the whole district. A real feed's dates are spread out; so are these.
    """
    from rostersync.sampledata import DATE_LAST_MODIFIED, DistrictSpec, iter_district
    from rostersync.source.records import MemoryRoster, Rejected

    spec = DistrictSpec(
        seed=seed,
        schools=scale.schools,
        teachers=scale.teachers,
        students=scale.students,
        classes=scale.classes,
        students_per_class=scale.students_per_class,
    )
    rng = random.Random(seed)
    year = 365 * 24 * 3600
    roster = MemoryRoster()
    lists: dict[str, list[Any]] = {
        "org": roster.orgs,
        "user": roster.persons,
        "class": roster.classes,
        "enrollment": roster.enrollments,
    }
    for record in iter_district(spec):
        if isinstance(record, Rejected):  # the generator makes none; the type allows them
            continue
        when = DATE_LAST_MODIFIED - timedelta(seconds=rng.randrange(year))
        if ids == "guid":
            record = with_guids(record)
        lists[record.entity].append(replace(record, date_last_modified=when))
    return roster


def serve(args: argparse.Namespace) -> int:
    """The fake server in this process until SIGTERM; one JSON line on stdout once it listens."""
    from tests.fakes.oneroster_server import FakeOneRoster, Faults

    started = time.monotonic()
    roster = aged_roster(SCALES[args.scale], args.seed, args.ids)
    faults = Faults(delay=args.latency / 1000)
    srv = FakeOneRoster(roster, version=args.version, record_requests=False, faults=faults)
    del roster
    with srv:
        stats = json.loads(_http("GET", srv.origin + "/_admin/stats"))
        print(
            json.dumps(
                {
                    "origin": srv.origin,
                    "base_url": srv.base_url,
                    "auth": srv.auth_config(),
                    "records": stats["records"],
                    "load_seconds": round(time.monotonic() - started, 1),
                }
            ),
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _mutate(origin: str, seed: int) -> dict[str, int]:
    """Change 1% of the records on the server, dated over the day before now."""
    url = f"{origin}/_admin/mutate?fraction=0.01&seed={seed}&spread={CHANGES_SPREAD}"
    counts: dict[str, int] = json.loads(_http("POST", url))
    return counts


def _http(method: str, url: str) -> bytes:
    """A call to the fake server's own ``/_admin`` endpoints (no auth there)."""
    answer = httpx.request(method, url, timeout=600)
    answer.raise_for_status()
    return answer.content


@contextlib.contextmanager
def server_process(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "tests.benchmarks.bench_oneroster",
        "_serve",
        "--scale",
        args.scale,
        "--version",
        args.version,
        "--seed",
        str(args.seed),
        "--ids",
        args.ids,
        "--latency",
        str(args.latency),
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the fake server exited ({proc.wait()}) before it listened")
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        _reap(proc, 60)


def _reap(proc: subprocess.Popen[Any], seconds: float) -> None:
    """Wait for a child asked to end; kill it if it has not within ``seconds``."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _child_env() -> dict[str, str]:
    """This environment for a timed child, with bytecode caching on: a child that compiled
    every module it imports would time the compiler."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


# -- the fetch floor --------------------------------------------------------------------------------


@dataclass
class Floor:
    seconds: float
    pages: int
    records: int


async def fetch_floor(source: dict[str, Any]) -> Floor:
    """Every page of every collection with a plain client: the time no sync can beat."""
    from connectors.oneroster.config import OneRosterSourceConfig
    from connectors.oneroster.connector import build_auth

    config = OneRosterSourceConfig.model_validate(source)
    auth = build_auth(SOURCE, config)  # the same signing / token as the source's
    limit = config.page_size
    pages = records = 0
    started = time.perf_counter()
    async with httpx.AsyncClient(**config.http_client_options(), auth=auth) as http:
        slots = asyncio.Semaphore(config.max_concurrency)

        async def page(collection: str, offset: int) -> tuple[int, str | None]:
            async with slots:
                answer = await http.get(
                    f"{config.base_url}/{collection}",
                    params={"limit": str(limit), "offset": str(offset)},
                    headers={"Accept": "application/json"},
                )
                answer.raise_for_status()
                body = json.loads(answer.content)
            return len(body[collection]), answer.headers.get("X-Total-Count")

        for collection in COLLECTIONS:
            count, total = await page(collection, 0)
            pages, records = pages + 1, records + count
            if total is not None:
                offsets = range(limit, int(total), limit)
                for got, _ in await asyncio.gather(*(page(collection, o) for o in offsets)):
                    pages, records = pages + 1, records + got
            else:  # no total: page by page until a short one
                offset = 0
                while count == limit:
                    offset += limit
                    count, _ = await page(collection, offset)
                    pages, records = pages + 1, records + count
    return Floor(time.perf_counter() - started, pages, records)


# -- syncs as whole processes ----------------------------------------------------------------------


def _cli() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m rostersync``."""
    script = Path(sys.executable).with_name("rostersync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rostersync"]


#: Log events that end a phase of a ``rostersync sync`` process, in order.
PHASES = (("sync_started", "start-up"), ("fetch_done", "fetch"), ("sync_applied", "apply"))


@dataclass
class SyncResult:
    """One ``rostersync sync`` process: its wall time, the phases its JSON log shows, its
    peak RSS and the run's report (``sync --json``)."""

    seconds: float
    phases: dict[str, float]
    maxrss_kib: int
    status: str
    mode: str
    error: str | None
    warnings: list[str]
    counts: dict[str, int]
    fetched: dict[str, int]

    def breakdown(self) -> str:
        return " + ".join(f"{name} {s:.1f} s" for name, s in self.phases.items())


def _phases(log: Path, started: float, ended: float) -> dict[str, float]:
    """Where a process's time went, from the timestamps of its JSON log lines: start-up
    (interpreter, imports, config, migration check, recovery) up to ``sync_started``, the
    fetch, the apply, the drain (up to the last ``resync_batch_done``) and the exit."""
    marks: dict[str, float] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(line)
            stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            marks[event["event"]] = stamp.timestamp()  # the last of each kind
    out: dict[str, float] = {}
    previous = started
    for event, name in PHASES:
        if event in marks:
            out[name] = marks[event] - previous
            previous = marks[event]
    if "resync_batch_done" in marks and marks["resync_batch_done"] > previous:
        out["drain"] = marks["resync_batch_done"] - previous
        previous = marks["resync_batch_done"]
    out["exit"] = ended - previous
    return out


class PeakRss:
    """A process's peak resident set (``VmHWM``), read from /proc while it runs.

    Not ``wait4``'s ``ru_maxrss``: Linux carries the high-water mark of the image a process
    replaced into it at ``exec``, so a sync started from this script would report this
    script's own size once the script has grown (it holds every row's digest for the no-op
    check). The last read comes at most ``every`` seconds before the end, when a sync is
    closing, not at its peak."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.kib = 0
        self._path = Path(f"/proc/{pid}/status")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)
        self._thread.start()

    def _watch(self, every: float) -> None:
        while not self._done.is_set():
            try:
                for line in self._path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.kib = max(self.kib, int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                return  # gone, or no /proc here: ru_maxrss stands in
            self._done.wait(every)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_cli(config: Path, mode: str, workdir: Path) -> SyncResult:
    """``rostersync --config CONFIG sync --full|--delta --json`` as an operator runs it: a
    whole process, interpreter start-up, imports, migration check and recovery included."""
    stamp = time.monotonic_ns()
    log = workdir / f"sync-{mode}-{stamp}.log"
    command = [*_cli(), "--config", str(config), "sync", f"--{mode}", "--json"]
    env = _child_env()
    with open(log, "w", encoding="utf-8") as err:
        started = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=err, env=env)
        assert proc.stdout is not None
        peak = PeakRss(proc.pid)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        peak.stop()
        seconds = time.perf_counter() - t0
        ended = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        report = json.loads(out)["runs"][0]
    except (ValueError, KeyError, IndexError):
        raise SystemExit(
            f"the {mode} sync process failed (exit {proc.returncode}); see {log}"
        ) from None
    return SyncResult(
        seconds=seconds,
        phases=_phases(log, started, ended),
        maxrss_kib=peak.kib or usage.ru_maxrss,
        status=report["status"],
        mode=report["mode"],
        error=report["error"],
        warnings=report["warnings"],
        counts=report["counts"],
        fetched=report["fetched"],
    )


def warm(args: argparse.Namespace) -> int:
    """Syncs run as the daemon runs its scheduled ones: one process, its imports, store and
    engine kept between runs. For each line on stdin (``full`` or ``delta``), the sync and
    the drain of the jobs it queued, and one JSON line on stdout: the seconds between the
    two (no interpreter start-up, imports or exit in them) and the run's report."""
    from rostersync.cli.app import App
    from rostersync.sync.runs import load_report

    App.whole_process = True  # the daemon's collector settings, as `rostersync run` has them
    app = App(args.config, None)

    async def serve() -> None:
        engine = app.engine()
        loop = asyncio.get_running_loop()
        while mode := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            started = time.perf_counter()
            report = await engine.sync(SOURCE, mode=mode)
            await engine.drain()
            seconds = time.perf_counter() - started
            with app.store.read() as conn:  # with what the drain did, as `sync --json` shows
                report = load_report(conn, report.id)
            print(
                json.dumps(
                    {
                        "seconds": seconds,
                        "status": report.status,
                        "mode": report.mode,
                        "error": report.error,
                        "warnings": report.warnings,
                        "counts": report.counts,
                    }
                ),
                flush=True,
            )

    asyncio.run(serve())
    return 0


@dataclass
class WarmResult:
    seconds: float
    status: str
    mode: str
    error: str | None
    warnings: list[str]
    counts: dict[str, int]


class WarmProcess:
    """The parent's end of :func:`warm`: one child process, a run per call."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self._log = open(workdir / f"warm-{time.monotonic_ns()}.log", "w", encoding="utf-8")  # noqa: SIM115
        env = _child_env()
        command = [sys.executable, "-m", "tests.benchmarks.bench_oneroster", "_warm"]
        self._proc = subprocess.Popen(
            [*command, "--config", str(config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )

    def run(self, mode: str) -> WarmResult:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(mode + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise SystemExit(f"the warm process exited ({self._proc.wait()}); see {self._log.name}")
        result = WarmResult(**json.loads(line))
        check_run(f"warm {mode}", result, mode)
        return result

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()  # an empty line: the child's loop ends
        _reap(self._proc, 120)
        self._proc.stdout.close()
        self._log.close()


# -- the database ----------------------------------------------------------------------------------


def row_digests(url: str) -> dict[str, set[bytes]]:
    """Per table a no-op must not write, a fingerprint of every row (rows compared whole)."""
    from sqlalchemy import text

    from rostersync.store.db import Store

    store = Store(url, create=False)
    out: dict[str, set[bytes]] = {}
    try:
        with store.read() as conn:
            for table in UNWRITTEN_BY_NOOP:
                out[table] = {
                    hashlib.blake2b(repr(tuple(row)).encode(), digest_size=12).digest()
                    for row in conn.execute(text(f'SELECT * FROM "{table}"'))
                }
    finally:
        store.dispose()
    return out


def rows_changed(before: dict[str, set[bytes]], after: dict[str, set[bytes]]) -> dict[str, int]:
    """Rows added, removed or changed (a changed row counts once), by table."""
    out = {t: max(len(before[t] - after[t]), len(after[t] - before[t])) for t in before}
    return {t: n for t, n in out.items() if n}


def night_after_load(url: str) -> float | None:
    """PostgreSQL: ``VACUUM (ANALYZE)`` every table, as autovacuum does within a minute of a
    first load and so before the next night's run (it sets the visibility map that the
    mirror's index-only scans read); seconds it took, None on SQLite (nothing to do). Not
    part of any timed run."""
    from sqlalchemy import create_engine, text

    if not url.startswith("postgresql"):
        return None
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    try:
        with engine.connect() as conn:
            conn.execute(text("VACUUM (ANALYZE)"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


def prepare_database(url: str) -> None:
    from sqlalchemy import text

    from rostersync.store.db import Store

    store = Store(url)
    try:
        store.upgrade()
        with store.read() as conn:
            users = conn.execute(text('SELECT count(*) FROM "user"')).scalar_one()
    finally:
        store.dispose()
    if users:
        raise SystemExit(f"{url}: the database already has {users} users; give an empty one")


# -- the benchmark ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def figure(label: str, run: SyncResult, floor: float, target: float | None) -> None:
    """One whole-process figure as seconds and as a ratio to the floor, then its phases."""
    ratio = run.seconds / floor
    aim = f"; target <= {target}x: {verdict(ratio <= target)}" if target is not None else ""
    print(f"{label}: {run.seconds:.2f} s ({ratio:.2f}x floor{aim})", flush=True)
    print(
        f"    {run.breakdown()}; peak RSS {run.maxrss_kib / 1024:.0f} MiB; status {run.status}",
        flush=True,
    )


def benchmark(args: argparse.Namespace) -> int:
    scales = [name.strip().upper() for name in args.scale.split(",")]
    if args.database and len(scales) > 1 and "{scale}" not in args.database:
        raise SystemExit(
            "--database with several scales: each needs an empty database of its own; "
            "write {scale} in the URL (postgresql+psycopg://u@h/bench_{scale})"
        )
    for name in scales:
        code = benchmark_scale(args, name)
        if code:
            return code
    return 0


def benchmark_scale(args: argparse.Namespace, name: str) -> int:
    if name not in SCALES:
        raise SystemExit(f"--scale: unknown district {name!r} (choose from {', '.join(SCALES)})")
    scale = SCALES[name]
    workdir = Path(args.workdir) / name if args.workdir else None
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"rs-bench-{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = args.database.replace("{scale}", name.lower()) if args.database else None
    database = database or f"sqlite:///{workdir / 'bench.db'}"
    print(
        f"district {name}: {scale.schools} schools, {scale.teachers:,} teachers, "
        f"{scale.students:,} students, {scale.classes:,} classes x {scale.students_per_class} "
        f"students; OneRoster {args.version}, page_size {args.page_size}, "
        f"max_concurrency {args.max_concurrency}; {args.ids} sourcedIds; "
        f"{f'server latency {args.latency:g} ms; ' if args.latency else ''}"
        f"database {_safe(database)}",
        flush=True,
    )
    prepare_database(database)
    say(f"{name}: starting the fake server (generating the district)")
    serve_args = argparse.Namespace(**{**vars(args), "scale": name})
    with server_process(serve_args) as info:
        records = info["records"]
        say(f"server ready in {info['load_seconds']} s: {records}")
        source = {
            "type": "oneroster",
            "base_url": info["base_url"],
            "auth": info["auth"],
            "page_size": args.page_size,
            "max_concurrency": args.max_concurrency,
            "timeout": "120s",
        }
        config = workdir / "rostersync.yaml"
        config.write_text(yaml.safe_dump(config_document(database, source)), encoding="utf-8")
        stats = info["origin"] + "/_admin/stats"

        say("fetch floor")
        floors = [asyncio.run(fetch_floor(source))]

        say("first load")
        requests_before = json.loads(_http("GET", stats))["data_requests"]
        full = run_cli(config, "full", workdir)
        requests = json.loads(_http("GET", stats))["data_requests"] - requests_before
        check_run("first load", full, "full")

        vacuumed = night_after_load(database) if args.night else None
        if vacuumed is not None:
            say(
                f"the night after the load: VACUUM (ANALYZE), as autovacuum does ({vacuumed:.1f} s)"
            )

        say("no-op full run")
        before = row_digests(database)
        noop = run_cli(config, "full", workdir)
        check_run("no-op", noop, "full")
        changed = rows_changed(before, row_digests(database))
        del before

        say("changing 1% of the records on the server; full run")
        steady_changes = _mutate(info["origin"], 1)
        steady = run_cli(config, "full", workdir)
        check_run("steady-state", steady, "full")

        say("changing another 1%; delta run")
        delta_changes = _mutate(info["origin"], 2)
        delta = run_cli(config, "delta", workdir)
        check_run("delta", delta, "delta")

        # The same kinds of run in a process that stays up, as the daemon's scheduled runs
        # are: after the whole-process runs, so that those see no other process's store.
        say("warm process: a first full run (not timed), a no-op, 1% changed, another 1%")
        warm_proc = WarmProcess(config, workdir)
        try:
            warm_proc.run("full")  # what the delta run left to a full run, and lazy imports
            warm_noop = warm_proc.run("full")
            _mutate(info["origin"], 3)
            warm_steady = warm_proc.run("full")
            _mutate(info["origin"], 4)
            warm_delta = warm_proc.run("delta")
        finally:
            warm_proc.close()

        say("fetch floor again")
        floors.append(asyncio.run(fetch_floor(source)))

    # The faster of two floors, one before and one after the syncs: the machine's speed moves.
    floor = min(floors, key=lambda f: f.seconds)
    print(
        f"fetch floor: {floor.seconds:.2f} s ({floor.pages:,} pages, {floor.records:,} records; "
        f"measured {', '.join(f'{f.seconds:.2f}' for f in floors)} s)",
        flush=True,
    )
    figure("first load", full, floor.seconds, TARGET_FIRST_LOAD)
    print(
        f"    {requests:,} requests; {full.counts['users_created']:,} users, "
        f"{full.counts['groups_created']:,} groups created",
        flush=True,
    )
    figure("no-op full run", noop, floor.seconds, TARGET_NOOP)
    written = ", ".join(f"{t} {n}" for t, n in changed.items()) or "none"
    print(
        f"    rows changed in the directory, mirror and queue: {written} "
        f"(target none: {verdict(not changed)})",
        flush=True,
    )
    figure("steady-state full run (1% changed)", steady, floor.seconds, TARGET_STEADY)
    print(
        f"    changed on the server {steady_changes}; groups updated "
        f"{steady.counts['groups_updated']:,}",
        flush=True,
    )
    figure("delta run (1% changed)", delta, floor.seconds, None)
    share = delta.seconds / full.seconds
    print(
        f"    {share:.1%} of the first load (target <= {TARGET_DELTA_SHARE:.0%}: "
        f"{verdict(share <= TARGET_DELTA_SHARE)}); changed on the server {delta_changes}; "
        f"fetched {delta.fetched}; groups updated {delta.counts['groups_updated']:,}",
        flush=True,
    )
    print(
        "in a process that stays up, as the daemon's scheduled runs (no interpreter start-up, "
        "imports or exit; for comparison, the targets are the whole processes'):",
        flush=True,
    )
    for label, result in (
        ("no-op full run", warm_noop),
        ("steady-state full run (1% changed)", warm_steady),
        ("delta run (1% changed)", warm_delta),
    ):
        extra = (
            f"; {result.seconds / full.seconds:.1%} of the first load's whole process"
            if "delta" in label
            else ""
        )
        print(
            f"    {label}: {result.seconds:.2f} s ({result.seconds / floor.seconds:.2f}x floor"
            f"{extra}); groups updated {result.counts.get('groups_updated', 0):,}",
            flush=True,
        )
    peak_mib = max(r.maxrss_kib for r in (full, noop, steady, delta)) / 1024
    print(
        f"peak RSS: {peak_mib:.0f} MiB (target <= {TARGET_RSS_MIB} MiB: "
        f"{verdict(peak_mib <= TARGET_RSS_MIB)})",
        flush=True,
    )
    if not args.workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work files (database, config, one log per sync): {workdir}", flush=True)
    return 0


def config_document(database: str, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "organization": "Benchmark District",
        "database": database,
        "roles": ["Teacher"],
        "sites": ["North High"],
        "provisioning": {"default_role": "Teacher", "default_site": "North High"},
        # A benchmark district is not a shrinking source: keep the safety rules out of the way.
        "safety": {"max_removals": 1_000_000, "max_removal_percent": 100},
        "sources": {SOURCE: source},
    }


def check_run(what: str, result: SyncResult | WarmResult, mode: str) -> None:
    if result.status not in ("succeeded", "succeeded_with_errors") or result.mode != mode:
        raise SystemExit(
            f"the {what} run did not succeed as a {mode} run: status {result.status}, "
            f"mode {result.mode}, error {result.error}"
        )
    for warning in result.warnings:
        say(f"{what} run warning: {warning}")


def _safe(url: str) -> str:
    """A database URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by the store later
        return url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_oneroster",
        description="Large-district benchmark of the OneRoster REST source.",
    )
    sub = parser.add_subparsers(dest="command")
    serve_p = sub.add_parser("_serve", help=argparse.SUPPRESS)
    warm_p = sub.add_parser("_warm", help=argparse.SUPPRESS)
    warm_p.add_argument("--config", required=True)
    serve_p.add_argument("--scale", choices=sorted(SCALES), default="L")
    parser.add_argument(
        "--scale",
        default="S,M,L",
        help="districts to measure, comma-separated, each against its own server: "
        + ", ".join(SCALES),
    )
    for p in (parser, serve_p):
        p.add_argument("--version", choices=["1.1", "1.2"], default="1.1")
        p.add_argument(
            "--latency",
            type=float,
            default=0.0,
            help="milliseconds the server waits before each page, as a remote server's "
            "answers take (the floor waits too)",
        )
        p.add_argument("--seed", type=int, default=1)
        p.add_argument(
            "--ids",
            choices=["serial", "guid"],
            default="serial",
            help="sourcedIds as the generator numbers them, or as GUIDs (as most feeds send)",
        )
    parser.add_argument("--database", help="a database URL (default: a fresh SQLite file)")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--workdir", help="keep the database and logs here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument(
        "--no-night",
        dest="night",
        action="store_false",
        help="PostgreSQL: run the no-op right after the first load, its tables not vacuumed "
        "(by default they are, as autovacuum has by the next night's run)",
    )
    args = parser.parse_args(argv)
    if args.command == "_serve":
        return serve(args)
    if args.command == "_warm":
        return warm(args)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
