"""School scoping and academic terms through the engine, on SQLite and PostgreSQL: what is
out of scope is what the source did not send (full runs sweep it, delta runs delete it),
with the usual removal rules and safety holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypedDict

import httpx
import yaml
from sqlalchemy import text

from rostersync.config.loader import load_settings_text
from rostersync.config.models import Settings
from rostersync.config.source import ScopedSourceConfig
from rostersync.resync.queue import queue_resync
from rostersync.source.records import (
    AcademicSession,
    MemoryRoster,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    TeacherRoster,
)
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import changes as changeset
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import RunReport, load_report
from rostersync.sync.scope import keep_mirrored_classes
from tests.oneroster12 import write_drop
from tests.sync.helpers import groups, users
from tests.sync.test_csv12_sync import run as csv_run
from tests.sync.test_csv12_sync import settings_for

FALL = AcademicSession("fall", "Fall", "semester", date(2026, 8, 20), date(2026, 12, 20))
SPRING = AcademicSession("spring", "Spring", "semester", date(2027, 1, 5), date(2027, 6, 1))
T0 = datetime(2026, 9, 1, tzinfo=UTC)


class Stamp(TypedDict):
    """The keyword every record of `roster` is given (typed, so `**at` is checked)."""

    date_last_modified: datetime


def roster() -> MemoryRoster:
    """Two schools under a district. t-1 teaches c-1 at North; t-2 teaches c-2 at South; t-3
    is at both and teaches c-3 (North) and c-4 (South). s-4 is a South student in c-1."""
    at: Stamp = {"date_last_modified": T0}
    orgs = [
        RosterOrg("d", "District", type="district", **at),
        RosterOrg("sch-1", "North High", parent_id="d", **at),
        RosterOrg("sch-2", "South Middle", parent_id="d", **at),
    ]

    def person(sid: str, role: str, *schools: str) -> RosterPerson:
        return RosterPerson(
            sid, role, sid.upper(), "X", f"{sid}@example.org", org_ids=("d", *schools), **at
        )

    persons = [
        person("t-1", "teacher", "sch-1"),
        person("t-2", "teacher", "sch-2"),
        person("t-3", "teacher", "sch-1", "sch-2"),
        person("s-1", "student", "sch-1"),
        person("s-2", "student", "sch-1"),
        person("s-3", "student", "sch-2"),
        person("s-4", "student", "sch-2"),
    ]
    classes = [
        RosterClass("c-1", "Algebra", school_id="sch-1", term_ids=("fall",), **at),
        RosterClass("c-2", "Biology", school_id="sch-2", **at),
        RosterClass("c-3", "Chemistry", school_id="sch-1", term_ids=("spring",), **at),
        RosterClass("c-4", "Drama", school_id="sch-2", term_ids=("fall", "spring"), **at),
    ]

    def enrol(cls: str, user: str, role: str = "student") -> RosterEnrollment:
        return RosterEnrollment(f"e-{cls}-{user}", cls, user, role, **at)

    enrollments = [
        enrol("c-1", "t-1", "teacher"),
        enrol("c-1", "s-1"),
        enrol("c-1", "s-4"),
        enrol("c-2", "t-2", "teacher"),
        enrol("c-2", "s-3"),
        enrol("c-3", "t-3", "teacher"),
        enrol("c-3", "s-2"),
        enrol("c-4", "t-3", "teacher"),
        enrol("c-4", "s-3"),
    ]
    return MemoryRoster(orgs, persons, classes, enrollments, sessions=[FALL, SPRING])


def scoped(settings: Settings, **scope: Any) -> Settings:
    sources = dict(settings.sources)
    sources["mem"] = ScopedSourceConfig.model_validate({"type": "memory", **scope})
    return settings.model_copy(update={"sources": sources})


class Runner:
    """Syncs one memory roster (delta-capable) with a settable day for the terms rules."""

    def __init__(self, settings: Settings, store: Store, data: MemoryRoster) -> None:
        self.store = store
        self.connector = MemoryConnector(data, batch_size=4, delta=True)
        self.engine = SyncEngine(settings, store, connectors={"mem": self.connector})
        self.day = date(2026, 10, 1)
        self.engine.today = lambda: self.day

    def configure(self, settings: Settings) -> None:
        self.engine.settings = settings

    async def sync(self, mode: str | None = None, **kwargs: Any) -> RunReport:
        report = await self.engine.sync("mem", mode=mode, **kwargs)
        await self.engine.drain()
        return self.report(report.id)

    async def approve(self, run_id: int) -> RunReport:
        await self.engine.approve(run_id)
        await self.engine.drain()
        return self.report(run_id)

    def report(self, run_id: int) -> RunReport:
        with self.store.read() as conn:
            return load_report(conn, run_id)


def mirror(store: Store, table: str, source: str = "mem") -> dict[str, str]:
    with store.read() as conn:
        sql = f"SELECT sourced_id, status FROM {table} WHERE source = :s"
        return dict(conn.execute(text(sql), {"s": source}).all())


def active_users(store: Store) -> set[str]:
    return {e.split("@")[0] for e, u in users(store).items() if u["status"] == "active"}


def members(store: Store, cls: str) -> set[str]:
    return {m["sourced_id"] for m in groups(store)[cls]["members"]}


# -- live answers -----------------------------------------------------------------------------


async def test_a_live_answer_keeps_only_the_classes_in_scope_even_when_it_lists_none(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A scoped source's live answer keeps the classes the last sync held, their enrollments
    and their students. An answer listing no class at all (the teacher's only class is gone
    from the source) but still holding an out-of-scope class's enrollment and student keeps
    neither: it was written whole. Found by the model test's scoped machine."""
    run = Runner(scoped(make_settings(), schools={"include": ["sch-1"]}), store, roster())
    await run.sync()
    data = roster()
    south = next(c for c in data.classes if c.sourced_id == "c-2")
    student = next(p for p in data.persons if p.sourced_id == "s-3")
    enrolled = [e for e in data.enrollments if e.class_id == "c-2"]
    teacher = data.persons[0]
    with store.read() as conn:
        empty = keep_mirrored_classes(conn, "mem", TeacherRoster(teacher, [], enrolled, [student]))
        listed = keep_mirrored_classes(
            conn, "mem", TeacherRoster(teacher, [south], enrolled, [student])
        )
    for kept in (empty, listed):
        assert (kept.teacher, kept.classes, kept.enrollments, kept.persons) == (
            teacher,
            [],
            [],
            [],
        )


async def test_a_held_scoped_run_leaves_no_key_that_would_hide_the_next_runs_repeats(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The scope step settles repeated ids by building staging's key index, in a transaction
    of its own; a held run keeps its staging for approval. With the index kept, the next
    fetch's INSERT OR REPLACE put a repeated person's second version over the first unseen:
    no warning (and a paged source's full run that should be held for it applied). Found by
    the model test's scoped machine in CI."""
    settings = scoped(make_settings(safety={"max_removals": 0}), schools={"include": ["sch-1"]})
    data = roster()
    run = Runner(settings, store, data)
    assert (await run.sync("full")).status == "succeeded"
    data.enrollments = [e for e in data.enrollments if e.class_id != "c-3"]  # a group goes
    held = await run.sync("full")
    assert held.status == "held", held.error
    data.persons.append(replace(data.persons[3], given_name="Decoy"))  # s-1 sent twice
    again = await run.sync("full")
    assert [w for w in again.warnings if "more than once" in w] == [
        "persons: the source sent 1 sourcedId more than once with different content (s-1); "
        "the last version sent of each was kept"
    ]


# -- schools ----------------------------------------------------------------------------------


async def test_include_by_id_keeps_only_that_schools_records(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Only North's classes become groups; South's teacher gets no account; a South student
    in a North class stays its member; the report counts what was ignored."""
    run = Runner(scoped(make_settings(), schools={"include": ["sch-1"]}), store, roster())
    report = await run.sync()
    assert report.status == "succeeded"
    assert set(groups(store)) == {"c-1", "c-3"}
    assert active_users(store) == {"t-1", "t-3"}
    assert members(store, "c-1") == {"s-1", "s-4"}
    assert set(mirror(store, "roster_class")) == {"c-1", "c-3"}
    assert "t-2" not in mirror(store, "roster_person") and "s-3" not in mirror(
        store, "roster_person"
    )
    assert report.counts["classes_ignored"] == 2
    assert report.counts["persons_ignored"] == 2  # t-2, s-3 (s-4 is in c-1)
    assert report.counts["enrollments_ignored"] == 4
    assert report.fetched["classes"] == 4  # what the source sent
    assert report.as_json()["counts"]["classes_ignored"] == 2


async def test_exclude_by_name_is_the_same_as_include_by_id(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """`exclude: [South Middle]` (a name) leaves out what `include: [sch-1]` leaves out."""
    run = Runner(scoped(make_settings(), schools={"exclude": ["South Middle"]}), store, roster())
    report = await run.sync()
    assert set(groups(store)) == {"c-1", "c-3"}
    assert active_users(store) == {"t-1", "t-3"}
    assert report.counts["classes_ignored"] == 2 and report.warnings == []


async def test_include_of_the_district_by_name_takes_its_schools(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """An org includes the orgs under it."""
    run = Runner(scoped(make_settings(), schools={"include": ["District"]}), store, roster())
    report = await run.sync()
    assert set(groups(store)) == {"c-1", "c-2", "c-3", "c-4"}
    assert report.counts["classes_ignored"] == 0


async def test_a_teacher_at_an_included_and_an_excluded_school_keeps_the_included_classes(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """t-3 teaches at both schools: with South excluded they keep their account and only
    North's class."""
    run = Runner(scoped(make_settings(), schools={"exclude": ["sch-2"]}), store, roster())
    await run.sync()
    owned = {cls for cls, g in groups(store).items() if "t-3@example.org" in g["owners"]}
    assert owned == {"c-3"}
    assert "t-3" in active_users(store)


async def test_an_unknown_school_is_a_warning_in_every_run(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A name or id matching no org is reported (a typo would otherwise scope silently)."""
    settings = scoped(make_settings(), schools={"include": ["sch-1", "Nort High"]})
    run = Runner(settings, store, roster())
    for _ in range(2):
        report = await run.sync()
        assert any("include 'Nort High' matches no org" in w for w in report.warnings)
    assert set(groups(store)) == {"c-1", "c-3"}


async def test_narrowing_the_scope_is_not_a_shrunken_source(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Excluding a school removes its groups and archives its teacher through the normal
    rules; min_source_ratio compares what the source sent, which did not shrink."""
    base = make_settings(safety={"min_source_ratio": 0.9})
    run = Runner(scoped(base), store, roster())
    await run.sync()
    assert set(groups(store)) == {"c-1", "c-2", "c-3", "c-4"}
    run.configure(scoped(base, schools={"exclude": ["sch-2"]}))
    report = await run.sync()
    assert report.status == "succeeded", report.hold_reason
    assert set(groups(store)) == {"c-1", "c-3"}
    assert users(store)["t-2@example.org"]["status"] == "archived"
    assert report.counts["groups_removed"] == 2 and report.counts["users_archived"] == 1


async def test_an_archival_for_a_narrowed_scope_says_so_and_one_for_a_gone_teacher_too(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A held run's change set gives the reason of each archival: the teacher the narrowed
    scope leaves out is "outside the source's scope", not "gone from the source" (the scope
    takes them out of the run, and the mirror then holds them no more than a teacher the
    source dropped); a teacher the source no longer sends is gone. The dry run's set says
    the same."""
    base = make_settings(safety={"max_removals": 0})
    data = roster()
    data.persons.append(replace(data.persons[0], sourced_id="t-9", email="t-9@example.org"))
    data.classes.append(replace(data.classes[0], sourced_id="c-9"))
    data.enrollments += [
        RosterEnrollment("e-c-9-t-9", "c-9", "t-9", "teacher", date_last_modified=T0),
        RosterEnrollment("e-c-9-s-1", "c-9", "s-1", "student", date_last_modified=T0),
    ]
    run = Runner(scoped(base), store, data)
    await run.sync()
    assert {"t-2@example.org", "t-9@example.org"} <= set(users(store))
    run.configure(scoped(base, schools={"exclude": ["sch-2"]}))
    data.persons = [p for p in data.persons if p.sourced_id != "t-9"]
    dry = await run.sync(dry_run=True, changes=True)
    held = await run.sync()
    assert held.status == "held"
    for report in (dry, held):
        with store.read() as conn:
            stored = changeset.load(conn, report.id)
        assert stored is not None
        reasons = {u["sourced_id"]: u["reason"] for u in stored.users if u["action"] == "archive"}
        assert reasons == {
            "t-2": "no longer a teacher of this source: outside the source's scope (its "
            "schools setting)",
            "t-9": "no longer a teacher of this source: gone from the source",
        }


async def test_a_shrunken_part_in_scope_is_held_though_the_rest_of_the_source_is_not(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """With the same scope, the records in scope are compared: North losing all its classes
    is an empty pull, even though South's classes still make half of what was sent."""
    settings = scoped(make_settings(), schools={"include": ["sch-1"]})
    data = roster()
    run = Runner(settings, store, data)
    await run.sync()
    data.classes = [c for c in data.classes if c.school_id != "sch-1"]
    data.enrollments = [e for e in data.enrollments if e.class_id in {"c-2", "c-4"}]
    report = await run.sync()
    assert report.status == "held"
    assert "an empty pull: 0 classes against 2" in (report.hold_reason or "")
    assert set(groups(store)) == {"c-1", "c-3"}


async def test_scoped_out_records_do_not_make_a_source_look_shrunken(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Against a last run with the same scope, the comparison is in scope with in scope: a
    source whose other schools grow or shrink is not held for them."""
    settings = scoped(
        make_settings(safety={"min_source_ratio": 0.9}), schools={"include": ["sch-1"]}
    )
    data = roster()
    run = Runner(settings, store, data)
    await run.sync()
    data.classes = [c for c in data.classes if c.school_id == "sch-1"]
    data.enrollments = [e for e in data.enrollments if e.class_id in {"c-1", "c-3"}]
    report = await run.sync()
    assert report.status == "succeeded", report.hold_reason
    assert set(groups(store)) == {"c-1", "c-3"}


async def test_a_delta_run_deletes_a_class_that_moves_to_an_excluded_school(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A delta run applies a record that left the scope as a deletion, so the mirror keeps
    no stale copy; a record out of scope the mirror never held is dropped."""
    settings = scoped(make_settings(), schools={"include": ["sch-1"]})
    data = roster()
    run = Runner(settings, store, data)
    await run.sync()
    later = datetime(2026, 9, 5, tzinfo=UTC)
    data.classes = [
        replace(c, school_id="sch-2", date_last_modified=later) if c.sourced_id == "c-3" else c
        for c in data.classes
    ]
    data.classes.append(
        RosterClass("c-5", "Economics", school_id="sch-2", date_last_modified=later)
    )
    report = await run.sync("delta")
    assert report.mode == "delta" and report.status == "succeeded"
    assert set(groups(store)) == {"c-1"}
    assert mirror(store, "roster_class") == {"c-1": "active", "c-3": "tobedeleted"}
    assert report.counts["classes_ignored"] == 2
    assert "t-3" not in active_users(store)


async def test_changing_the_scope_makes_the_next_delta_run_full(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The mirror holds what the old scope kept: a delta run asked for runs full."""
    base = make_settings()
    run = Runner(scoped(base), store, roster())
    await run.sync()
    run.configure(scoped(base, schools={"include": ["sch-1"]}))
    report = await run.sync("delta")
    assert report.mode == "full"
    assert any("schools or terms settings changed" in w for w in report.warnings)
    assert set(groups(store)) == {"c-1", "c-3"}
    again = await run.sync("delta")
    assert again.mode == "delta"


async def test_a_scoped_live_resync_brings_in_no_class_out_of_scope(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """`resync --live` keeps to the classes the last sync found in scope."""
    run = Runner(scoped(make_settings(), schools={"include": ["sch-1"]}), store, roster())
    await run.sync()
    with store.write() as conn:
        uid = conn.execute(
            text("SELECT id FROM \"user\" WHERE email = 't-3@example.org'")
        ).scalar_one()
        queue_resync(conn, [uid], reason="manual", run_id=None, live=True)
    await run.engine.drain()
    assert set(groups(store)) == {"c-1", "c-3"}
    assert set(mirror(store, "roster_class")) == {"c-1", "c-3"}


# -- terms ------------------------------------------------------------------------------------


async def test_current_terms_keep_classes_of_running_terms_and_classes_without_terms(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """In October, fall classes count and spring ones do not; a class without terms counts,
    and so does one in both terms."""
    settings = scoped(make_settings(), terms={"mode": "current", "grace_days": 14})
    run = Runner(settings, store, roster())
    report = await run.sync()
    assert set(groups(store)) == {"c-1", "c-2", "c-4"}
    assert "t-3" in active_users(store)  # c-4 runs in fall too
    assert report.counts["classes_out_of_term"] == 1
    assert mirror(store, "roster_class")["c-3"] == "tobedeleted"  # kept, with its enrollments
    assert mirror(store, "roster_enrollment")["e-c-3-s-2"] == "active"
    assert report.counts["classes_ignored"] == 0


async def test_the_default_terms_mode_counts_every_class(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    run = Runner(scoped(make_settings()), store, roster())
    report = await run.sync()
    assert set(groups(store)) == {"c-1", "c-2", "c-3", "c-4"}
    assert report.counts["classes_out_of_term"] == 0


async def test_grace_days_widen_a_term_on_both_sides(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """On 1 January, with 14 grace days, fall (ended 20 December) and spring (starts 5
    January) both run; with none, neither does."""
    data = roster()
    data.classes = [c for c in data.classes if c.sourced_id in {"c-1", "c-3"}]
    for grace, expected in ((14, {"c-1", "c-3"}), (0, set())):
        settings = scoped(make_settings(), terms={"mode": "current", "grace_days": grace})
        run = Runner(settings, store, data)
        run.day = date(2027, 1, 1)
        report = await run.sync()
        assert report.status == "succeeded", report.hold_reason
        assert set(groups(store)) == expected, grace


async def test_a_class_with_an_unknown_term_counts_with_a_warning(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    data = roster()
    data.classes = [
        replace(c, term_ids=("winter",)) if c.sourced_id == "c-3" else c for c in data.classes
    ]
    run = Runner(scoped(make_settings(), terms={"mode": "current"}), store, data)
    report = await run.sync()
    assert "c-3" in groups(store)
    assert any("did not send (winter)" in w and "c-3" in w for w in report.warnings)


async def test_a_term_ending_removes_its_groups_through_a_held_run_approved_afterwards(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """When fall ends, its classes' groups go: over the removal limit the run is held and
    changes nothing; approved, it removes them and archives the teacher left without one."""
    settings = scoped(
        make_settings(safety={"max_removals": 1}), terms={"mode": "current", "grace_days": 14}
    )
    run = Runner(settings, store, roster())
    await run.sync()
    assert set(groups(store)) == {"c-1", "c-2", "c-4"}
    run.day = date(2027, 1, 20)  # fall ended 20 December, plus 14 days; spring runs
    held = await run.sync()
    assert held.status == "held", held.hold_reason
    assert "exceed safety.max_removals=1" in (held.hold_reason or "")
    assert set(groups(store)) == {"c-1", "c-2", "c-4"}
    assert held.counts["classes_out_of_term"] == 1  # c-1; c-4 runs in spring too
    approved = await run.approve(held.id)
    assert approved.status == "succeeded"
    assert set(groups(store)) == {"c-2", "c-3", "c-4"}
    assert users(store)["t-1@example.org"]["status"] == "archived"
    assert mirror(store, "roster_class")["c-1"] == "tobedeleted"


async def test_a_delta_run_deletes_a_changed_class_whose_terms_ended(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A class a delta run reads is judged by today's terms; unchanged classes wait for the
    next full run."""
    data = roster()
    run = Runner(scoped(make_settings(), terms={"mode": "current"}), store, data)
    await run.sync()
    run.day = date(2027, 2, 1)
    later = datetime(2026, 9, 5, tzinfo=UTC)
    data.classes = [
        replace(c, title="Algebra II", date_last_modified=later) if c.sourced_id == "c-1" else c
        for c in data.classes
    ]
    report = await run.sync("delta")
    assert report.mode == "delta"
    assert mirror(store, "roster_class")["c-1"] == "tobedeleted"
    assert "c-1" not in groups(store)
    assert "c-3" not in groups(store)  # spring started, but c-3 did not change: next full run
    full = await run.sync("full")
    assert full.status == "succeeded", full.hold_reason
    assert set(groups(store)) == {"c-2", "c-3", "c-4"}


# -- a OneRoster 1.2 CSV source ---------------------------------------------------------------

SESSION_HEADER = (
    "sourcedId", "status", "dateLastModified", "title", "type", "startDate", "endDate",
    "parentSourcedId", "schoolYear",
)  # fmt: skip


def session_rows(*sessions: AcademicSession, delta: bool = False) -> list[tuple[str, ...]]:
    stamp = ("active", "2026-10-02T08:00:00.000Z") if delta else ("", "")
    header: list[tuple[str, ...]] = [SESSION_HEADER]
    return header + [
        (s.sourced_id, *stamp, s.title, s.type, s.start_date.isoformat(), s.end_date.isoformat(),
         "", "2027")
        for s in sessions
    ]  # fmt: skip


async def test_a_1_2_bulk_drop_with_terms_and_schools_then_a_delta_drop(
    store: Store, tmp_path: Path
) -> None:
    """A bulk drop keeps North's classes of the running term; the next delta drop moves a
    class into the running term (with its changed session) and adds a class of a term to
    come, which is ignored, and applies a class leaving the scope as a deletion."""
    drop = tmp_path / "drop"
    settings = settings_for(
        drop,
        tmp_path,
        terms={"mode": "current", "grace_days": 0},
        schools={"exclude": ["South Middle"]},
    )
    engine = SyncEngine(settings, store)
    engine.today = lambda: date(2026, 10, 1)
    data = roster()
    north = RosterClass("c-6", "Geometry", school_id="sch-1", term_ids=("fall",))
    data.classes.append(north)
    data.enrollments += [
        RosterEnrollment("e-c-6-t-1", "c-6", "t-1", "teacher"),
        RosterEnrollment("e-c-6-s-2", "c-6", "s-2", "student"),
    ]
    write_drop(data, drop, extra={"academicSessions": session_rows(FALL, SPRING)})
    first = await csv_run(engine)
    assert (first.mode, first.status) == ("full", "succeeded"), first.hold_reason
    assert set(groups(store)) == {"c-1", "c-6"}
    assert first.counts["classes_ignored"] == 2 and first.counts["classes_out_of_term"] == 1

    for old in drop.iterdir():
        old.unlink()
    at = datetime(2026, 10, 2, 8, tzinfo=UTC)
    autumn = replace(FALL, sourced_id="autumn", title="Autumn")
    changes = MemoryRoster(
        classes=[
            replace(data.classes[2], term_ids=("autumn",), date_last_modified=at),  # c-3
            RosterClass("c-7", "Latin", school_id="sch-1", term_ids=("spring",),
                        date_last_modified=at),
            replace(north, school_id="sch-2", date_last_modified=at),  # c-6 moves South
        ],
    )  # fmt: skip
    write_drop(
        changes,
        drop,
        delta=True,
        modes={"academicSessions": "bulk"},
        extra={"academicSessions": session_rows(FALL, SPRING, autumn)},
    )
    second = await csv_run(engine)
    assert second.mode == "delta", second.warnings
    assert second.status == "succeeded", second.hold_reason
    assert set(groups(store)) == {"c-1", "c-3"}
    classes = mirror(store, "roster_class", "csv")
    assert classes["c-3"] == "active" and classes["c-6"] == "tobedeleted"
    assert classes["c-7"] == "tobedeleted"  # kept for when its term comes
    assert members(store, "c-3") == {"s-2"}  # its enrollments were kept while out of term
    assert second.counts["classes_out_of_term"] == 1  # c-7
    assert second.counts["classes_ignored"] == 1  # c-6


# -- a OneRoster REST source ------------------------------------------------------------------


def rest_payloads() -> dict[str, list[dict[str, Any]]]:
    """North's fall and spring classes, each with a teacher and a student, as REST answers."""
    stamp = "2026-09-01T00:00:00.000Z"
    base = {"status": "active", "dateLastModified": stamp}

    def ref(kind: str, sid: str) -> dict[str, str]:
        return {"sourcedId": sid, "type": kind}

    def user(sid: str, role: str) -> dict[str, Any]:
        return base | {
            "sourcedId": sid, "role": role, "givenName": sid, "familyName": "X",
            "email": f"{sid}@example.org", "enabledUser": "true", "orgs": [ref("org", "sch-1")],
        }  # fmt: skip

    def session(sid: str, start: str, end: str) -> dict[str, Any]:
        return base | {"sourcedId": sid, "title": sid, "type": "semester", "startDate": start,
                       "endDate": end, "schoolYear": "2027"}  # fmt: skip

    return {
        "orgs": [base | {"sourcedId": "sch-1", "name": "North High", "type": "school"}],
        "users": [user("t-1", "teacher"), user("t-2", "teacher"), user("s-1", "student")],
        "classes": [
            base
            | {
                "sourcedId": c,
                "title": c,
                "school": ref("org", "sch-1"),
                "terms": [ref("academicSession", term)],
            }
            for c, term in (("c-fall", "fall"), ("c-spring", "spring"))
        ],
        "enrollments": [
            base
            | {
                "sourcedId": f"e-{c}-{u}",
                "class": ref("class", c),
                "user": ref("user", u),
                "role": role,
            }
            for c, u, role in (
                ("c-fall", "t-1", "teacher"),
                ("c-fall", "s-1", "student"),
                ("c-spring", "t-2", "teacher"),
                ("c-spring", "s-1", "student"),
            )
        ],
        "academicSessions": [
            session("fall", "2026-08-20", "2026-12-20"),
            session("spring", "2027-01-05", "2027-06-01"),
        ],
    }


async def test_a_rest_source_keeps_the_classes_of_its_current_academic_sessions(
    store: Store,
) -> None:
    """Through the engine: the REST connector reads /academicSessions and the classes'
    terms; in October only the fall class becomes a group."""
    payloads = rest_payloads()
    asked: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        key = request.url.path.rsplit("/", 1)[-1]
        asked.append(key)
        records = payloads.get(key)
        if records is None:
            return httpx.Response(404)
        offset = int(request.url.params.get("offset", 0))
        page = records[offset : offset + int(request.url.params.get("limit", 1000))]
        return httpx.Response(200, json={key: page}, headers={"X-Total-Count": str(len(records))})

    source = {
        "type": "oneroster",
        "base_url": "https://or.example.org/ims/oneroster/v1p1",
        "auth": {"type": "bearer", "token": "t0ken"},
        "terms": {"mode": "current"},
    }
    config = {
        "organization": "Springfield",
        "roles": ["Teacher"],
        "provisioning": {"default_role": "Teacher"},
        "sources": {"district": source},
    }
    settings = load_settings_text(yaml.safe_dump(config))
    engine = SyncEngine(settings, store, transport=httpx.MockTransport(serve))
    engine.today = lambda: date(2026, 10, 1)
    report = await engine.sync("district")
    await engine.drain()
    assert report.status == "succeeded", (report.error, report.hold_reason)
    assert "academicSessions" in asked
    assert set(groups(store)) == {"c-fall"}
    assert report.counts["classes_out_of_term"] == 1
    assert mirror(store, "roster_class", "district") == {
        "c-fall": "active",
        "c-spring": "tobedeleted",
    }


async def test_a_held_run_whose_scope_left_out_a_whole_kind_can_be_approved(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A kind the school scope left out entirely is not "staged data gone": the held run is
    approved (found by the scoped model machine, which saw the approval refused)."""
    run = Runner(make_settings(safety={"max_removals": 1}), store, roster())
    await run.sync()
    assert set(groups(store)) == {"c-1", "c-2", "c-3", "c-4"}
    run.configure(scoped(run.engine.settings, schools={"exclude": ["sch-1", "sch-2"]}))
    held = await run.sync()
    assert held.status == "held", held.hold_reason
    assert held.fetched["enrollments_ignored"] == held.fetched["enrollments"]
    approved = await run.approve(held.id)
    assert approved.status == "succeeded", approved.error
    assert set(groups(store)) == set()


async def test_a_held_run_that_left_out_a_class_sent_twice_can_be_approved(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A kind's records count once however often they were sent: with every class out of
    scope and one of them sent twice, a held run's staging is not "gone" for the copy. Found
    by the scoped model machine's long profile, which saw the approval refused."""
    data = roster()
    run = Runner(make_settings(safety={"max_removals": 1}), store, data)
    await run.sync()
    run.configure(scoped(run.engine.settings, schools={"exclude": ["sch-1", "sch-2"]}))
    data.classes.append(replace(data.classes[0], title="Decoy"))
    held = await run.sync()
    assert held.status == "held", held.hold_reason
    assert held.fetched["classes_repeated"] == 1
    assert held.fetched["classes_ignored"] == held.fetched["classes"] - 1
    approved = await run.approve(held.id)
    assert approved.status == "succeeded", approved.error
    assert set(groups(store)) == set()
