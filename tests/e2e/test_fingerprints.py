"""End to end against the fake server, every page decoded by two worker processes: a full run
leaves out, in the workers, the records the mirror holds by their fingerprints, and ends with
the directory a run that read every record gives (rostersync.sync.known)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.source.rows import StagedBatch
from rostersync.store.db import Store
from rostersync.sync import fetch as fetch_step
from rostersync.sync import staging
from rostersync.sync.engine import SyncEngine
from rostersync.sync.repeats import Repeats
from tests.e2e.test_oneroster_e2e import (
    aged_district,
    change_counts,
    csv_reference,
    directory,
    rest_source,
    run,
    settings_for,
)
from tests.fakes.oneroster_server import FakeOneRoster
from tests.sync.helpers import snapshot

pytestmark = pytest.mark.slow

KINDS = ("org", "person", "class", "enrollment")


@pytest.fixture
def server() -> Iterator[FakeOneRoster]:
    with FakeOneRoster(aged_district(), version="1.1") as srv:
        yield srv


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of every row staged, in order."""
    seen: list[str] = []
    real = staging.stage  # what fetch_step.stage is

    def counting(conn: Any, run_id: int, batch: StagedBatch) -> Repeats:
        seen.extend(row[0] for rows in batch.rows.values() for row in rows)
        return real(conn, run_id, batch)

    monkeypatch.setattr(fetch_step, "stage", counting)
    return seen


def engine_for(server: FakeOneRoster, store: Store, tmp_path: Path, **extra: Any) -> SyncEngine:
    source = rest_source(server, decode_workers=2) | extra
    return SyncEngine(settings_for(tmp_path, source), store)


def mirror_fingerprints(store: Store) -> dict[str, int]:
    """Rows with a fingerprint, per kind."""
    with store.read() as conn:
        return {
            kind: conn.execute(
                text(f"SELECT count(*) FROM roster_{kind} WHERE fp IS NOT NULL")
            ).scalar_one()
            for kind in KINDS
        }


async def test_a_no_op_full_run_leaves_every_record_out_in_the_workers(
    server: FakeOneRoster, store: Store, tmp_path: Path, pooled: list[int], staged: list[str]
) -> None:
    engine = engine_for(server, store, tmp_path)
    first = await run(engine)
    assert first.status == "succeeded_with_errors", first.error
    records = sum(first.fetched[k] for k in ("orgs", "persons", "classes", "enrollments"))
    # every record fetched (the rejected one, a teacher without an email, is counted apart)
    # is in the mirror with its fingerprint
    assert sum(mirror_fingerprints(store).values()) == records
    before = snapshot(store)
    staged.clear()

    again = await run(engine, "full")

    assert again.status == "succeeded_with_errors" and again.mode == "full"
    assert set(change_counts(again).values()) == {0}
    assert again.fetched == first.fetched  # counted as fetched, left out all the same
    assert staged == []
    assert snapshot(store) == before


async def test_a_full_run_stages_what_changed_and_sweeps_what_went(
    server: FakeOneRoster, store: Store, tmp_path: Path, pooled: list[int], staged: list[str]
) -> None:
    engine = engine_for(server, store, tmp_path)
    await run(engine)
    roster = server.roster
    klass = next(c.sourced_id for c in roster.classes if c.sourced_id.startswith("c-0"))
    student = next(p.sourced_id for p in roster.persons if p.role == "student")
    gone = next(e.sourced_id for e in roster.enrollments if e.class_id != klass)
    server.update("class", klass, title="Renamed")
    server.update("user", student, family_name="Changed")
    server.remove("enrollment", gone)
    staged.clear()

    report = await run(engine, "full")

    assert report.status == "succeeded_with_errors", report.error
    assert sorted(staged) == sorted([klass, student])
    with store.read() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM roster_enrollment WHERE sourced_id = :e"), {"e": gone}
        )
        assert left.scalar_one() == 0
    assert directory(store) == await csv_reference(server.roster, tmp_path)


async def test_a_mirror_without_fingerprints_is_read_whole_once_then_left_out(
    server: FakeOneRoster, store: Store, tmp_path: Path, pooled: list[int], staged: list[str]
) -> None:
    """Rows from before the fingerprints (migration 0016), or from a normalizer since
    changed: the next full run reads every record, changes nothing and stores the
    fingerprints; the run after leaves the records out."""
    engine = engine_for(server, store, tmp_path)
    await run(engine)
    expected = directory(store)
    with store.write() as conn:
        for kind in KINDS:
            conn.execute(text(f"UPDATE roster_{kind} SET fp = NULL"))
    staged.clear()

    upgraded = await run(engine, "full")

    assert set(change_counts(upgraded).values()) == {0}
    assert len(staged) == sum(
        upgraded.fetched[k] for k in ("orgs", "persons", "classes", "enrollments")
    )
    assert directory(store) == expected
    assert all(mirror_fingerprints(store).values())
    before = snapshot(store)
    staged.clear()
    await run(engine, "full")
    assert staged == []
    assert snapshot(store) == before


async def test_a_held_run_left_records_out_and_its_approval_applies_what_it_saw(
    server: FakeOneRoster, store: Store, tmp_path: Path, pooled: list[int]
) -> None:
    """Held by the safety limits after its workers left the unchanged records out: the hold
    changes nothing, and its approval gives what a run that read every record gives."""
    engine = engine_for(server, store, tmp_path)
    await run(engine)
    (tmp_path / "ref").mkdir()
    reference = Store(f"sqlite:///{tmp_path / 'ref' / 'ref.db'}")
    reference.upgrade()
    plain = SyncEngine(settings_for(tmp_path / "ref", rest_source(server)), reference)
    await run(plain)
    roster = server.roster
    teacher = next(e.user_id for e in roster.enrollments if e.role == "teacher")
    for e in roster.enrollments:  # the teacher leaves every class: archived, groups removed
        if e.user_id == teacher and e.role == "teacher":
            server.remove("enrollment", e.sourced_id)
    settings = settings_for(tmp_path, rest_source(server, decode_workers=2))
    settings = settings.model_copy(
        update={"safety": settings.safety.model_copy(update={"max_removals": 0})}
    )
    held_engine = SyncEngine(settings, store)
    before = snapshot(store)

    held = await held_engine.sync("district", mode="full")

    assert held.status == "held", held.error
    assert snapshot(store) == before
    approved = await held_engine.approve(held.id)
    await held_engine.drain()
    assert approved.status in ("succeeded", "succeeded_with_errors"), approved.error
    with pytest.MonkeyPatch.context() as patch:  # the reference reads every record
        patch.setattr(fetch_step, "KnownRows", lambda source: None)
        await run(plain, "full")
    try:
        assert directory(store) == directory(reference)
        assert users_archived(store) == {teacher}
    finally:
        reference.dispose()


def users_archived(store: Store) -> set[str]:
    with store.read() as conn:
        rows = conn.execute(
            text(
                'SELECT i.external_id FROM user_identity i JOIN "user" u ON u.id = i.user_id '
                "WHERE u.status = 'archived'"
            )
        )
        return {r[0] for r in rows}
