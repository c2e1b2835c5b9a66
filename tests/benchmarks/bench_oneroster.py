"""The large-district benchmark of the OneRoster REST source (issue 3, item 9).

Run from the repository root::

    python -m tests.benchmarks.bench_oneroster [--scale L|M|S] [--database URL]

It starts the fake OneRoster server in its own process serving a generated district, then
measures, in this order and against that one server:

1. the fetch floor: a plain ``httpx.AsyncClient`` (same page size, concurrency and auth as the
   source) downloading and JSON-parsing every page of /orgs, /users, /classes, /enrollments;
2. a full sync (``engine.sync`` + ``engine.drain``) into a fresh database, in a child process
   whose peak RSS is read with ``getrusage(RUSAGE_CHILDREN)``;
3. a no-op re-run (full again, nothing changed) and how many directory rows it changed;
4. a delta run after 1% of users, classes and enrollments changed on the server.

Each sync runs in a fresh child process (``_sync``), so its timings and memory are its own; the
times cover ``engine.sync``, ``engine.drain`` and closing the store (on SQLite, its last WAL
checkpoint), not interpreter start-up or migrations.
See README.md next to this file for what each printed line means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
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
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "district"
COLLECTIONS = ("orgs", "users", "classes", "enrollments")
#: Tables a no-op re-run must leave exactly as they were.
DIRECTORY_TABLES = (
    "user",
    "user_role",
    "user_site",
    "user_identity",
    "groups",
    "group_owner",
    "group_member",
)
TARGET_FLOOR_RATIO = 2.0
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
    from tests.fakes.oneroster_server import FakeOneRoster

    started = time.monotonic()
    roster = aged_roster(SCALES[args.scale], args.seed, args.ids)
    srv = FakeOneRoster(roster, version=args.version, record_requests=False)
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
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# -- syncs in child processes ----------------------------------------------------------------------


def child_sync(args: argparse.Namespace) -> int:
    """One sync + drain of the configured source; the outcome as JSON in ``--result``."""
    from rostersync import logs
    from rostersync.config.loader import load_settings
    from rostersync.store.db import Store
    from rostersync.sync.engine import SyncEngine
    from rostersync.sync.runs import load_report

    with open(args.log, "a", encoding="utf-8") as log_file:
        logs.configure(level="info", fmt="json", stream=log_file)
        settings = load_settings(args.config)
        store = Store(settings.database)
        store.ensure_schema()
        engine = SyncEngine(settings, store)

        async def go() -> tuple[int, float, float]:
            t0 = time.perf_counter()
            report = await engine.sync(SOURCE, mode=args.mode, trigger="benchmark")
            t1 = time.perf_counter()
            await engine.drain()
            return report.id, t1 - t0, time.perf_counter() - t1

        run_id, sync_s, drain_s = asyncio.run(go())
        with store.read() as conn:
            report = load_report(conn, run_id)
        # Timed too: on SQLite closing waits for the store's WAL checkpointer and makes the
        # last checkpoint, work that the commits used to do themselves.
        t2 = time.perf_counter()
        store.dispose()
        close_s = time.perf_counter() - t2
    result = {
        "sync_seconds": sync_s,
        "drain_seconds": drain_s,
        "close_seconds": close_s,
        "status": report.status,
        "mode": report.mode,
        "error": report.error,
        "warnings": report.warnings,
        "counts": report.counts,
        "fetched": report.fetched,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    return 0


@dataclass
class SyncResult:
    seconds: float
    sync_seconds: float
    drain_seconds: float
    close_seconds: float
    status: str
    mode: str
    error: str | None
    warnings: list[str]
    counts: dict[str, int]
    fetched: dict[str, int]
    maxrss_kib: int


def run_child(config: Path, mode: str, workdir: Path) -> SyncResult:
    result = workdir / f"result-{mode}-{time.monotonic_ns()}.json"
    command = [
        sys.executable,
        "-m",
        "tests.benchmarks.bench_oneroster",
        "_sync",
        "--config",
        str(config),
        "--mode",
        mode,
        "--result",
        str(result),
        "--log",
        str(workdir / "sync.log"),
    ]
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    if code != 0 or not result.exists():
        raise SystemExit(
            f"the {mode} sync process failed (exit {code}); see {workdir / 'sync.log'}"
        )
    data = json.loads(result.read_text(encoding="utf-8"))
    seconds = data["sync_seconds"] + data["drain_seconds"] + data["close_seconds"]
    return SyncResult(seconds=seconds, **data)


# -- the database ----------------------------------------------------------------------------------


def row_digests(url: str) -> dict[str, set[bytes]]:
    """Per directory table, a fingerprint of every row (rows compared whole, updates included)."""
    from sqlalchemy import text

    from rostersync.store.db import Store

    store = Store(url)
    out: dict[str, set[bytes]] = {}
    try:
        with store.read() as conn:
            for table in DIRECTORY_TABLES:
                out[table] = {
                    hashlib.blake2b(repr(tuple(row)).encode(), digest_size=12).digest()
                    for row in conn.execute(text(f'SELECT * FROM "{table}"'))
                }
    finally:
        store.dispose()
    return out


def rows_changed(before: dict[str, set[bytes]], after: dict[str, set[bytes]]) -> int:
    """Rows added, removed or changed (a changed row counts once) across the directory tables."""
    return sum(max(len(before[t] - after[t]), len(after[t] - before[t])) for t in before)


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


def benchmark(args: argparse.Namespace) -> int:
    scale = SCALES[args.scale]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rs-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = args.database or f"sqlite:///{workdir / 'bench.db'}"
    print(
        f"district {args.scale}: {scale.schools} schools, {scale.teachers:,} teachers, "
        f"{scale.students:,} students, {scale.classes:,} classes x {scale.students_per_class} "
        f"students; OneRoster {args.version}, page_size {args.page_size}, "
        f"max_concurrency {args.max_concurrency}; {args.ids} sourcedIds; "
        f"database {_safe(database)}",
        flush=True,
    )
    prepare_database(database)
    say("starting the fake server (generating the district)")
    with server_process(args) as info:
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
        floor = asyncio.run(fetch_floor(source))
        print(
            f"fetch floor: {floor.seconds:.1f} s ({floor.pages:,} pages, "
            f"{floor.records:,} records)",
            flush=True,
        )

        say("full sync")
        requests_before = json.loads(_http("GET", stats))["data_requests"]
        full = run_child(config, "full", workdir)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        requests = json.loads(_http("GET", stats))["data_requests"] - requests_before
        check_run("full", full, "full")
        ratio = full.seconds / floor.seconds
        print(
            f"full sync: {full.seconds:.1f} s ({ratio:.2f}x floor; target <= "
            f"{TARGET_FLOOR_RATIO}x: {verdict(ratio <= TARGET_FLOOR_RATIO)})",
            flush=True,
        )
        print(
            f"    sync {full.sync_seconds:.1f} s + drain {full.drain_seconds:.1f} s + close "
            f"{full.close_seconds:.1f} s; "
            f"{requests:,} requests; {full.counts['users_created']:,} users, "
            f"{full.counts['groups_created']:,} groups created; status {full.status}",
            flush=True,
        )
        peak_mib = peak_kib / 1024
        print(
            f"peak RSS: {peak_mib:.0f} MiB (target <= {TARGET_RSS_MIB} MiB: "
            f"{verdict(peak_mib <= TARGET_RSS_MIB)})",
            flush=True,
        )

        say("no-op re-run")
        before = row_digests(database)
        noop = run_child(config, "full", workdir)
        check_run("no-op", noop, "full")
        changed = rows_changed(before, row_digests(database))
        del before
        print(
            f"no-op re-run: {noop.seconds:.1f} s, directory rows changed: {changed} "
            f"(target 0: {verdict(changed == 0)})",
            flush=True,
        )
        print(
            f"    sync {noop.sync_seconds:.1f} s + drain {noop.drain_seconds:.1f} s + close "
            f"{noop.close_seconds:.1f} s; "
            f"resync jobs queued {noop.counts['resync_queued']}",
            flush=True,
        )

        say("changing 1% of the records on the server")
        mutated = json.loads(_http("POST", info["origin"] + "/_admin/mutate?fraction=0.01"))
        delta = run_child(config, "delta", workdir)
        check_run("delta", delta, "delta")
        share = delta.seconds / full.seconds
        print(
            f"delta 1%: {delta.seconds:.1f} s ({share:.1%} of full; target <= "
            f"{TARGET_DELTA_SHARE:.0%}: {verdict(share <= TARGET_DELTA_SHARE)})",
            flush=True,
        )
        print(
            f"    sync {delta.sync_seconds:.1f} s + drain {delta.drain_seconds:.1f} s + close "
            f"{delta.close_seconds:.1f} s; "
            f"changed on the server {mutated}; fetched {delta.fetched}; "
            f"groups updated {delta.counts['groups_updated']:,}",
            flush=True,
        )
    if not args.workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work files (database, sync.log): {workdir}", flush=True)
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


def check_run(what: str, result: SyncResult, mode: str) -> None:
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
    sync_p = sub.add_parser("_sync", help=argparse.SUPPRESS)
    for p in (parser, serve_p):
        p.add_argument("--scale", choices=sorted(SCALES), default="L")
        p.add_argument("--version", choices=["1.1", "1.2"], default="1.1")
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
    sync_p.add_argument("--config", required=True)
    sync_p.add_argument("--mode", choices=["full", "delta"], required=True)
    sync_p.add_argument("--result", required=True)
    sync_p.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    if args.command == "_serve":
        return serve(args)
    if args.command == "_sync":
        return child_sync(args)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
