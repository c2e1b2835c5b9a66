"""End to end: the OneRoster REST connector through the sync engine against the fake server.

Every test runs the real path: YAML settings -> entry-point connector -> httpx over loopback ->
staging -> apply -> resync workers -> directory tables, on SQLite and PostgreSQL. The expected
directory is never written by hand where it can be derived: a OneRoster CSV sync of the same
roster into a fresh SQLite store is the reference ("what the CSV drop of this roster gives").
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text
from structlog.testing import capture_logs

from rostersync.config.loader import load_settings_text
from rostersync.config.models import Settings
from rostersync.resync.queue import queue_resync
from rostersync.sampledata import (
    DATE_LAST_MODIFIED,
    EDGE_ELIGIBLE,
    EDGE_INELIGIBLE,
    DistrictSpec,
    generate_district,
    write_oneroster_csv,
)
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    MemoryRoster,
    RosterClass,
    RosterEnrollment,
)
from rostersync.store.db import Store
from rostersync.sync import provisioning
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import RunReport, load_report
from tests.fakes.oneroster_server import FakeOneRoster, Faults, Quirks
from tests.sync.helpers import groups, snapshot, users

pytestmark = pytest.mark.slow

SOURCE = "district"
SPEC = DistrictSpec(seed=7, schools=2, teachers=8, students=120, classes=16, students_per_class=6)
FAST_RETRY = {"initial_wait": 0.01, "max_wait": 0.05, "max_attempts": 4}
SECRET = "wrong-secret-e2e-4f1c"  # a distinctive string to look for in messages and logs

Directory = tuple[dict[str, Any], dict[tuple[str, str], Any]]


def aged_district(spec: DistrictSpec = SPEC) -> MemoryRoster:
    """The generated district with dateLastModified spread over the past (as in a real feed).

    The generator stamps every record with one date, so the delta overlap would re-read all of
    them; spreading the dates makes a delta run read only what changed (plus the newest few).
    """
    roster = generate_district(spec)

    def aged(records: list[Any]) -> list[Any]:
        return [
            replace(r, date_last_modified=DATE_LAST_MODIFIED - timedelta(hours=1 + i))
            for i, r in enumerate(records)
        ]

    return MemoryRoster(
        aged(roster.orgs), aged(roster.persons), aged(roster.classes), aged(roster.enrollments)
    )


def settings_for(tmp_path: Path, source: dict[str, Any]) -> Settings:
    data = {
        "organization": "Springfield Public Schools",
        "roles": ["Teacher"],
        "sites": ["North High", "South Middle"],
        "provisioning": {
            "default_role": "Teacher",
            "default_site": "North High",
            "site_map": {"sch-002": "South Middle"},
        },
        "sources": {SOURCE: source},
    }
    return load_settings_text(yaml.safe_dump(data), base_dir=tmp_path)


def rest_source(srv: FakeOneRoster, **overrides: Any) -> dict[str, Any]:
    return srv.source_config(**({"page_size": 40, "retry": FAST_RETRY} | overrides))


async def run(engine: SyncEngine, mode: str | None = None) -> RunReport:
    """One sync, then the resync jobs it queued; the report with the group counts added."""
    report = await engine.sync(SOURCE, mode=mode)
    await engine.drain()
    with engine.store.read() as conn:
        return load_report(conn, report.id)


def directory(store: Store) -> Directory:
    """Users and groups in a backend-neutral form (member lists sorted by sourcedId)."""
    people = {
        email: (
            u["display_name"],
            tuple(sorted(u["roles"])),
            tuple(sorted(u["sites"])),
            u["status"],
        )
        for email, u in users(store).items()
    }
    sets = {
        (g["source"], g["external_id"]): (
            g["name"],
            tuple(sorted(g["owners"])),
            tuple(sorted((m["sourced_id"], m["email"], m["name"]) for m in g["members"])),
        )
        for g in groups(store).values()
    }
    return people, sets


async def csv_reference(roster: MemoryRoster, tmp_path: Path) -> Directory:
    """The directory a OneRoster CSV sync of `roster` gives, in a fresh SQLite store."""
    where = tmp_path / f"reference-{random.randrange(10**9)}"
    write_oneroster_csv(roster, where / "drop")
    ref = Store(f"sqlite:///{where / 'ref.db'}")
    ref.upgrade()
    try:
        settings = settings_for(where, {"type": "oneroster_csv", "path": str(where / "drop")})
        report = await run(SyncEngine(settings, ref))
        assert report.status in ("succeeded", "succeeded_with_errors"), report.error
        return directory(ref)
    finally:
        ref.dispose()


def change_counts(report: RunReport) -> dict[str, int]:
    """The counts that say what a run changed (rejections describe the data, not changes)."""
    return {k: v for k, v in report.counts.items() if k != "records_rejected"}


def owned_classes(roster: MemoryRoster, teacher: str) -> list[str]:
    return sorted(
        e.class_id
        for e in roster.enrollments
        if e.user_id == teacher and e.role == TEACHER and e.status == "active"
    )


def students_of(roster: MemoryRoster, class_id: str) -> list[str]:
    return sorted(
        e.user_id
        for e in roster.enrollments
        if e.class_id == class_id and e.role == STUDENT and e.status == "active"
    )


@pytest.fixture(params=["1.1", "1.2"], ids=["v1p1-oauth1", "v1p2-oauth2"])
def server(request: pytest.FixtureRequest) -> Iterator[FakeOneRoster]:
    with FakeOneRoster(aged_district(), version=request.param) as srv:
        yield srv


@pytest.fixture
def v11_server() -> Iterator[FakeOneRoster]:
    with FakeOneRoster(aged_district(), version="1.1") as srv:
        yield srv


async def test_full_run_gives_what_the_csv_drop_gives(
    server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A full REST run (OAuth1 on 1.1, OAuth2 on 1.2) creates the users and groups a CSV sync of the same roster does."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(server)), store)
    report = await run(engine)

    assert report.status == "succeeded_with_errors"  # the edge teacher without an email
    assert [r["sourced_id"] for r in report.rejected] == ["t-edge-noemail"]
    assert report.mode == "full"
    people, sets = directory(store)
    assert (people, sets) == await csv_reference(server.roster, tmp_path)
    by_id = {p.sourced_id: p for p in server.roster.persons}
    emails = set(people)
    eligible = {(by_id[t].email or "").lower() for t in EDGE_ELIGIBLE}
    assert "" not in eligible and eligible <= emails
    assert not {(by_id[t].email or "").lower() for t in EDGE_INELIGIBLE} & emails
    assert {s for _, _, s, _ in people.values()} == {("North High",), ("South Middle",)}
    assert report.counts["users_created"] == len(people) > 5
    assert report.counts["groups_created"] == len(sets)
    assert all(owners and members for _, owners, members in sets.values())
    auth = server.data_requests()[0].headers["authorization"]
    assert auth.startswith("OAuth " if server.version == "1.1" else "Bearer ")
    assert ('oauth_signature_method="HMAC-SHA256"' in auth) == (server.version == "1.1")
    assert server.tokens_issued == (1 if server.version == "1.2" else 0)


async def test_delta_run_applies_exactly_the_changes(
    server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A delta run after a rename, a deleted enrollment and a new class changes just those groups."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(server)), store)
    await run(engine, "full")
    people_before, sets_before = directory(store)
    roster = server.roster

    teacher = next(
        e.user_id for e in roster.enrollments if e.class_id == "c-00001" and e.role == TEACHER
    )
    renamed = students_of(roster, "c-00001")[0]
    server.update("user", renamed, given_name="Zebulon")
    gone = next(
        e
        for e in roster.enrollments
        if e.class_id == "c-00002" and e.role == STUDENT and e.user_id != renamed
    )
    server.delete("enrollment", gone.sourced_id)
    newcomers = [s for s in students_of(roster, "c-00003") if s != renamed][:3]
    server.add(RosterClass("c-new-robotics", "Robotics (P9)", school_id="sch-001"))
    server.add(RosterEnrollment("e-new-t", "c-new-robotics", teacher, TEACHER, primary=True))
    for n, student in enumerate(newcomers):
        server.add(RosterEnrollment(f"e-new-s{n}", "c-new-robotics", student, STUDENT))
    requests_before = len(server.data_requests())

    report = await run(engine, "delta")

    assert report.status == "succeeded_with_errors", report.error
    assert report.mode == "delta"
    delta_requests = server.data_requests()[requests_before:]
    assert delta_requests and all("filter" in r.params for r in delta_requests)
    # Only the changed records travel, plus the newest record of each collection (the overlap).
    assert report.fetched["persons"] <= 2
    assert report.fetched["classes"] <= 2
    assert report.fetched["enrollments"] <= 1 + 4 + 1
    people, sets = directory(store)
    assert people == people_before
    changed = {k for k in sets.keys() | sets_before.keys() if sets.get(k) != sets_before.get(k)}
    with_renamed = {
        k for k, (_, _, members) in sets_before.items() if renamed in {m[0] for m in members}
    }
    assert changed == with_renamed | {(SOURCE, "c-00002"), (SOURCE, "c-new-robotics")}
    assert gone.user_id not in {m[0] for m in sets[(SOURCE, "c-00002")][2]}
    assert {m[0] for m in sets[(SOURCE, "c-new-robotics")][2]} == set(newcomers)
    assert all(
        m[2].startswith("Zebulon ") for k in with_renamed for m in sets[k][2] if m[0] == renamed
    )
    assert report.counts["groups_created"] == 1
    assert report.counts["groups_updated"] == len(changed) - 1
    assert (people, sets) == await csv_reference(server.roster, tmp_path)


async def test_a_server_filtering_a_page_without_paging_headers_loses_one_record_not_the_rest(
    v11_server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A server without X-Total-Count or Link that drops a record from the second page of
    enrollments: a full run reads on past the short page, so only that one enrollment is
    missing, no teacher is archived, and the report says where the page came short."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(v11_server)), store)
    await run(engine)
    _, sets_before = directory(store)
    v11_server.quirks = Quirks(total_count=False, link_header=False, short_pages=(40,))
    dropped = v11_server.roster.enrollments[79]

    report = await run(engine)

    assert report.status in ("succeeded", "succeeded_with_errors"), report.error
    assert report.counts["users_archived"] == report.counts["groups_removed"] == 0
    _, sets = directory(store)
    changed = {k for k in sets if sets[k] != sets_before[k]}
    assert changed <= {(SOURCE, dropped.class_id)}
    assert any(
        "/enrollments: the server served 39 records at offset=40 (pages of 40)" in w
        for w in report.warnings
    )


async def test_second_full_run_without_changes_changes_nothing(
    v11_server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A full run over an unchanged source reports zero changes and leaves every row as it was."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(v11_server)), store)
    first = await run(engine)
    before = snapshot(store)

    again = await run(engine, "full")

    assert again.status == first.status == "succeeded_with_errors"
    assert again.mode == "full"
    assert set(change_counts(again).values()) == {0}
    assert again.counts["records_rejected"] == first.counts["records_rejected"] == 1
    assert snapshot(store) == before


async def test_injected_faults_give_the_same_directory(
    server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """429s with Retry-After, 500s and dropped connections are retried to the same final directory."""
    server.faults = Faults(rate_limit=3, retry_after="1", server_error=3, drop=2)
    flaky = _DropSome(server, every=7)
    retry = FAST_RETRY | {"max_attempts": 10}
    engine = SyncEngine(settings_for(tmp_path, rest_source(server, retry=retry)), store)
    with flaky, capture_logs() as logs:
        report = await run(engine)

    assert report.status == "succeeded_with_errors", report.error
    statuses = [r.status for r in server.data_requests()]
    assert statuses.count(429) == 3 and statuses.count(500) == 3
    assert statuses.count(0) == 2  # dropped by the server's own fault counter
    assert flaky.dropped >= 2
    retries = [e for e in logs if e["event"] == "retrying"]
    assert len(retries) >= 3 + 3 + 2 + flaky.dropped
    assert directory(store) == await csv_reference(server.roster, tmp_path)


class _DropSome:
    """Drops the connection of every `every`-th data request (a fraction of all requests)."""

    def __init__(self, srv: FakeOneRoster, every: int) -> None:
        self.srv = srv
        self.every = every
        self.seen = 0
        self.dropped = 0
        self._handle = srv.handle

    def __enter__(self) -> _DropSome:
        def handle(method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
            if "/ims/oneroster/" in target:
                self.seen += 1
                if self.seen % self.every == 0:
                    self.dropped += 1
                    return None  # the server closes the socket without an answer
            return self._handle(method, target, headers, body)

        self.srv.handle = handle  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.handle = self._handle  # type: ignore[method-assign]


async def test_server_down_half_way_changes_nothing(
    server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A server that stops answering half-way through a run fails it, naming the source, and changes nothing."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(server)), store)
    await run(engine)
    first_requests = len(server.data_requests())
    before = snapshot(store)
    # Changes a completed run would apply: a teacher loses every class, a student is renamed.
    roster = server.roster
    teacher = next(
        e.user_id for e in roster.enrollments if e.class_id == "c-00001" and e.role == TEACHER
    )
    for e in roster.enrollments:
        if e.user_id == teacher:
            server.remove("enrollment", e.sourced_id)
    server.update("user", students_of(roster, "c-00002")[0], family_name="Changed")
    server.faults = Faults(down_after=first_requests + first_requests // 2)

    report = await run(engine, "full")

    assert report.status == "failed"
    assert report.error and report.error.startswith(f"source {SOURCE!r}:")
    assert "connection failed" in report.error
    # Whichever page ran out of tries first: its collection, its offset and the tries made.
    page = r"GET /ims/oneroster/(v1p1|rostering/v1p2)/(orgs|users|classes|enrollments)"
    assert re.search(rf"on {page} at offset=\d+ after 4 attempts$", report.error)
    assert snapshot(store) == before
    with store.read() as conn:
        staged = conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one()
    assert staged == 0


async def test_rejected_delta_filter_falls_back_to_full(
    v11_server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A delta run whose filter the server answers with 400 runs full instead, with a warning."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(v11_server)), store)
    await run(engine)
    v11_server.quirks = Quirks(filters="reject")
    v11_server.remove("enrollment", students_and_enrollment(v11_server.roster, "c-00004"))

    report = await run(engine, "delta")

    assert report.mode == "full"
    assert report.status == "succeeded_with_errors", report.error
    assert any("delta filter" in w and "full" in w for w in report.warnings)
    assert report.counts["groups_updated"] == 1  # the removed enrollment: a full run sweeps it
    assert directory(store) == await csv_reference(v11_server.roster, tmp_path)


def students_and_enrollment(roster: MemoryRoster, class_id: str) -> str:
    """The id of one active student enrollment of `class_id`."""
    return next(
        e.sourced_id
        for e in roster.enrollments
        if e.class_id == class_id and e.role == STUDENT and e.status == "active"
    )


async def test_wrong_secret_fails_naming_source_and_path_without_the_secret(
    server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A 401 from a wrong client secret fails the run; the message names source and path, never the secret."""
    auth = server.auth_config() | {"client_secret": SECRET}
    engine = SyncEngine(settings_for(tmp_path, rest_source(server, auth=auth)), store)
    with capture_logs() as logs:
        report = await run(engine)

    assert report.status == "failed"
    assert report.error is not None
    assert report.error.startswith(f"source {SOURCE!r}:")
    assert "HTTP 401" in report.error
    # The four collections are read side by side: whichever answered first names the path,
    # and the page: its first.
    path = "POST /token" if server.version == "1.2" else "GET /ims/oneroster/v1p1/"
    assert path in report.error
    if server.version != "1.2":
        assert re.search(r"v1p1/(orgs|users|classes|enrollments) at offset=0:", report.error)
    assert SECRET not in repr(report.as_json())
    assert SECRET not in repr(logs)
    assert users(store) == {}


async def test_live_resync_reads_the_teachers_classes_from_the_server(
    server: FakeOneRoster, store: Store, tmp_path: Path
) -> None:
    """A live resync job refreshes the teacher's classes and students from the server before rebuilding groups."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(server)), store)
    await run(engine)
    roster = server.roster
    teacher = next(
        e.user_id for e in roster.enrollments if e.class_id == "c-00001" and e.role == TEACHER
    )
    email = next(p.email for p in roster.persons if p.sourced_id == teacher)
    assert email
    classes = owned_classes(roster, teacher)
    assert "c-00001" in classes
    # On the server only: the teacher's first class loses two students and gains two others,
    # and the teacher stops teaching another class.
    leaving = students_of(roster, "c-00001")[:2]
    for e in roster.enrollments:
        if e.class_id == "c-00001" and e.user_id in leaving:
            server.delete("enrollment", e.sourced_id)
    joining = [
        p.sourced_id
        for p in roster.persons
        if p.role == STUDENT and p.sourced_id not in students_of(roster, "c-00001")
    ][:2]
    for n, student in enumerate(joining):
        server.add(RosterEnrollment(f"e-live-{n}", "c-00001", student, STUDENT))
    dropped_classes = [c for c in classes if c != "c-00001"][:1]
    for e in roster.enrollments:
        if e.user_id == teacher and e.class_id in dropped_classes:
            server.remove("enrollment", e.sourced_id)
    now = server.roster
    with store.read() as conn:
        user_id = conn.execute(
            text('SELECT id FROM "user" WHERE email = :e'), {"e": email.lower()}
        ).scalar_one()
    with store.write() as conn:
        queue_resync(conn, [user_id], reason="t", run_id=None, live=True)
    requests_before = len(server.data_requests())

    outcomes = await engine.process_batch()

    assert [state for _, state in outcomes] == ["succeeded"]
    endpoints = {r.endpoint for r in server.data_requests()[requests_before:]}
    assert f"/teachers/{teacher}/classes" in endpoints
    assert "/classes/c-00001/students" in endpoints
    owned = {
        g["external_id"]: sorted(m["sourced_id"] for m in g["members"])
        for g in groups(store).values()
        if email.lower() in g["owners"]
    }
    assert owned == {c: students_of(now, c) for c in owned_classes(now, teacher)}
    assert set(joining) <= set(owned["c-00001"])
    assert not set(leaving) & set(owned["c-00001"])
    assert not set(dropped_classes) & set(owned)


async def test_pages_decoded_in_worker_processes_give_the_same_directory(
    v11_server: FakeOneRoster, store: Store, tmp_path: Path, pooled: list[int]
) -> None:
    """With every page sent to the decode pool (two processes), a full run and a delta run
    end with the directory a CSV sync of the same roster gives, rejections included."""
    started = pooled
    engine = SyncEngine(settings_for(tmp_path, rest_source(v11_server, decode_workers=2)), store)
    report = await run(engine)

    assert started == [2]  # one pool per run, with the configured size
    assert report.status == "succeeded_with_errors", report.error
    assert [r["sourced_id"] for r in report.rejected] == ["t-edge-noemail"]
    assert report.fetched["persons"] == len(v11_server.roster.persons)
    assert report.fetched["enrollments"] == len(v11_server.roster.enrollments)
    assert directory(store) == await csv_reference(v11_server.roster, tmp_path)

    roster = v11_server.roster
    klass = next(c.sourced_id for c in roster.classes if c.sourced_id.startswith("c-0"))
    v11_server.update("class", klass, title="Renamed in a worker")
    report = await run(engine, "delta")
    assert report.mode == "delta" and report.counts["groups_updated"] >= 1
    assert directory(store) == await csv_reference(v11_server.roster, tmp_path)


async def test_a_delta_run_decides_for_the_teachers_it_touched_and_a_full_run_agrees(
    v11_server: FakeOneRoster, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta run looks at the teachers its changes concern (not the whole district): a
    teacher whose every class lost its students is archived by it, others are not looked
    at, and a full run afterwards finds nothing left to do."""
    engine = SyncEngine(settings_for(tmp_path, rest_source(v11_server)), store)
    await run(engine)
    roster = v11_server.roster
    teachers = sorted({e.user_id for e in roster.enrollments if e.role == TEACHER})
    teacher = next(
        t for t in teachers if t.startswith("t-0") and len(owned_classes(roster, t)) >= 1
    )
    classes = owned_classes(roster, teacher)
    # Co-teachers of those classes lose them too; only classes taught by `teacher` alone.
    classes = [
        c
        for c in classes
        if {e.user_id for e in roster.enrollments if e.class_id == c and e.role == TEACHER}
        == {teacher}
    ]
    assert classes == owned_classes(roster, teacher), "pick a teacher who teaches alone"
    for cls in classes:
        for e in roster.enrollments:
            if e.class_id == cls and e.role == STUDENT and e.status == "active":
                v11_server.delete("enrollment", e.sourced_id)
    looked_at: list[set[str] | None] = []
    real = provisioning.eligible_teachers

    def spy(conn: Any, source: str, roles: Any, only: set[str] | None = None) -> Any:
        looked_at.append(only)
        return real(conn, source, roles, only)

    monkeypatch.setattr(provisioning, "eligible_teachers", spy)
    counted: list[tuple[int, int]] = []
    real_count = provisioning.groups_to_remove

    def count_both(
        conn: Any, source: str, roles: Any, archived: Any = (), only: Any = None, **kw: Any
    ) -> int:
        counted.append(
            (
                real_count(conn, source, roles, archived, only, **kw),
                real_count(conn, source, roles, archived, **kw),
            )
        )
        return counted[-1][0]

    monkeypatch.setattr(provisioning, "groups_to_remove", count_both)
    report = await run(engine, "delta")

    assert report.mode == "delta" and report.counts["users_archived"] == 1
    # The delta's narrowed count of groups to remove is the whole district's count.
    assert counted == [(len(classes), len(classes))]
    assert looked_at[-1] is not None and teacher in looked_at[-1]
    assert len(looked_at[-1]) < len(teachers)
    email = next(p.email for p in roster.persons if p.sourced_id == teacher)
    assert users(store)[(email or "").lower()]["status"] == "archived"
    full = await run(engine, "full")
    assert looked_at[-1] is None
    assert change_counts(full) == dict.fromkeys(change_counts(full), 0)
    people, sets = directory(store)
    ref_people, ref_sets = await csv_reference(v11_server.roster, tmp_path)
    assert sets == ref_sets  # a fresh sync of the changed roster never had that teacher:
    assert {e: p for e, p in people.items() if p[3] == "active"} == ref_people
