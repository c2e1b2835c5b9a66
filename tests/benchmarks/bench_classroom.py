"""Benchmark: the Google Classroom connector's full fetch of a large Workspace domain.

A fake domain (by default 5,000 courses x 25 students, one teacher per course from a pool of
1,000) is served by the loopback fake Classroom in a child process; the connector reads all of
it twice, with the quota set high enough not to bind and with the default quota (3,000 per
minute per project, 1,200 per user). For each run it prints the API calls made, the wall time,
the quota-bound minimum (calls / the binding per-minute rate) and the ratio wall / minimum.

At the real rate the default-quota run takes about nine minutes; ``--time-scale K`` multiplies
both quota rates (and the fake's own server-side quota) by K, so it runs K times faster while
the call count and the ratio keep their meaning. Keep K x 1,200 per minute well below what the
unbound run shows the machine can serve, or the ratio measures the machine, not the quota.

    python -m tests.benchmarks.bench_classroom [--courses 5000 --students-per-course 25]
        [--teachers 1000 --time-scale 10 --latency 0 --max-concurrency 4 --page-size 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.google_classroom import GoogleClassroomConnector, GoogleClassroomSourceConfig
from rostersync import logs
from rostersync.sampledata import DistrictSpec, generate_district
from rostersync.source.connector import ConnectorContext, FetchMode
from rostersync.source.records import STUDENT, TEACHER, MemoryRoster
from tests.fakes.classroom_server import DEFAULT_ROSTER_PAGE, FakeClassroom, _error, _page

CLIENT_EMAIL = "rostersync-bench@district-sync.iam.gserviceaccount.com"
ADMIN = "admin@example.org"
UNBOUND_PER_MINUTE = 10_000_000
DEFAULT_PER_MINUTE = 3000
DEFAULT_PER_USER_PER_MINUTE = 1200


# -- the server side (child process) ---------------------------------------------------------


class IndexedClassroom(FakeClassroom):
    """The fake Classroom with its answers indexed up front.

    The plain fake scans the whole roster on every request, which is right for tests and far
    too slow for 130,000 enrollments x 10,000 requests; the answers (and the paging, the auth
    and the fault handling, which are inherited) are the same.
    """

    def __init__(self, roster: MemoryRoster, **options: Any) -> None:
        super().__init__(roster, **options)
        self.quota_errors = 0
        self._class_ids = {c.sourced_id for c in roster.classes}
        persons = {p.sourced_id: p for p in roster.persons}
        self._members: dict[tuple[str, str], list[dict[str, Any]]] = {}
        owners: dict[str, str] = {}
        for e in roster.enrollments:
            if e.role == TEACHER and e.primary:
                owners.setdefault(e.class_id, e.user_id)
            person = persons.get(e.user_id)
            profile: dict[str, Any] = {"id": e.user_id}
            if person is not None:
                profile["name"] = {
                    "givenName": person.given_name,
                    "familyName": person.family_name,
                    "fullName": person.display_name,
                }
                if person.email:
                    profile["emailAddress"] = person.email
            member = {"courseId": e.class_id, "userId": e.user_id, "profile": profile}
            self._members.setdefault((e.class_id, e.role), []).append(member)
        self._courses: list[dict[str, Any]] = []
        for c in roster.classes:
            course: dict[str, Any] = {
                "id": c.sourced_id,
                "name": c.title,
                "courseState": "ACTIVE" if c.status == "active" else "ARCHIVED",
            }
            if c.sourced_id in owners:
                course["ownerId"] = owners[c.sourced_id]
            self._courses.append(course)

    def _fault(self) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        fault = super()._fault()
        if fault is not None and fault[0] == 429:
            with self._lock:
                self.quota_errors += 1
        return fault

    def _api(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if parts == ["v1", "courses"] and "teacherId" not in query:
            states = set(query.get("courseStates") or ["ACTIVE", "ARCHIVED"])
            courses = [c for c in self._courses if c["courseState"] in states]
            return _page("courses", courses, query, default_size=100)
        if len(parts) == 4 and parts[:2] == ["v1", "courses"]:
            course_id, which = parts[2], parts[3]
            if which in ("teachers", "students"):
                if course_id not in self._class_ids:
                    return 404, _error(404, "Requested entity was not found.", "NOT_FOUND")
                role = TEACHER if which == "teachers" else STUDENT
                members = self._members.get((course_id, role), [])
                return _page(which, members, query, default_size=DEFAULT_ROSTER_PAGE)
        return super()._api(path, query)


def _serve(
    spec: DistrictSpec,
    public_pem: str,
    server_quota_per_minute: int | None,
    latency: float,
    pipe: Connection,
) -> None:
    roster = generate_district(spec)
    fake = IndexedClassroom(
        roster,
        public_key_pem=public_pem,
        client_email=CLIENT_EMAIL,
        allowed_sub=ADMIN,
        latency=latency,
        server_quota_per_minute=server_quota_per_minute,
    )
    with fake:
        pipe.send((fake.base_url, len(roster.classes), len(roster.enrollments)))
        pipe.recv()  # the parent says stop
        pipe.send(
            {
                "calls": dict(fake.calls),
                "quota_errors": fake.quota_errors,
                "max_in_flight": fake.max_in_flight,
            }
        )


# -- the client side -------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    per_minute: int  # the binding rate: the smaller of the two quotas
    api_calls: int
    wall: float
    classes: int
    enrollments: int
    throttled: int
    server: dict[str, Any]

    @property
    def quota_minimum(self) -> float:
        """Seconds the calls need at least, at the binding per-minute rate."""
        return self.api_calls / (self.per_minute / 60.0)

    @property
    def ratio(self) -> float:
        return self.wall / self.quota_minimum if self.quota_minimum else float("inf")


def _keypair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


async def _fetch_all(
    base_url: str,
    private_pem: str,
    quota: dict[str, int],
    args: argparse.Namespace,
    time_scale: float,
) -> tuple[float, int, int, int, int]:
    config = GoogleClassroomSourceConfig.model_validate(
        {
            "type": "google_classroom",
            "service_account_json": json.dumps(
                {
                    "type": "service_account",
                    "private_key": private_pem,
                    "client_email": CLIENT_EMAIL,
                    "client_id": "104200000000000000001",
                    "token_uri": f"{base_url}/token",
                }
            ),
            "delegated_admin": ADMIN,
            "api_base_url": base_url,
            "page_size": args.page_size,
            "max_concurrency": args.max_concurrency,
            "quota": quota,
            "retry": {"initial_wait": 0.5, "max_wait": 10},
        }
    )
    kinds: Counter[str] = Counter()
    async with httpx.AsyncClient(**config.http_client_options()) as http:
        connector = GoogleClassroomConnector(ConnectorContext("bench", config, http))
        unscale_burst(connector, time_scale)
        start = time.perf_counter()
        async for batch in connector.fetch(FetchMode.FULL, None):
            kinds.update(type(record).__name__ for record in batch)
        wall = time.perf_counter() - start
        await connector.aclose()
    return (
        wall,
        connector.api_calls,
        kinds["RosterClass"],
        kinds["RosterEnrollment"],
        connector.quota.throttled,
    )


def unscale_burst(connector: GoogleClassroomConnector, time_scale: float) -> None:
    """Give the scaled buckets the burst of the real rate, so the run is exactly K x shorter.

    A bucket saves up one twelfth of its per-minute rate; scaling the rate by K would scale
    that free burst by K too while the call count stays the same, flattering the ratio. The
    refill rate already scales exactly, so only the burst is put back.
    """
    if time_scale == 1:
        return
    for bucket in connector.quota.buckets:
        real = max(1, round(bucket.per_minute / time_scale))
        bucket.capacity = float(max(1, math.ceil(real / 12)))
        bucket.tokens = min(bucket.tokens, bucket.capacity)


def run_once(
    label: str,
    spec: DistrictSpec,
    keys: tuple[str, str],
    quota: dict[str, int],
    server_quota: int | None,
    args: argparse.Namespace,
    time_scale: float = 1.0,
) -> Result:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(
        target=_serve, args=(spec, keys[1], server_quota, args.latency, child), daemon=True
    )
    server.start()
    try:
        base_url, classes, enrollments = parent.recv()
        wall, calls, got_classes, got_enrollments, throttled = asyncio.run(
            _fetch_all(base_url, keys[0], quota, args, time_scale)
        )
        parent.send("stop")
        stats = parent.recv()
    finally:
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
    if (got_classes, got_enrollments) != (classes, enrollments):
        raise SystemExit(
            f"{label}: fetched {got_classes} classes / {got_enrollments} enrollments, "
            f"the domain has {classes} / {enrollments}"
        )
    binding = min(quota["per_minute"], quota["per_user_per_minute"])
    return Result(label, binding, calls, wall, got_classes, got_enrollments, throttled, stats)


def report(result: Result) -> str:
    return (
        f"{result.label:<34} api_calls={result.api_calls:>6}  wall={result.wall:8.2f}s  "
        f"quota_min={result.quota_minimum:8.2f}s  ratio={result.ratio:8.2f}  "
        f"(throttled={result.throttled}, server 429s={result.server['quota_errors']}, "
        f"max in flight={result.server['max_in_flight']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_classroom", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--courses", type=int, default=5000)
    parser.add_argument("--students-per-course", type=int, default=25)
    parser.add_argument("--teachers", type=int, default=1000, help="pool, one per course")
    parser.add_argument(
        "--students", type=int, default=20000, help="pool the course rosters are drawn from"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply both quota rates (and the fake's) by this; the run is that much shorter",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per fake API call")
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument(
        "--only", choices=("unbound", "default"), help="run just one of the two configurations"
    )
    args = parser.parse_args(argv)
    logs.configure(level="warning", fmt="console", stream=sys.stderr)

    spec = DistrictSpec(
        teachers=args.teachers,
        students=args.students,
        classes=args.courses,
        students_per_class=args.students_per_course,
        edge_cases=False,
    )
    keys = _keypair()
    scale = args.time_scale
    per_minute = max(1, round(DEFAULT_PER_MINUTE * scale))
    per_user = max(1, round(DEFAULT_PER_USER_PER_MINUTE * scale))
    print(
        f"domain: {args.courses} courses x {args.students_per_course} students, "
        f"{args.teachers} teachers; page_size={args.page_size} "
        f"max_concurrency={args.max_concurrency} latency={args.latency}s "
        f"time_scale={scale:g}"
    )
    results: list[Result] = []
    if args.only in (None, "unbound"):
        unbound = {"per_minute": UNBOUND_PER_MINUTE, "per_user_per_minute": UNBOUND_PER_MINUTE}
        results.append(
            run_once("quota not binding (10,000,000/min)", spec, keys, unbound, None, args)
        )
        print(report(results[-1]), flush=True)
    if args.only in (None, "default"):
        default = {"per_minute": per_minute, "per_user_per_minute": per_user}
        label = f"default quota x{scale:g} ({per_user:,}/min)"
        results.append(run_once(label, spec, keys, default, per_user, args, scale))
        print(report(results[-1]), flush=True)
        real = results[-1].api_calls / (DEFAULT_PER_USER_PER_MINUTE / 60.0)
        print(
            f"{'':<34} at the real rate: quota_min={real / 60:.1f} min, "
            f"expected wall ~{results[-1].ratio * real / 60:.1f} min"
        )
    if len(results) == 2:
        capacity = results[0].api_calls / results[0].wall * 60
        if capacity < 2 * per_user:
            print(
                f"warning: the unbound run managed {capacity:,.0f} calls/min, less than twice "
                f"the scaled quota ({per_user:,}/min): lower --time-scale for a meaningful ratio"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
