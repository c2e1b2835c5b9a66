"""A full run stages only what changed (rostersync.sync.known): unchanged rows are left out
where they are staged, the sweep still removes what the run did not see, a held run's
staging is completed for its approval, and every outcome equals that of a run that staged
every row."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster
from rostersync.source.rows import COLUMNS, StagedBatch, sort_batch
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import fetch as fetch_step
from rostersync.sync import staging
from rostersync.sync.engine import SyncEngine
from rostersync.sync.known import FP_AT, HASH_AT, KnownRows, MirrorChangedError, row_key
from rostersync.sync.mirror import TABLES
from rostersync.sync.repeats import Repeats
from tests.sync.helpers import groups, snapshot, sync, users


@pytest.fixture
def staged_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Rows each staging write carried, in order."""
    counts: list[int] = []
    real = staging.stage

    def counting(conn: Any, run_id: int, batch: StagedBatch) -> Repeats:
        counts.append(sum(len(rows) for rows in batch.rows.values()))
        return real(conn, run_id, batch)

    monkeypatch.setattr(fetch_step, "stage", counting)
    yield counts


def stage_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs as they were before: every fetched row staged."""
    monkeypatch.setattr(fetch_step, "KnownRows", lambda source: None)


def staged_count(store: Store) -> int:
    with store.read() as conn:
        return sum(
            int(conn.execute(text(f"SELECT count(*) FROM {t.name}")).scalar_one())
            for t in staging.STAGING.values()
        )


def outcome(store: Store) -> tuple[Any, ...]:
    """The directory as the CLI lists it, and the mirror's rows by id and hash (comparable
    across SQLite and PostgreSQL)."""
    with store.read() as conn:
        mirror = tuple(
            sorted(
                (r[0], r[1]) for r in conn.execute(text(f"SELECT sourced_id, row_hash FROM {t}"))
            )
            for t in ("roster_org", "roster_person", "roster_class", "roster_enrollment")
        )
    return users(store), groups(store), mirror


def changed_roster() -> MemoryRoster:
    """The small roster with one teacher renamed, one student gone and one enrollment moved."""
    roster = small_roster()
    roster.persons = [
        replace(p, family_name="Byron") if p.sourced_id == "t-1" else p
        for p in roster.persons
        if p.sourced_id != "s-3"
    ]
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "s-3"]
    return roster


async def test_a_no_op_full_run_stages_nothing(
    store: Store,
    make_settings: Callable[..., Settings],
    staged_rows: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    await sync(settings, store, small_roster())
    first = sum(staged_rows)
    assert first == len(small_roster().records())
    before = snapshot(store)
    staged_rows.clear()
    events: list[tuple[str, dict[str, Any]]] = []
    real_fetch = SyncEngine._fetch

    class Recorder:  # the run's logger, with what it says of the fetch written down
        def __init__(self, log: Any) -> None:
            self.log = log

        def info(self, event: str, **fields: Any) -> None:
            events.append((event, fields))
            self.log.info(event, **fields)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.log, name)

    async def recording(self: SyncEngine, *args: Any, **kwargs: Any) -> Any:
        source, run_id, mode, since, log, *rest = args
        return await real_fetch(self, source, run_id, mode, since, Recorder(log), *rest, **kwargs)

    monkeypatch.setattr(SyncEngine, "_fetch", recording)
    report = await sync(settings, store, small_roster())
    assert report.status == "succeeded", report.error
    assert staged_rows == []  # not even an empty staging write (a write transaction)
    assert report.fetched["persons"] == len(small_roster().persons)  # counted all the same
    assert snapshot(store) == before
    [done] = [fields for event, fields in events if event == "fetch_done"]
    assert done["unchanged"] == first  # the log says what was left out


async def test_a_full_run_stages_only_what_changed_and_sweeps_what_it_did_not_see(
    store: Store,
    make_settings: Callable[..., Settings],
    staged_rows: list[int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    settings = make_settings()
    await sync(settings, store, small_roster())
    staged_rows.clear()
    report = await sync(settings, store, changed_roster())
    assert report.status == "succeeded", report.error
    assert sum(staged_rows) == 1  # the renamed teacher; the removals are not staged at all
    with store.read() as conn:
        rows = conn.execute(text("SELECT sourced_id, family_name FROM roster_person"))
        people = {sid: family for sid, family in rows}
    assert "s-3" not in people and people["t-1"] == "Byron"

    # The same two runs, every row staged, end in the same directory and mirror.
    stage_everything(monkeypatch)
    other = Store(f"sqlite:///{tmp_path / 'everything.db'}")
    other.ensure_schema()
    try:
        await sync(settings, other, small_roster())
        await sync(settings, other, changed_roster())
        assert outcome(other) == outcome(store)
    finally:
        other.dispose()


async def test_a_held_run_keeps_every_row_for_its_approval(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The held run staged only what changed; its staging is completed from the mirror, and
    the approval (another engine, comparing staging with the mirror) sweeps just what the
    run did not see."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = small_roster()
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    roster.enrollments = [
        e for e in roster.enrollments if e.role == "teacher" or e.class_id != "c-2"
    ]
    report = await sync(settings, store, roster)
    assert report.status == "held"
    assert snapshot(store) == before
    seen = sum(report.fetched[k] for k in ("orgs", "persons", "classes", "enrollments"))
    assert staged_count(store) == seen  # every row the run saw, for the approval
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    approved = await engine.approve(report.id)
    await engine.drain()
    assert approved.status == "succeeded", approved.error
    assert users(store)["alan.turing@example.org"]["status"] == "archived"
    # Only the enrollments the held run did not see are gone from the mirror.
    with store.read() as conn:
        left = {r[0] for r in conn.execute(text("SELECT sourced_id FROM roster_enrollment"))}
    assert left == {e.sourced_id for e in roster.enrollments}


def loaded(rows: dict[str, list[Any]]) -> KnownRows:
    """A KnownRows as if the mirror held these staging rows, per kind."""
    known = KnownRows("mem")
    for kind, kind_rows in rows.items():
        known.remaining[kind] = {row_key(r[HASH_AT[kind]], r[0]) for r in kind_rows}
        if kind_rows:
            known.held.add(kind)
    known._loaded.set()
    return known


def person_rows(roster: MemoryRoster) -> list[Any]:
    return sort_batch(roster.persons).rows["person"]


def test_rows_equal_to_the_mirror_are_left_out() -> None:
    rows = person_rows(small_roster())
    known = loaded({"person": rows[1:]})
    out = known.filter(sort_batch(small_roster().persons))
    assert [r[0] for r in out.rows["person"]] == [rows[0][0]]  # new to the mirror
    assert known.unchanged["person"] == len(rows) - 1
    assert known.remaining["person"] == set()
    assert known.missing("person") == set()


def test_a_repeated_id_keeps_its_last_version() -> None:
    """Staging keeps the last version of an id sent twice; so does the filter: an unchanged
    row after a staged one is staged too, and a changed row after an unchanged one wins."""
    roster = small_roster()
    person = roster.persons[0]
    renamed = replace(person, given_name="Other")
    same = person_rows(MemoryRoster(persons=[person]))

    known = loaded({"person": same})
    first = known.filter(sort_batch([renamed]))
    second = known.filter(sort_batch([person]))
    assert len(first.rows["person"]) == 1 and len(second.rows["person"]) == 1
    assert known.unchanged["person"] == 0
    assert known.missing("person") == set()  # staged, not gone

    known = loaded({"person": same})
    assert known.filter(sort_batch([person])).rows["person"] == []
    assert len(known.filter(sort_batch([renamed])).rows["person"]) == 1
    assert known.missing("person") == set()


def test_what_the_run_did_not_see_is_missing() -> None:
    rows = person_rows(small_roster())
    org = sort_batch([small_roster().orgs[0]]).rows["org"]
    known = loaded({"person": rows, "org": org})
    known.filter(sort_batch(small_roster().persons[1:]))
    assert known.missing("person") == {rows[0][0]}
    assert known.missing("org") == {org[0][0]}
    assert known.held == {"person", "org"}


def test_a_first_load_is_staged_whole() -> None:
    known = loaded({})
    batch = sort_batch(small_roster().records())
    out = known.filter(batch)
    assert out.rows == batch.rows
    assert all(not ids for ids in known.staged.values())  # nothing to sweep, nothing kept
    assert set(known.unchanged) == set(COLUMNS)


async def test_the_loaded_keys_are_the_mirrors_across_slices_and_odd_ids(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite hands the keys over joined, a slice of rowids at a time: every slice, and an id
    holding the separator, still give exactly the rows of this source."""
    from rostersync.sync import known

    roster = small_roster()
    odd = replace(roster.persons[0], sourced_id="t-\x1fodd,\n'x'")
    roster.persons.append(odd)
    await sync(make_settings(), store, roster)
    with store.write() as conn:  # another source's rows are not this source's keys
        conn.execute(
            text(
                "INSERT INTO roster_org (source, sourced_id, name, type, status, row_hash) "
                "VALUES ('other', 'o-x', 'X', 'school', 'active', 'ffff')"
            )
        )
    monkeypatch.setattr(known, "SLICE_ROWS", 3)
    loaded_rows = KnownRows("mem")
    loaded_rows.load(store)
    with store.read() as conn:
        for kind, (mirror, _, _) in TABLES.items():
            expected = {
                row_key(h, sid)
                for h, sid in conn.execute(
                    text(f"SELECT row_hash, sourced_id FROM {mirror} WHERE source = 'mem'")
                )
            }
            assert expected, kind
            assert loaded_rows.remaining[kind] == expected, kind
    # the separator's fallback ran: the odd id was stored and read back
    assert any(k.endswith(f":{odd.sourced_id}") for k in loaded_rows.remaining["person"])
    assert loaded_rows.held == set(COLUMNS)


# -- records known by their fingerprints ------------------------------------------------------


def with_fp(row: tuple[Any, ...], fp: int) -> tuple[Any, ...]:
    return (*row[:-1], fp)


def page(rows: list[tuple[Any, ...]], marks: list[int]) -> StagedBatch:
    """A fingerprinted page of persons: ``marks`` in the page's order, ``~fp`` for a record a
    decode worker left out as known; ``rows`` the others."""
    batch = StagedBatch()
    batch.rows["person"] = rows
    batch.order["person"] = array("q", marks)
    batch.skipped["person"] = sum(1 for m in marks if m < 0)
    return batch


def fp_loaded(rows: list[tuple[Any, ...]]) -> KnownRows:
    """A KnownRows as if the mirror held these person rows with their fingerprints."""
    known = KnownRows("mem")
    known.remaining_fp["person"] = {r[FP_AT["person"]]: r[0] for r in rows}
    known.held.add("person")
    known._loaded.set()
    return known


def fp_rows() -> list[tuple[Any, ...]]:
    return [with_fp(r, 100 + i) for i, r in enumerate(person_rows(small_roster()))]


def test_records_left_out_by_fingerprint_count_as_seen_and_are_not_staged() -> None:
    rows = fp_rows()
    known = fp_loaded(rows[1:])
    new = rows[0]
    out = known.filter(page([new], [new[-1], *(~r[-1] for r in rows[1:])]))
    assert out.rows["person"] == [new]
    assert known.unchanged["person"] == len(rows) - 1
    assert known.missing("person") == set()
    assert not any(known.reverted.values())
    assert page([new], [new[-1], ~rows[1][-1]]).count("person") == 2


def test_a_record_whose_fingerprint_the_mirror_lacks_is_staged_and_what_went_is_missing() -> None:
    rows = fp_rows()
    known = fp_loaded(rows)
    changed = with_fp(rows[0], 999)  # its bytes changed: a new fingerprint
    known.filter(page([changed], [changed[-1], *(~r[-1] for r in rows[2:])]))
    assert known.staged["person"] == {rows[0][0]}
    assert known.missing("person") == {rows[1][0]}  # neither sent nor staged


def test_a_repeated_id_keeps_its_last_version_across_and_within_pages() -> None:
    """Staged, then left out as known: the id goes out of staging again (revert), so the
    mirror's row, equal to the last record, stays. Known, then changed: the change is staged."""
    rows = fp_rows()
    first, changed = rows[0], with_fp(rows[0], 999)

    known = fp_loaded(rows)
    known.filter(page([changed], [changed[-1]]))
    known.filter(page([], [~first[-1]]))
    assert known.reverted["person"] == {first[0]}
    assert first[0] not in known.staged["person"]
    assert first[0] not in known.missing("person")

    known = fp_loaded(rows)
    assert known.filter(page([], [~first[-1]])).rows["person"] == []
    assert known.filter(page([changed], [changed[-1]])).rows["person"] == [changed]
    assert not known.reverted["person"] and first[0] in known.staged["person"]

    # within one page, the page's order decides
    known = fp_loaded(rows)
    out = known.filter(page([changed], [changed[-1], ~first[-1]]))
    assert out.rows["person"] == [changed] and known.reverted["person"] == {first[0]}
    known = fp_loaded(rows)
    out = known.filter(page([changed], [~first[-1], changed[-1]]))
    assert out.rows["person"] == [changed] and not known.reverted["person"]

    # the same record twice: seen twice, staged never
    known = fp_loaded(rows)
    known.filter(page([], [~first[-1], ~first[-1]]))
    assert known.unchanged["person"] == 2 and not known.staged["person"]


async def test_a_reverted_id_leaves_staging(store: Store) -> None:
    rows = fp_rows()
    known = fp_loaded(rows)
    changed = with_fp(rows[0], 999)
    staged_batch = known.filter(page([changed], [changed[-1]]))
    known.filter(page([], [~rows[0][-1]]))
    with store.write() as conn:
        staging.stage(conn, 5, staged_batch)
        assert known.revert(conn, 5) == 1
        left = conn.execute(text("SELECT count(*) FROM staging_person WHERE run_id = 5"))
        assert left.scalar_one() == 0


def test_a_record_left_out_that_the_mirror_does_not_hold_fails_the_filter() -> None:
    rows = fp_rows()
    known = fp_loaded(rows)
    with pytest.raises(MirrorChangedError, match="the mirror changed"):
        known.filter(page([], [~12345]))
    first_load = fp_loaded([])
    first_load.held.clear()
    with pytest.raises(MirrorChangedError):
        first_load.filter(page([], [~rows[0][-1]]))


def test_rows_from_record_values_are_still_known_by_their_hash() -> None:
    """A connector without fingerprints (CSV, Google Classroom): rows carry None there and
    the mirror rows without a fingerprint are matched by hash and id, as before."""
    rows = person_rows(small_roster())
    assert all(r[FP_AT["person"]] is None for r in rows)
    known = loaded({"person": rows})
    assert known.filter(sort_batch(small_roster().persons)).rows["person"] == []
    assert known.unchanged["person"] == len(rows)


@pytest.mark.parametrize("least", [fetch_step.STAGE_MIN_ROWS, 3])
async def test_changed_rows_from_many_batches_are_staged_in_few_writes(
    store: Store,
    make_settings: Callable[..., Settings],
    staged_rows: list[int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    least: int,
) -> None:
    """A full run's few changed rows, from most of its batches, wait for one another: each
    write but the fetch's last carries at least STAGE_MIN_ROWS, and the outcome is that of
    a run that staged every batch as it came. A first load's rows are not held."""
    monkeypatch.setattr(fetch_step, "STAGE_MIN_ROWS", least)
    settings = make_settings()
    await sync(settings, store, small_roster())
    # A first load's batches leave nothing out: they go in as they come, not held back.
    assert len(staged_rows) > 1 and staged_rows[0] <= 7
    renamed = small_roster()
    renamed.persons = [replace(p, family_name=p.family_name + "-x") for p in renamed.persons]
    staged_rows.clear()
    report = await sync(settings, store, renamed)
    assert report.status == "succeeded", report.error
    assert sum(staged_rows) == len(renamed.persons)
    assert len(renamed.persons) > 7  # more than one batch (MemoryConnector's 7 records)
    if least > len(renamed.persons):
        assert staged_rows == [len(renamed.persons)]  # one write, at the end of the fetch
    else:
        assert len(staged_rows) > 1
        assert all(n >= least for n in staged_rows[:-1])

    stage_everything(monkeypatch)
    other = Store(f"sqlite:///{tmp_path / 'everything.db'}")
    other.ensure_schema()
    try:
        await sync(settings, other, small_roster())
        await sync(settings, other, renamed)
        assert outcome(other) == outcome(store)
    finally:
        other.dispose()


async def test_a_run_frees_its_view_of_the_mirror_unless_its_process_ends_after_it(
    sqlite_store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run's view of the mirror (a string and an entry per mirror row) is freed when
    the run ends, in a process that goes on (the daemon, tests); an engine whose process ends
    after its runs (``spent`` set, as the console's `sync` sets it) keeps it instead, where
    freeing it cost the event loop 80 ms at district L before the lease went back."""
    import gc
    import weakref

    views: list[weakref.ref[KnownRows]] = []

    class Watched(KnownRows):
        def __init__(self, source: str) -> None:
            super().__init__(source)
            views.append(weakref.ref(self))

    monkeypatch.setattr(fetch_step, "KnownRows", Watched)
    settings = make_settings()
    connectors = {"mem": MemoryConnector(small_roster(), batch_size=7)}
    going_on = SyncEngine(settings, sqlite_store, connectors=connectors)
    assert going_on.spent is None
    assert (await going_on.sync("mem")).status == "succeeded"
    gc.collect()
    assert len(views) == 1 and views[0]() is None
    ending = SyncEngine(settings, sqlite_store, connectors=connectors)
    kept: list[object] = []  # the console's is a module's list, kept until os._exit
    ending.spent = kept
    assert (await ending.sync("mem")).status == "succeeded"
    del ending
    gc.collect()
    assert len(views) == 2 and isinstance(views[1](), Watched)
    assert len(kept) == 1
    assert sum(views[1]().unchanged.values()) == len(small_roster().records())  # type: ignore[union-attr]
    # The next run's start lets the last one's go: one view held at a time.
    again = SyncEngine(settings, sqlite_store, connectors=connectors)
    again.spent = kept
    assert (await again.sync("mem")).status == "succeeded"
    gc.collect()
    assert len(views) == 3 and views[1]() is None and isinstance(views[2](), Watched)
    assert len(kept) == 1
