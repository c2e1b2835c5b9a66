"""OneRoster 1.2 CSV drops through the engine (entry point, config, connector, store), on
SQLite and PostgreSQL: a bulk drop then a delta drop give the users and groups that 1.1 bulk
drops of the same rosters give, and a delta drop never runs as a full run."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import text

from rostersync.config.loader import load_settings_text
from rostersync.config.models import Settings
from rostersync.sampledata import DistrictSpec, generate_district, write_oneroster_csv
from rostersync.source.records import (
    STUDENT,
    TEACHER,
    MemoryRoster,
    RosterEnrollment,
    RosterPerson,
)
from rostersync.source.testdata import small_roster
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import RunReport, load_report
from tests.oneroster12 import DELTA_STAMP, write_drop
from tests.sync.helpers import groups, snapshot, users

SPEC = DistrictSpec(seed=3, schools=2, teachers=8, students=90, classes=12, students_per_class=6)
Directory = tuple[dict[str, Any], dict[str, Any]]


def settings_for(folder: Path, tmp_path: Path, **source: Any) -> Settings:
    folder.mkdir(parents=True, exist_ok=True)  # config checks that the drop's folder exists
    data = {
        "organization": "Springfield",
        "roles": ["Teacher"],
        "sites": ["North High"],
        "provisioning": {"default_role": "Teacher", "default_site": "North High"},
        "sources": {"csv": {"type": "oneroster_csv", "path": str(folder), **source}},
    }
    return load_settings_text(yaml.safe_dump(data), base_dir=tmp_path)


async def run(engine: SyncEngine, mode: str | None = None) -> RunReport:
    report = await engine.sync("csv", mode=mode)
    await engine.drain()
    with engine.store.read() as conn:
        return load_report(conn, report.id)


def directory(store: Store) -> Directory:
    """Users and groups in a backend-neutral form."""
    people = {
        email: (u["display_name"], tuple(u["roles"]), tuple(u["sites"]), u["status"])
        for email, u in users(store).items()
    }
    sets = {
        key: (
            g["name"],
            tuple(sorted(g["owners"])),
            tuple(sorted((m["sourced_id"], m["email"], m["name"]) for m in g["members"])),
        )
        for key, g in groups(store).items()
    }
    return people, sets


class Reference:
    """The same source fed OneRoster 1.1 bulk drops, in a SQLite store of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.where = tmp_path / f"reference-{random.randrange(10**9)}"
        self.where.mkdir(parents=True)
        self.store = Store(f"sqlite:///{self.where / 'ref.db'}")
        self.store.upgrade()
        self.engine = SyncEngine(settings_for(self.where / "drop", self.where), self.store)

    async def directory_of(self, roster: MemoryRoster) -> Directory:
        write_oneroster_csv(roster, self.where / "drop")
        report = await run(self.engine)
        assert (report.mode, report.status) == ("full", "succeeded_with_errors"), report.error
        return directory(self.store)


def a_days_changes(roster: MemoryRoster) -> tuple[MemoryRoster, MemoryRoster]:
    """(the roster after the changes, the changes alone): a teacher renamed, a class dropped,
    a student leaving one class, a new student joining another."""
    teachers = [e for e in roster.enrollments if e.role == TEACHER and e.class_id.startswith("c-0")]
    renamed, dropped_class = teachers[0].user_id, teachers[1].class_id
    leaving = next(
        e for e in roster.enrollments if e.role == STUDENT and e.class_id == teachers[2].class_id
    )
    joined = teachers[3].class_id
    newcomer = RosterPerson(
        "s-new", STUDENT, "Nova", "Newcomer", "nova@springfield.example.org", "nova",
        org_ids=("sch-001",), date_last_modified=DELTA_STAMP,
    )  # fmt: skip
    changed = MemoryRoster(
        persons=[
            replace(p, family_name="Renamed", date_last_modified=DELTA_STAMP)
            for p in roster.persons
            if p.sourced_id == renamed
        ]
        + [newcomer],
        classes=[
            replace(c, status="tobedeleted", date_last_modified=DELTA_STAMP)
            for c in roster.classes
            if c.sourced_id == dropped_class
        ],
        enrollments=[
            replace(leaving, status="tobedeleted", date_last_modified=DELTA_STAMP),
            RosterEnrollment("e-new", joined, "s-new", STUDENT, date_last_modified=DELTA_STAMP),
        ],
    )
    after = roster.copy()
    for kind in ("persons", "classes", "enrollments"):
        updates = {r.sourced_id: r for r in getattr(changed, kind)}
        current = [updates.pop(r.sourced_id, r) for r in getattr(after, kind)]
        setattr(after, kind, current + list(updates.values()))
    return after, changed


async def test_a_1_2_bulk_drop_then_a_delta_drop_give_what_1_1_drops_give(
    store: Store, tmp_path: Path
) -> None:
    """A 1.2 bulk drop syncs the directory a 1.1 drop of the same roster gives; the next day's
    1.2 delta drop, synced by the scheduled (full) run, is applied as a delta run and gives what
    a 1.1 bulk drop of the changed roster gives."""
    roster = generate_district(SPEC)
    reference = Reference(tmp_path)
    engine = SyncEngine(settings_for(tmp_path / "drop", tmp_path), store)

    write_drop(roster, tmp_path / "drop")
    first = await run(engine)
    assert (first.mode, first.status, first.warnings) == ("full", "succeeded_with_errors", [])
    assert [r["sourced_id"] for r in first.rejected] == ["t-edge-noemail"]
    before = directory(store)
    assert before == await reference.directory_of(roster)
    assert len(before[0]) > 5 and len(before[1]) > 5

    after, changed = a_days_changes(roster)
    drop = tmp_path / "drop"
    for old in drop.iterdir():
        old.unlink()
    write_drop(changed, drop, delta=True)
    second = await run(engine)
    assert second.mode == "delta"
    assert second.fetched["persons"] == 2 and second.fetched["enrollments"] == 2
    [warning] = second.warnings
    assert warning == (
        f"{drop / 'manifest.csv'}: a delta drop (file.roles, file.orgs, file.users, "
        "file.classes and file.enrollments are delta): it holds changes only, and a full run "
        "would remove everything it does not mention: ran a delta run instead"
    )
    assert directory(store) == await reference.directory_of(after)
    assert directory(store) != before
    assert second.counts["groups_removed"] == 1


async def test_a_delta_drop_is_refused_by_a_full_run_asked_for_or_a_first_sync(
    store: Store, tmp_path: Path
) -> None:
    """`sync --full` of a delta drop, and a delta drop as a source's first sync, fail saying
    why and change nothing: a full run would remove everything the drop does not mention."""
    roster = generate_district(SPEC)
    _, changed = a_days_changes(roster)
    write_drop(changed, tmp_path / "delta", delta=True)
    engine = SyncEngine(settings_for(tmp_path / "delta", tmp_path), store)
    first = await run(engine)
    assert first.status == "failed"
    assert "no full run of this source has succeeded yet" in (first.error or "")
    assert users(store) == {}

    write_drop(roster, tmp_path / "bulk")
    bulk = SyncEngine(settings_for(tmp_path / "bulk", tmp_path), store)
    assert (await run(bulk)).status == "succeeded_with_errors"
    before = snapshot(store)
    asked = await run(engine, "full")
    assert asked.status == "failed"
    assert "a full run was asked for (--full)" in (asked.error or "")
    assert f"{tmp_path / 'delta' / 'manifest.csv'}: a delta drop (" in (asked.error or "")
    assert snapshot(store) == before
    dry = await engine.sync("csv", dry_run=True)
    # Without --full the same drop runs as a delta run (a dry one here: nothing is kept).
    assert (dry.mode, dry.status, dry.dry_run) == ("delta", "succeeded", True)
    assert snapshot(store) == before


async def test_a_delta_run_of_a_bulk_drop_removes_nothing_it_leaves_out(
    store: Store, tmp_path: Path
) -> None:
    """`sync --delta` reads a bulk drop as changes: a teacher missing from it keeps the account
    (the report says why); the next full run removes them."""
    roster = generate_district(SPEC)
    write_drop(roster, tmp_path / "drop")
    engine = SyncEngine(settings_for(tmp_path / "drop", tmp_path), store)
    await run(engine)
    gone = next(p for p in roster.persons if p.role == TEACHER and p.sourced_id.startswith("t-0"))
    assert gone.email is not None and gone.email.lower() in users(store)
    smaller = roster.copy()
    smaller.persons = [p for p in roster.persons if p is not gone]
    smaller.enrollments = [e for e in roster.enrollments if e.user_id != gone.sourced_id]
    write_drop(smaller, tmp_path / "drop")
    delta = await run(engine, "delta")
    assert delta.mode == "delta"
    assert any("bulk drop read by a delta run" in w for w in delta.warnings)
    assert users(store)[gone.email.lower()]["status"] == "active"
    full = await run(engine, "full")
    assert full.mode == "full" and full.counts["users_archived"] == 1
    assert users(store)[gone.email.lower()]["status"] == "archived"


async def test_a_held_delta_drop_is_approved_as_a_delta_run(store: Store, tmp_path: Path) -> None:
    """A delta drop whose run is held (it removes a group past max_removals) is approved as
    the delta run it was: nothing it does not mention is swept."""
    roster = generate_district(SPEC)
    write_drop(roster, tmp_path / "drop")
    settings = settings_for(tmp_path / "drop", tmp_path, safety={"max_removals": 0})
    engine = SyncEngine(settings, store)
    await run(engine)
    reference = Reference(tmp_path)
    assert directory(store) == await reference.directory_of(roster)
    after, changed = a_days_changes(roster)
    for old in (tmp_path / "drop").iterdir():
        old.unlink()
    write_drop(changed, tmp_path / "drop", delta=True)
    before = snapshot(store)
    held = await run(engine)
    assert (held.mode, held.status) == ("delta", "held")
    assert snapshot(store) == before
    approved = await engine.approve(held.id)
    await engine.drain()
    assert (approved.mode, approved.status) == ("delta", "succeeded")
    assert directory(store) == await reference.directory_of(after)


async def test_a_secondary_teacher_role_makes_a_teacher(store: Store, tmp_path: Path) -> None:
    """A 1.2 person whose primary role is aide and who also has a secondary teacher role
    teaches: they get an account (any of their roles counts)."""
    roster = generate_district(SPEC)
    teacher = next(
        e.user_id for e in roster.enrollments if e.role == TEACHER and e.class_id.startswith("c-0")
    )
    roster.replace_person(teacher, role="aide", other_roles=("teacher",))
    write_drop(roster, tmp_path / "drop")
    engine = SyncEngine(settings_for(tmp_path / "drop", tmp_path), store)
    await run(engine)
    email = next(p.email for p in roster.persons if p.sourced_id == teacher)
    assert email is not None and email.lower() in users(store)
    roster.replace_person(teacher, other_roles=())
    write_drop(roster, tmp_path / "drop")
    report = await run(engine)
    assert report.counts["users_archived"] == 1
    assert users(store)[email.lower()]["status"] == "archived"


async def test_a_delta_source_says_why_it_runs_full_after_bulk_drops(
    store: Store, tmp_path: Path
) -> None:
    """With `mode: delta`, a run after bulk drops whose rows carry no dateLastModified is a
    full run, and says that this, not a missing full run, is why; a delta drop then runs as
    the delta run it is, and once its dates give a starting point, without a warning."""
    drop = tmp_path / "drop"
    write_oneroster_csv(small_roster(), drop)
    engine = SyncEngine(settings_for(drop, tmp_path, mode="delta"), store)
    first = await run(engine)
    assert first.warnings == ["delta requested but no earlier full run: running full"]
    second = await run(engine)
    assert second.mode == "full"
    assert second.warnings == [
        "delta requested but no record so far carried a dateLastModified to start from: "
        "running full"
    ]
    manifest = (drop / "manifest.csv").read_text()
    for name in ("orgs", "classes", "enrollments"):
        manifest = manifest.replace(f"file.{name},bulk", f"file.{name},absent")
    (drop / "manifest.csv").write_text(manifest.replace("file.users,bulk", "file.users,delta"))
    users_csv = (drop / "users.csv").read_text().splitlines(keepends=True)
    [ada] = [line for line in users_csv if line.startswith("t-1,")]
    changed = ada.replace("t-1,,,", "t-1,active,2026-10-01T08:30:00Z,").replace("Lovelace", "King")
    (drop / "users.csv").write_text(users_csv[0] + changed)
    third = await run(engine)
    assert third.mode == "delta"
    assert third.warnings[0] == second.warnings[0]
    assert third.warnings[1].endswith(
        "a full run would remove everything it does not mention: ran a delta run instead"
    )
    with store.read() as conn:
        family = conn.execute(
            text("SELECT family_name FROM roster_person WHERE sourced_id = 't-1'")
        ).scalar_one()
    assert family == "King"
    fourth = await run(engine)
    assert (fourth.mode, fourth.warnings) == ("delta", [])
