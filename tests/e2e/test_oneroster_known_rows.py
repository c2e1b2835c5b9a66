"""End to end: a full OneRoster run stages only what changed.

A full run of an unscoped source loads the mirror's row keys (rostersync.sync.known) and
leaves out of staging every fetched record the mirror holds as it is: by the fingerprint of
its bytes (in the decode workers, unparsed, or in the sync process for pages decoded there). These
tests run the real path against the fake server on 127.0.0.1, decoding pages in worker
processes and inline, and hold the rule that matters: such a run stages only what changed,
and the mirror, the directory and the counts after it are what a run that stages everything
gives (and, but for dates a run keeps, what a fresh database loading the same server gives).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from rostersync.source.records import STUDENT, TEACHER, RosterEnrollment, RosterPerson
from rostersync.source.rows import StagedBatch
from rostersync.store import tables
from rostersync.store.db import Store
from rostersync.sync import fetch as fetch_step
from rostersync.sync import staging
from rostersync.sync.engine import SyncEngine
from rostersync.sync.known import KnownRows
from rostersync.sync.repeats import Repeats
from rostersync.sync.runs import RunReport
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
PAGE_SIZE = 9  # every collection spans several pages


@pytest.fixture
def served() -> Iterator[FakeOneRoster]:
    with FakeOneRoster(aged_district(), version="1.1") as srv:
        yield srv


class Observed:
    """What each run handed to staging (rows staged, writes) and to the filter of known rows
    (rows handed to it, rows it kept, the KnownRows that filtered)."""

    def __init__(self) -> None:
        self.staged = 0
        self.writes = 0
        self.filtered = 0
        self.kept = 0
        self.known: list[KnownRows] = []

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def left_out(self) -> int:
        """Rows the run's KnownRows left out of staging, every kind."""
        return sum(sum(known.unchanged.values()) for known in self.known)

    def missing(self) -> dict[str, set[str]]:
        """Mirror rows the run's KnownRows did not see, per kind (an empty dict: none)."""
        out: dict[str, set[str]] = {}
        for known in self.known:
            for kind in MIRROR:
                if ids := known.missing(kind):
                    out.setdefault(kind, set()).update(ids)
        return out


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> Observed:
    seen = Observed()
    real_stage = staging.stage  # what fetch_step.stage is
    real_filter = KnownRows.filter

    def stage(conn: Any, run_id: int, batch: StagedBatch) -> Repeats:
        seen.writes += 1
        seen.staged += sum(len(rows) for rows in batch.rows.values())
        return real_stage(conn, run_id, batch)

    def filter_(self: KnownRows, batch: StagedBatch) -> StagedBatch:
        if not any(known is self for known in seen.known):
            seen.known.append(self)
        # rows and records a decode worker left out as known (marks in the page's order)
        seen.filtered += sum(batch.count(kind) for kind in batch.rows)
        out = real_filter(self, batch)
        seen.kept += sum(len(rows) for rows in out.rows.values())
        return out

    monkeypatch.setattr(fetch_step, "stage", stage)
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
    store: Store, *, dates: bool = True, fps: bool = True
) -> dict[str, list[tuple[Any, ...]]]:
    """The source's mirror rows of each kind, every column (``date_last_modified`` unless
    ``dates`` is false, ``fp`` unless ``fps`` is false), sorted by sourcedId."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    skip = {"date_last_modified"} if not dates else set()
    skip |= {"fp"} if not fps else set()
    with store.read() as conn:
        for kind, table in MIRROR.items():
            cols = [c for c in table.c if c.name not in skip]
            rows = conn.execute(select(*cols).where(table.c.source == SOURCE))
            out[kind] = sorted(tuple(_plain(v) for v in row) for row in rows)
    return out


def unprinted(row: tuple[Any, ...], kind: str) -> tuple[Any, ...]:
    """A mirror row (as :func:`mirror` gives it, dates included) without its fingerprint."""
    at = [c.name for c in MIRROR[kind].c].index("fp")
    return row[:at] + row[at + 1 :]


def by_id(rows: list[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Mirror rows (as :func:`mirror` gives them) by sourcedId."""
    return {row[0]: row for row in rows}


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
    (mirror without dates, mirror, directory, the report)."""
    where = tmp_path / f"fresh-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    ref = Store(f"sqlite:///{where / 'ref.db'}")
    ref.upgrade()
    try:
        report = await run(engine_for(srv, ref, where, workers))
        assert report.status in ("succeeded", "succeeded_with_errors"), report.error
        assert report.mode == "full"
        return mirror(ref, dates=False), mirror(ref), directory(ref), report
    finally:
        ref.dispose()


async def run_everything(engine: SyncEngine, mode: str | None = None) -> RunReport:
    """A run without known rows: every record fetched is staged."""
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
    """After a first load, a full run over the same server stages nothing, not even an empty
    write: every row fetched is found equal to its mirror row and left out. The mirror is
    unchanged, every column, and the report still counts every record served."""
    engine = engine_for(served, store, tmp_path, workers)
    first = await run(engine)
    assert first.status == "succeeded_with_errors", first.error
    assert observed.staged > 0
    # A first load: the mirror held nothing, so nothing was left out.
    assert observed.kept == observed.filtered == observed.staged
    assert observed.left_out() == 0
    before = mirror(store)
    for kind, rows in before.items():
        assert rows, kind
    observed.reset()
    from connectors.oneroster import decode, normalize

    made_here: list[int] = []  # records made rows in this process (a worker's are not seen)
    real_rows_page = normalize.rows_page  # what decode.rows_page is

    def rows_page(collection: str, records: list[Any], fps: Any = None) -> StagedBatch:
        made_here.append(len(records))
        return real_rows_page(collection, records, fps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "rows_page", rows_page)
        again = await run(engine, "full")
    # The pages decoded here left every record out too, unparsed, and the fingerprints they
    # were read against are not kept after the fetch.
    assert sum(made_here) == 0, made_here
    assert decode._known == {}

    assert again.status == first.status, again.error
    assert again.mode == "full"
    assert pooled == ([2, 2] if workers else [])
    assert observed.staged == 0 and observed.writes == 0, "a no-op run staged rows"
    # Every row went through the filter (one KnownRows, the run's), and each was left out:
    # the mirror's rows, one by one, and none of them missing.
    total = sum(len(rows) for rows in before.values())
    assert len(observed.known) == 1
    assert observed.filtered == total
    assert observed.kept == 0
    assert observed.left_out() == total
    assert observed.missing() == {}
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
    srv.add(RosterEnrollment("e-kr-new", new_class.sourced_id, newcomer, STUDENT))
    srv.add(
        RosterPerson(
            "s-kr-new",
            STUDENT,
            "Nova",
            "Newcomer",
            email="nova.newcomer@example.org",
            org_ids=("sch-001",),
        )
    )
    srv.add(RosterEnrollment("e-kr-nova", new_class.sourced_id, "s-kr-new", STUDENT))
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
    only, keys reordered: the full run stages just what changed, its mirror and directory are
    a run's that stages everything, and a fresh database's after one load of the same server
    (but for the date the run keeps)."""
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
    # Every row fetched went to the filter; staged: the renamed, the deactivated and the
    # three new, and the reordered record and the one with only a new date: their bytes,
    # and so their fingerprints, changed. Equal as rows (row_hash leaves dates out), they
    # change nothing but the fingerprint the mirror keeps, so that the next run leaves
    # them out with every other unchanged row.
    assert observed.filtered == sum(fetched(report).values()), observed.__dict__
    assert observed.kept == observed.staged == 7, observed.__dict__
    assert observed.left_out() == observed.filtered - 7
    # What the filter did not see: the person and the enrollments that went.
    user_at = [c.name for c in tables.roster_enrollment.c].index("user_id")
    removed_enrollments = {
        row[0]
        for row in before["enrollment"]
        if row[0] == changed["removed_enrollment"] or row[user_at] == changed["removed_person"]
    }
    assert changed["removed_enrollment"] in removed_enrollments
    assert observed.missing() == {
        "person": {changed["removed_person"]},
        "enrollment": removed_enrollments,
    }
    # The same two runs with every record staged: the same mirror and directory, row for row
    # (but for the fingerprints of the rows whose bytes alone changed: a run that leaves out
    # no known record does not refresh them; see merge.refresh_fp).
    as_before = await run_everything(other, "full")
    assert as_before.status == report.status
    assert mirror(store, fps=False) == mirror(everything, fps=False)
    assert directory(store) == directory(everything)
    assert fetched(report) == fetched(as_before)
    everything.dispose()
    # A fresh database loading the server once: the same, but for the date of the record
    # whose date alone changed (a run keeps the mirror's, with or without known rows).
    ref_plain, ref_mirror, ref_directory, ref_report = await fresh_load(served, tmp_path, workers)
    assert directory(store) == ref_directory
    assert mirror(store, dates=False) == ref_plain
    assert fetched(report) == fetched(ref_report) == served_counts(served)
    assert {r["sourced_id"] for r in report.rejected} == {
        r["sourced_id"] for r in ref_report.rejected
    }
    # Row by row, every column: the rows staged are the fresh load's, the reordered record's
    # is the one it had (and the fresh load's); the date-only record keeps its old date.
    now = mirror(store)
    dated = [c.name for c in tables.roster_enrollment.c].index("date_last_modified")
    ours, theirs, old = by_id(now["person"]), by_id(ref_mirror["person"]), by_id(before["person"])
    assert ours[changed["renamed"]] == theirs[changed["renamed"]] != old[changed["renamed"]]
    assert ours["s-kr-new"] == theirs["s-kr-new"]
    reordered = changed["reordered"]
    assert ours[reordered] == theirs[reordered]
    assert unprinted(ours[reordered], "person") == unprinted(old[reordered], "person")
    fp_at = [c.name for c in MIRROR["person"].c].index("fp")
    assert ours[reordered][fp_at] != old[reordered][fp_at]  # the fingerprint of the new bytes
    assert ours == theirs
    touched = changed["touched"]
    ours, theirs, old = (
        by_id(now["enrollment"]),
        by_id(ref_mirror["enrollment"]),
        by_id(before["enrollment"]),
    )
    assert unprinted(ours[touched], "enrollment") == unprinted(old[touched], "enrollment")
    assert ours[touched][dated] != theirs[touched][dated]
    assert ours[touched][:dated] + ours[touched][dated + 1 :] == (
        theirs[touched][:dated] + theirs[touched][dated + 1 :]
    )
    assert {k: v for k, v in ours.items() if k != touched} == {
        k: v for k, v in theirs.items() if k != touched
    }
    assert {k: v for k, v in now.items() if k not in ("person", "enrollment")} == {
        k: v for k, v in ref_mirror.items() if k not in ("person", "enrollment")
    }
    assert changed["removed_person"] not in by_id(now["person"])
    assert not removed_enrollments & set(ours)
    with store.read() as conn:
        status = conn.execute(
            text("SELECT status FROM roster_enrollment WHERE sourced_id = :s"),
            {"s": changed["dropped"]},
        ).scalar_one_or_none()
    assert status in (None, "tobedeleted")

    # And the run after that finds every row as the mirror holds it: nothing is staged.
    after_run = mirror(store)
    observed.reset()
    quiet = await run(engine, "full")
    assert quiet.status == "succeeded_with_errors", quiet.error
    assert observed.staged == 0 and observed.writes == 0, observed.__dict__
    assert observed.filtered == observed.left_out() == sum(len(r) for r in after_run.values())
    assert observed.missing() == {}
    assert mirror(store) == after_run


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
    held = by_id(mirror(store)["person"])
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
    the mirror holds it: the last one wins, as when every record is staged. An unchanged copy
    after a staged changed one takes it out of staging again; a changed copy after an
    unchanged one is staged."""
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
    staged, left_out, missing = observed.staged, observed.left_out(), observed.missing()
    filtered = observed.filtered
    as_before = await run_everything(other, "full")

    assert report.status == as_before.status == "succeeded_with_errors", report.error
    # What the same two runs give when every record is staged.
    assert mirror(store) == mirror(everything)
    assert directory(store) == directory(everything)
    assert fetched(report) == fetched(as_before)
    everything.dispose()
    # Staged: the changed copy alone, when it came last. When it came first, the copy after
    # it, as the mirror holds it, is left out as known (by a worker, or here: a full run
    # decodes its pages in the sync process against the mirror's fingerprints too) and
    # takes the staged one out again.
    assert staged == 1, observed.__dict__
    assert left_out == filtered - staged
    assert filtered == sum(len(rows) for rows in before.values()) + 1
    assert missing == {}
    now = mirror_person(store, person.sourced_id)
    if changed_first:
        assert now == held  # the mirror's version came last: it is the mirror's row again
        assert mirror(store) == before
    else:
        assert now["family_name"] == "Twice"
        assert now["row_hash"] != held["row_hash"]
        assert now["date_last_modified"] != held["date_last_modified"]
        assert {k: v for k, v in mirror(store).items() if k != "person"} == {
            k: v for k, v in before.items() if k != "person"
        }
    assert report.fetched["persons"] == served_counts(served)["persons"]
    # Both runs say the source sent the person twice with different content: this one from
    # the mirror's view (one copy left out as known), the other from its staged copies.
    said = (
        f"persons: the source sent 1 sourcedId more than once with different content "
        f"({person.sourced_id}); the last version sent of each was kept"
    )
    for each in (report, as_before):
        assert [w for w in each.warnings if "more than once" in w] == [said]
    _, ref_mirror, _, _ = await fresh_load(served, tmp_path, workers)
    assert mirror(store) == ref_mirror  # every column, dates included: the last record's
    # The directory is compared with the stage-everything run above, not with the fresh load:
    # a fresh load names a renamed teacher as renamed, where a later run (with or without
    # known rows) keeps the user's display name.


@pytest.mark.parametrize("workers", [2, 0], ids=["pool", "inline"])
async def test_a_record_served_twice_as_held_holds_a_full_run_that_would_remove_a_person(
    served: FakeOneRoster, sqlite_store: Store, tmp_path: Path, workers: int, pooled: list[int]
) -> None:
    """A person served a second time exactly as the mirror holds them (both copies left out
    as known, by their fingerprint) shows that the server's pages moved; the person it no
    longer serves may only have been skipped, so the full run is held rather than remove
    them (rostersync.sync.repeats)."""
    store = sqlite_store
    engine = engine_for(served, store, tmp_path, workers)
    await run(engine)
    person = _first_page_person(served, store)
    gone = next(
        p.sourced_id
        for p in reversed(served.roster.persons)
        if p.role == STUDENT and p.sourced_id != person.sourced_id
    )
    served.remove("user", gone)
    _serve_twice(served, encode_record(person, served.version, served._schools))
    before = mirror(store)

    report = await run(engine, "full")

    assert report.status == "held", report.error
    assert (report.hold_reason or "").startswith(
        f"persons: the source sent 1 sourcedId more than once ({person.sourced_id}): its "
        "records moved while the run paged through them, so the 1 person it did not see"
    )
    assert not [w for w in report.warnings if "more than once" in w]  # the same both times
    assert mirror(store) == before
