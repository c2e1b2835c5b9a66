"""End to end: a full OneRoster run recognises the records the mirror was made from.

Every OneRoster record is fingerprinted (rostersync.source.rawhash) before it is normalized;
a full run of an unscoped source does not normalize a record whose fingerprint the mirror
holds (rostersync.sync.known). These tests run the real path against the fake server on
127.0.0.1, decoding pages in worker processes and inline, and hold the rule that matters:
the mirror, the directory and the counts after any run are what a run that normalized every
record gives (here: a fresh database loading the same server state once).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from rostersync.source.records import STUDENT, TEACHER, RosterEnrollment, RosterPerson
from rostersync.source.rows import StagedBatch
from rostersync.store import tables
from rostersync.store.db import Store
from rostersync.sync import fetch as fetch_step
from rostersync.sync import staging
from rostersync.sync.engine import SyncEngine
from rostersync.sync.known import KnownRows
from rostersync.sync.runs import RunReport, load_report
from tests.e2e.test_oneroster_e2e import (
    SOURCE,
    aged_district,
    directory,
    rest_source,
    run,
    settings_for,
)
from tests.fakes.oneroster_server import FakeOneRoster, encode_record

pytestmark = pytest.mark.slow

MIRROR = {
    "org": tables.roster_org,
    "person": tables.roster_person,
    "class": tables.roster_class,
    "enrollment": tables.roster_enrollment,
}
FETCHED = ("orgs", "persons", "classes", "enrollments")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
PAGE_SIZE = 9  # every collection spans several pages


@pytest.fixture
def served() -> Iterator[FakeOneRoster]:
    with FakeOneRoster(aged_district(), version="1.1") as srv:
        yield srv


class Observed:
    """What each run handed to staging: rows staged, rows restaged, and what the decode gave
    the filter of known rows (rows normalized, records listed as seen)."""

    def __init__(self) -> None:
        self.staged = 0
        self.writes = 0
        self.restaged = 0
        self.decoded_rows = 0
        self.seen = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> Observed:
    seen = Observed()
    real_stage = staging.stage
    real_restage = KnownRows.restage
    real_filter = KnownRows.filter

    def stage(conn: Any, run_id: int, batch: StagedBatch) -> None:
        seen.writes += 1
        seen.staged += sum(len(rows) for rows in batch.rows.values())
        real_stage(conn, run_id, batch)

    def restage(self: KnownRows, conn: Any, run_id: int) -> int:
        done = real_restage(self, conn, run_id)
        seen.restaged += done
        return done

    def filter_(self: KnownRows, batch: StagedBatch) -> StagedBatch:
        seen.decoded_rows += sum(len(rows) for rows in batch.rows.values())
        seen.seen += sum(len(at) for at in batch.seen.values())
        return real_filter(self, batch)

    monkeypatch.setattr(fetch_step, "stage", stage)
    monkeypatch.setattr(KnownRows, "restage", restage)
    monkeypatch.setattr(KnownRows, "filter", filter_)
    return seen


def engine_for(
    srv: FakeOneRoster, store: Store, tmp_path: Path, workers: int, **overrides: Any
) -> SyncEngine:
    source = rest_source(srv, page_size=PAGE_SIZE, decode_workers=workers, **overrides)
    return SyncEngine(settings_for(tmp_path, source), store)


def _plain(value: Any) -> Any:
    """A column value comparable across SQLite and PostgreSQL."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat()
    if isinstance(value, bool):
        return int(value)
    return value


def mirror(
    store: Store, *, raw: bool = True, dates: bool = True
) -> dict[str, list[tuple[Any, ...]]]:
    """The source's mirror rows of each kind, every column (``raw_hash`` unless ``raw`` is
    false, ``date_last_modified`` unless ``dates`` is false), sorted by sourcedId."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with store.read() as conn:
        for kind, table in MIRROR.items():
            cols = [
                c
                for c in table.c
                if (raw or c.name != "raw_hash") and (dates or c.name != "date_last_modified")
            ]
            rows = conn.execute(select(*cols).where(table.c.source == SOURCE))
            out[kind] = sorted(tuple(_plain(v) for v in row) for row in rows)
    return out


def raw_hashes(store: Store, kind: str) -> dict[str, str | None]:
    table = MIRROR[kind]
    with store.read() as conn:
        rows = conn.execute(select(table.c.sourced_id, table.c.raw_hash))
        return {sid: h for sid, h in rows}


def staging_rows(store: Store) -> int:
    with store.read() as conn:
        return sum(
            int(conn.execute(text(f"SELECT count(*) FROM staging_{kind}")).scalar_one())
            for kind in MIRROR
        )


def fetched(report: RunReport) -> dict[str, int]:
    return {k: report.fetched[k] for k in FETCHED}


def served_counts(srv: FakeOneRoster) -> dict[str, int]:
    """Records the server serves now, per collection (raw records and duplicates included)."""
    with srv._lock:
        return {
            name: len(srv._tables[collection].blobs)
            for name, collection in zip(
                FETCHED, ("orgs", "users", "classes", "enrollments"), strict=True
            )
        }


async def fresh_load(srv: FakeOneRoster, tmp_path: Path, workers: int) -> tuple[Any, ...]:
    """What a single first load of the server as it is now gives, in a fresh SQLite store:
    (mirror without raw_hash and dates, mirror, directory, the report)."""
    where = tmp_path / f"fresh-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    ref = Store(f"sqlite:///{where / 'ref.db'}")
    ref.upgrade()
    try:
        report = await run(engine_for(srv, ref, where, workers))
        assert report.status in ("succeeded", "succeeded_with_errors"), report.error
        assert report.mode == "full"
        return mirror(ref, raw=False, dates=False), mirror(ref), directory(ref), report
    finally:
        ref.dispose()


async def run_everything(engine: SyncEngine, mode: str | None = None) -> RunReport:
    """A run as before fingerprints and known rows: every record normalized and staged."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fetch_step, "KnownRows", lambda source: None)
        return await run(engine, mode)


def reference_store(tmp_path: Path) -> Store:
    where = tmp_path / f"everything-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    ref = Store(f"sqlite:///{where / 'ref.db'}")
    ref.upgrade()
    return ref


def mirror_person(store: Store, sourced_id: str) -> dict[str, Any]:
    table = tables.roster_person
    with store.read() as conn:
        row = conn.execute(
            select(table).where(table.c.source == SOURCE, table.c.sourced_id == sourced_id)
        ).one()
    return dict(row._mapping)


# -- 1. a no-op full run -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 0], ids=["pool", "inline"])
async def test_a_no_op_full_run_stages_nothing_and_counts_everything(
    served: FakeOneRoster,
    store: Store,
    tmp_path: Path,
    workers: int,
    pooled: list[int],
    observed: Observed,
) -> None:
    """After a first load, a full run over the same server stages nothing: records are
    recognised by their fingerprints (or, on a page decoded before those were loaded, by
    their rows); the mirror (fingerprints included) is
    unchanged and the report still counts every record served."""
    engine = engine_for(served, store, tmp_path, workers)
    first = await run(engine)
    assert first.status == "succeeded_with_errors", first.error
    assert observed.staged > 0
    before = mirror(store)
    for kind, rows in before.items():
        assert rows, kind
        hashes = raw_hashes(store, kind)
        assert all(h is not None and HEX32.match(h) for h in hashes.values()), kind
    observed.reset()

    again = await run(engine, "full")

    assert again.status == first.status, again.error
    assert again.mode == "full"
    assert pooled == ([2, 2] if workers else [])
    assert observed.staged == 0 and observed.writes == 0, "a no-op run staged rows"
    assert observed.restaged == 0
    # Each record recognised by its fingerprint or, on a page decoded before the mirror's
    # fingerprints were loaded, normalized and found equal by its row.
    total = sum(len(rows) for rows in before.values())
    assert observed.seen + observed.decoded_rows == total
    assert observed.seen > 0
    assert staging_rows(store) == 0
    assert mirror(store) == before
    assert fetched(again) == fetched(first)
    served_now = served_counts(served)
    rejected = {r["sourced_id"] for r in again.rejected}
    assert rejected == {r["sourced_id"] for r in first.rejected} == {"t-edge-noemail"}
    assert fetched(again) == served_now
    assert {k: v for k, v in again.counts.items() if k != "records_rejected"} == dict.fromkeys(
        (k for k in again.counts if k != "records_rejected"), 0
    )


# -- 2. a differential full run ----------------------------------------------------------------


def _change_everything(srv: FakeOneRoster) -> dict[str, str]:
    """Change the served data in several ways; returns what was changed, by name."""
    roster = srv.roster
    active = [e for e in roster.enrollments if e.status == "active"]
    classes_of: dict[str, list[RosterEnrollment]] = {}
    for e in active:
        if e.role == TEACHER:
            classes_of.setdefault(e.user_id, []).append(e)
    # a teacher with several classes, so that losing one leaves the teacher active
    teacher = next(t for t, es in sorted(classes_of.items()) if len(es) >= 2)
    dropped = classes_of[teacher][0]
    students = sorted(p.sourced_id for p in roster.persons if p.role == STUDENT)
    renamed, removed_person, reordered = students[0], students[1], students[2]
    removed_enrollment = next(
        e for e in active if e.role == STUDENT and e.user_id not in (renamed, removed_person)
    )
    touched = next(
        e
        for e in active
        if e.role == STUDENT
        and e.sourced_id != removed_enrollment.sourced_id
        and e.user_id not in (renamed, removed_person)
    )
    newcomer = students[3]
    new_class = next(c for c in roster.classes if c.sourced_id != dropped.class_id)

    srv.update("user", renamed, given_name="Zebulon", family_name="Quux")
    srv.update("enrollment", dropped.sourced_id, status="tobedeleted")
    srv.remove("enrollment", removed_enrollment.sourced_id)
    for e in roster.enrollments:
        if e.user_id == removed_person:
            srv.remove("enrollment", e.sourced_id)
    srv.remove("user", removed_person)
    srv.add(RosterEnrollment("e-fp-new", new_class.sourced_id, newcomer, STUDENT))
    srv.add(
        RosterPerson(
            "s-fp-new",
            STUDENT,
            "Nova",
            "Newcomer",
            email="nova.newcomer@example.org",
            org_ids=("sch-001",),
        )
    )
    srv.add(RosterEnrollment("e-fp-nova", new_class.sourced_id, "s-fp-new", STUDENT))
    # only dateLastModified changes
    srv.update("enrollment", touched.sourced_id)
    # the same record, its JSON keys in another order
    person = next(p for p in roster.persons if p.sourced_id == reordered)
    encoded = encode_record(person, srv.version, srv._schools)
    srv.add_raw("users", dict(reversed(list(encoded.items()))))
    return {
        "teacher": teacher,
        "dropped": dropped.sourced_id,
        "renamed": renamed,
        "removed_person": removed_person,
        "removed_enrollment": removed_enrollment.sourced_id,
        "touched": touched.sourced_id,
        "reordered": reordered,
    }


@pytest.mark.parametrize("workers", [2, 0], ids=["pool", "inline"])
async def test_a_full_run_after_changes_gives_what_a_fresh_load_gives(
    served: FakeOneRoster,
    sqlite_store: Store,
    tmp_path: Path,
    workers: int,
    pooled: list[int],
    observed: Observed,
) -> None:
    """A rename, a teacher's enrollment deactivated, records removed and added, a new date
    only, keys reordered: the full run stages just what changed, and its mirror and directory
    are a fresh database's after one load of the same server."""
    store = sqlite_store
    (tmp_path / "main").mkdir()
    engine = engine_for(served, store, tmp_path / "main", workers)
    first = await run(engine)
    assert first.status == "succeeded_with_errors", first.error
    everything = reference_store(tmp_path)
    other = engine_for(served, everything, tmp_path, workers)
    await run_everything(other)
    before = mirror(store)
    changed = _change_everything(served)
    observed.reset()

    report = await run(engine, "full")

    assert report.status == "succeeded_with_errors", report.error
    assert report.mode == "full"
    # Normalized: the renamed, the deactivated, the date-only, the reordered and the three
    # new records (more if a page was decoded before the mirror's fingerprints were loaded).
    assert observed.decoded_rows >= 7, observed.__dict__
    # Staged: the renamed, the deactivated and the three new; the reordered record and the
    # one with only a new date are equal as rows (row_hash leaves dates out, as before).
    assert observed.staged == 5, observed.__dict__
    assert observed.restaged == 0
    # The same two runs with every record normalized and staged: the same mirror and
    # directory, row for row.
    as_before = await run_everything(other, "full")
    assert as_before.status == report.status
    assert mirror(store, raw=False) == mirror(everything, raw=False)
    assert directory(store) == directory(everything)
    assert fetched(report) == fetched(as_before)
    everything.dispose()
    # A fresh database loading the server once: the same, but for the date of the record
    # whose date alone changed (a run keeps the mirror's, with or without fingerprints).
    ref_plain, ref_mirror, ref_directory, ref_report = await fresh_load(served, tmp_path, workers)
    assert directory(store) == ref_directory
    assert mirror(store, raw=False, dates=False) == ref_plain
    assert fetched(report) == fetched(ref_report) == served_counts(served)
    assert {r["sourced_id"] for r in report.rejected} == {
        r["sourced_id"] for r in ref_report.rejected
    }
    # The fingerprints: those of the records staged are the fresh load's; the reordered
    # record's row was equal, so its mirror row keeps the fingerprint it was made with.
    now = mirror(store)
    raw_at = [c.name for c in tables.roster_person.c].index("raw_hash")
    ours = {r[0]: r[raw_at] for r in now["person"]}
    theirs = {r[0]: r[raw_at] for r in ref_mirror["person"]}
    assert ours[changed["renamed"]] == theirs[changed["renamed"]]
    assert ours["s-fp-new"] == theirs["s-fp-new"]
    old = {r[0]: r[raw_at] for r in before["person"]}
    assert ours[changed["reordered"]] == old[changed["reordered"]] != theirs[changed["reordered"]]
    assert {k: v for k, v in ours.items() if k != changed["reordered"]} == {
        k: v for k, v in theirs.items() if k != changed["reordered"]
    }
    people = mirror(store)["person"]
    assert changed["removed_person"] not in {r[0] for r in people}
    with store.read() as conn:
        status = conn.execute(
            text("SELECT status FROM roster_enrollment WHERE sourced_id = :s"),
            {"s": changed["dropped"]},
        ).scalar_one_or_none()
    assert status in (None, "tobedeleted")

    # And the run after that recognises what it stored: only the reordered record (and the
    # rejected one) is normalized again, nothing is staged.
    after_run = mirror(store, raw=False)
    observed.reset()
    quiet = await run(engine, "full")
    assert quiet.status == "succeeded_with_errors", quiet.error
    assert observed.staged == 0 and observed.decoded_rows >= 1, observed.__dict__
    assert mirror(store, raw=False) == after_run


# -- 3. one sourcedId twice in a run -----------------------------------------------------------


def _serve_twice(srv: FakeOneRoster, obj: dict[str, Any]) -> None:
    """Serve ``obj`` once more, after every other user (on the last page): the fake server
    keeps one record per sourcedId, so the copy goes in by hand, under no id of its index."""
    with srv._lock:
        table = srv._tables["users"]
        table.records.append(dict(obj))
        table.blobs.append(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())
        table.modified.append(datetime.fromisoformat(obj["dateLastModified"]))
        srv._changed()


def _first_page_person(srv: FakeOneRoster, store: Store) -> RosterPerson:
    """A person served on the first page of /users (read first, whatever the concurrency)
    who is in the mirror."""
    with srv._lock:
        first_page = srv._tables["users"].records[:PAGE_SIZE]
    held = raw_hashes(store, "person")
    return next(r for r in first_page if isinstance(r, RosterPerson) and r.sourced_id in held)


@pytest.mark.parametrize("workers", [2, 0], ids=["pool", "inline"])
@pytest.mark.parametrize("changed_first", [True, False], ids=["changed-first", "unchanged-first"])
async def test_a_record_served_twice_keeps_its_last_version(
    served: FakeOneRoster,
    sqlite_store: Store,
    tmp_path: Path,
    workers: int,
    changed_first: bool,
    pooled: list[int],
    observed: Observed,
) -> None:
    """A sourcedId on the first page and again on the last, once changed and once exactly as
    the mirror holds it: the last one wins, as when every record is normalized."""
    store = sqlite_store
    (tmp_path / "main").mkdir()
    engine = engine_for(served, store, tmp_path / "main", workers)
    await run(engine)
    everything = reference_store(tmp_path)
    other = engine_for(served, everything, tmp_path, workers)
    await run_everything(other)
    person = _first_page_person(served, store)
    before = mirror(store)
    held = mirror_person(store, person.sourced_id)
    assert held["raw_hash"] and HEX32.match(held["raw_hash"])
    as_held = encode_record(person, served.version, served._schools)
    served.update("user", person.sourced_id, family_name="Twice")
    renamed = next(p for p in served.roster.persons if p.sourced_id == person.sourced_id)
    changed = encode_record(renamed, served.version, served._schools)
    if changed_first:
        _serve_twice(served, as_held)  # first page: changed; last page: as the mirror has it
    else:
        served.add_raw("users", as_held)  # first page: as held (replaces the changed one)
        _serve_twice(served, changed)  # last page: changed
    with served._lock:
        blobs = served._tables["users"].blobs
        assert len(blobs) - 1 >= PAGE_SIZE  # the copy is on another page than the first
    observed.reset()

    report = await run(engine, "full")
    as_before = await run_everything(other, "full")

    assert report.status == as_before.status == "succeeded_with_errors", report.error
    # What the same two runs give when every record is normalized and staged.
    assert mirror(store, raw=False) == mirror(everything, raw=False)
    assert directory(store) == directory(everything)
    assert fetched(report) == fetched(as_before)
    everything.dispose()
    now = mirror_person(store, person.sourced_id)
    if changed_first:
        assert now == held  # the mirror's version came last: it is the mirror's row again
        assert observed.restaged == 1
        assert mirror(store) == before
    else:
        assert now["family_name"] == "Twice"
        assert now["raw_hash"] != held["raw_hash"]
        assert observed.restaged == 0
    assert report.fetched["persons"] == served_counts(served)["persons"]
    _, ref_mirror, _, _ = await fresh_load(served, tmp_path, workers)
    assert mirror(store) == ref_mirror  # fingerprints included: the last record's
    # The directory is compared with the every-record run above, not with the fresh load:
    # a fresh load names a renamed teacher as renamed, where a later run (with or without
    # fingerprints) keeps the user's display name.


# -- 4. the upgrade: mirror rows without fingerprints -----------------------------------------


@pytest.mark.parametrize("workers", [2, 0], ids=["pool", "inline"])
async def test_rows_from_before_fingerprints_get_them_from_a_real_run_only(
    served: FakeOneRoster,
    store: Store,
    tmp_path: Path,
    workers: int,
    pooled: list[int],
    observed: Observed,
) -> None:
    """Persons without a fingerprint (rows made before migration 0016): a dry run stores
    none; a real full run stores each one's, changing nothing else; the run after that
    recognises them all and stages nothing."""
    engine = engine_for(served, store, tmp_path, workers)
    await run(engine)
    original = raw_hashes(store, "person")
    with store.write() as conn:
        conn.execute(update(tables.roster_person).values(raw_hash=None))
    unhashed = mirror(store)
    assert set(raw_hashes(store, "person").values()) == {None}

    observed.reset()
    dry = await engine.sync(SOURCE, mode="full", dry_run=True)
    await engine.drain()
    with store.read() as conn:
        dry = load_report(conn, dry.id)
    assert dry.status in ("succeeded", "succeeded_with_errors"), dry.error
    assert set(raw_hashes(store, "person").values()) == {None}
    assert mirror(store) == unhashed
    assert observed.staged == 0, "persons equal to their mirror rows were staged"

    observed.reset()
    real = await run(engine, "full")
    assert real.status == "succeeded_with_errors", real.error
    assert observed.staged == 0
    stored = raw_hashes(store, "person")
    assert all(h is not None and HEX32.match(h) for h in stored.values()), stored
    assert stored == original  # the very fingerprints a load stores
    raw_at = [c.name for c in tables.roster_person.c].index("raw_hash")
    after = mirror(store)
    assert {k: v for k, v in after.items() if k != "person"} == {
        k: v for k, v in unhashed.items() if k != "person"
    }

    def strip(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [r[:raw_at] + r[raw_at + 1 :] for r in rows]

    assert strip(after["person"]) == strip(unhashed["person"])
    assert set(real.counts.values()) - {0} <= {real.counts.get("records_rejected", 0)}

    observed.reset()
    last = await run(engine, "full")
    assert last.status == "succeeded_with_errors", last.error
    assert observed.staged == 0 and observed.writes == 0
    assert observed.seen + observed.decoded_rows == sum(len(rows) for rows in after.values())
    assert observed.seen > 0
    assert mirror(store) == after
