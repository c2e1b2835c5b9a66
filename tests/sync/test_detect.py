"""A sync's change detection: what changed, which members it updates itself, which classes it
marks for the resyncs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import event, text

from rostersync.config.models import Settings
from rostersync.resync.queue import queue_resync
from rostersync.source.records import Rejected, RosterEnrollment
from rostersync.source.rows import sort_batch
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import detect
from rostersync.sync.engine import SyncEngine
from rostersync.sync.staging import stage
from tests.sync.helpers import groups, snapshot, sync, users


async def test_student_changes_update_members_and_queue_only_their_teachers(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A student's new name reaches the group in the sync itself: the class keeps its owners
    and its students, so no teacher's groups need a resync."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.replace_person("s-1", given_name="Renamed")
    report = await sync(settings, store, roster, drain=False)
    assert report.counts["resync_queued"] == 0
    assert report.counts["groups_updated"] == 1  # s-1 is only in c-1
    names = {m["sourced_id"]: m["name"] for m in groups(store)["c-1"]["members"]}
    assert names["s-1"] == "Renamed Dent"
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0


async def test_a_sync_adds_removes_and_updates_members_in_one_pass(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The sync's own member update writes all three kinds of change at once (on PostgreSQL
    each as one statement over arrays): a student whose email is gone keeps a member row with
    no email, one leaves c-1, one joins it, and the other members stay as they were."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = {m["sourced_id"]: m for m in groups(store)["c-2"]["members"]}
    roster = small_roster()
    roster.replace_person("s-1", email=None, family_name="Nomail")
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-s2c1"]
    roster.enrollments.append(RosterEnrollment("e-s4c1", "c-1", "s-4", "student"))
    report = await sync(settings, store, roster, drain=False)
    assert report.status == "succeeded"
    members = {m["sourced_id"]: m for m in groups(store)["c-1"]["members"]}
    assert set(members) == {"s-1", "s-3", "s-4"}
    assert members["s-1"]["email"] is None and members["s-1"]["name"] == "Stu1 Nomail"
    assert members["s-4"]["email"] == "s4@example.org" and members["s-4"]["name"] == "Stu4 Dent"
    assert {m["sourced_id"]: m for m in groups(store)["c-2"]["members"]} == before


async def test_student_side_changes_that_move_owners_still_queue_the_teachers(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Members-only updates stop where owners can change: a class losing its last student
    loses its group through its teacher's resync, a student moving between two classes is
    moved by the sync alone, and a student who becomes a teacher goes to resync."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    # s-4 moves from c-2 to c-1 (the same enrollment id, another class): members only.
    roster.enrollments = [
        replace(e, class_id="c-1") if e.sourced_id == "e-s4c2" else e for e in roster.enrollments
    ]
    report = await sync(settings, store, roster, drain=False)
    assert report.counts["resync_queued"] == 0 and report.counts["groups_updated"] == 2
    g = groups(store)
    assert "s-4" in {m["sourced_id"] for m in g["c-1"]["members"]}
    assert "s-4" not in {m["sourced_id"] for m in g["c-2"]["members"]}

    # Every student leaves c-2: its teachers are resynced and the group goes.
    roster.enrollments = [
        e for e in roster.enrollments if not (e.class_id == "c-2" and e.role == "student")
    ]
    report = await sync(settings, store, roster)
    assert report.counts["resync_queued"] == 2 and report.counts["groups_removed"] == 1
    assert "c-2" not in groups(store)

    # A student of c-1 whose person record turns teacher may change who teaches c-1: its
    # teacher is resynced (membership follows the enrollment, so s-1 stays a member).
    roster.replace_person("s-1", role="teacher")
    report = await sync(settings, store, roster)
    assert report.counts["resync_queued"] == 1
    assert "s-1" in {m["sourced_id"] for m in groups(store)["c-1"]["members"]}


async def test_student_enrolled_twice_in_a_class_is_one_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Two enrollment records for one student in one class (sources do send them) make one
    member of the new group, not a failed insert."""
    roster = small_roster()
    roster.enrollments.append(RosterEnrollment("e-again", "c-1", "s-1", "student"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded"
    members = [m["sourced_id"] for m in groups(store)["c-1"]["members"]]
    assert sorted(members) == ["s-1", "s-2", "s-3"]


async def test_a_record_sent_twice_in_a_run_is_mirrored_as_its_last_version(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A source repeating a person within one run (Classroom lists a student under each of
    their courses; paging can shift) leaves one mirror row, the last version, and one
    member named after it: on SQLite the apply settles the repeat in staging, which the
    fetch only appended to. On a first load and on a later run alike."""
    roster = small_roster()
    s1 = next(p for p in roster.persons if p.sourced_id == "s-1")
    roster.persons.append(replace(s1, family_name="Later"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded"
    with store.read() as conn:
        names = conn.execute(
            text("SELECT family_name FROM roster_person WHERE sourced_id = 's-1'")
        ).scalars()
        assert list(names) == ["Later"]
    members = {m["sourced_id"]: m["name"] for m in groups(store)["c-1"]["members"]}
    assert members["s-1"].endswith(" Later")
    roster.persons.append(replace(s1, family_name="Last"))
    report = await sync(make_settings(), store, roster)
    assert report.status == "succeeded"
    members = {m["sourced_id"]: m["name"] for m in groups(store)["c-1"]["members"]}
    assert members["s-1"].endswith(" Last")
    with store.read() as conn:
        staged = conn.execute(text("SELECT count(*) FROM staging_person")).scalar_one()
    assert staged == 0


async def test_member_emails_are_lower_cased_beyond_ascii(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Member emails are lower-cased as Python and PostgreSQL do it, on SQLite too: in a new
    group and in a members-only update by the sync."""
    settings = make_settings()
    roster = small_roster()
    roster.replace_person("s-1", email="ÉLÈVE.Un@Example.ORG")
    await sync(settings, store, roster)
    emails = {m["sourced_id"]: m["email"] for m in groups(store)["c-1"]["members"]}
    assert emails["s-1"] == "élève.un@example.org"
    roster.replace_person("s-2", email="ÖZGE@EXAMPLE.ORG")
    await sync(settings, store, roster)
    emails = {m["sourced_id"]: m["email"] for m in groups(store)["c-1"]["members"]}
    assert emails["s-2"] == "özge@example.org"


async def test_new_enrollment_adds_member(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A new student enrollment adds a member to the class's group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments.append(RosterEnrollment("e-new", "c-1", "s-5", "student"))
    report = await sync(settings, store, roster)
    assert report.counts["groups_updated"] == 1
    assert "s-5" in {m["sourced_id"] for m in groups(store)["c-1"]["members"]}


async def test_class_emptied_removes_group(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A class whose students all leave stops being a group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.enrollments = [
        e for e in roster.enrollments if not (e.class_id == "c-2" and e.role == "student")
    ]
    report = await sync(settings, store, roster)
    assert report.counts["groups_removed"] == 1
    assert set(groups(store)) == {"c-1"}
    assert users(store)["alan.turing@example.org"]["status"] == "archived"


async def test_rejected_class_is_not_swept(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A class the source refused this time keeps its mirror rows, group and teacher."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = snapshot(store)
    roster = small_roster()
    roster.classes = [c for c in roster.classes if c.sourced_id != "c-1"]
    roster.enrollments = [e for e in roster.enrollments if e.class_id != "c-1"]
    roster.persons = [p for p in roster.persons if p.sourced_id not in ("s-1", "s-2")]
    roster.rejected.append(Rejected("class", "c-1", "forbidden: 403"))
    report = await sync(settings, store, roster)
    assert report.status == "succeeded_with_errors"
    assert report.counts["users_archived"] == 0 and report.counts["groups_removed"] == 0
    assert snapshot(store) == before


async def test_sync_marks_changed_classes_until_their_resync(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A sync marks the members it changed (a person, an enrollment) and the classes whose own
    row changed; the resync that re-reads them clears the marks."""
    settings = make_settings()
    await sync(settings, store, small_roster(), drain=False)
    with store.read() as conn:  # a first run: new groups read every member anyway
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0
    await SyncEngine(settings, store).drain()
    roster = small_roster()
    roster.replace_person("s-4", given_name="Changed")  # s-4 is only in c-2
    # Ada stops co-teaching c-2: its owners change, so its members wait for the resync too.
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c2"]
    roster.classes = [
        replace(c, title="Algebra II") if c.sourced_id == "c-1" else c for c in roster.classes
    ]
    roster.enrollments = [
        e for e in roster.enrollments if not (e.class_id == "c-1" and e.user_id == "s-1")
    ]
    await sync(settings, store, roster, drain=False)
    with store.read() as conn:
        classes = {r[0] for r in conn.execute(text("SELECT class_id FROM dirty_class"))}
        members = set(conn.execute(text("SELECT class_id, person_id FROM dirty_member")).all())
    assert classes == {"c-1"}  # its title changed: its members are re-read in full
    assert members == {("c-2", "s-4")}  # (c-1, s-1) is covered by the class mark
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.drain()
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM dirty_class")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0
    g = groups(store)
    assert "Changed Dent" in {m["name"] for m in g["c-2"]["members"]}
    assert g["c-2"]["owners"] == ["alan.turing@example.org"]
    assert g["c-1"]["name"] == "Algebra II"
    assert "s-1" not in {m["sourced_id"] for m in g["c-1"]["members"]}


async def test_a_class_re_read_in_full_loses_its_member_marks_too(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A member marked by one sync, then its whole class marked by the next before any
    resync ran: the resync that re-reads the class clears both marks (they would otherwise
    stay, to be re-read again by every later resync of the class)."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.replace_person("s-4", given_name="Changed")  # s-4 is only in c-2
    # Ada stops co-teaching c-2: its owners change, so its members wait for the resync.
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-t1c2"]
    await sync(settings, store, roster, drain=False)
    roster.classes = [
        replace(c, title="Geometry II") if c.sourced_id == "c-2" else c for c in roster.classes
    ]
    await sync(settings, store, roster, drain=False)
    with store.read() as conn:
        assert {r[0] for r in conn.execute(text("SELECT class_id FROM dirty_class"))} == {"c-2"}
        marked = set(conn.execute(text("SELECT class_id, person_id FROM dirty_member")).all())
    assert marked == {("c-2", "s-4")}
    await SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)}).drain()
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM dirty_class")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM dirty_member")).scalar_one() == 0
    g = groups(store)
    assert g["c-2"]["name"] == "Geometry II"
    assert "Changed Dent" in {m["name"] for m in g["c-2"]["members"]}


async def test_member_marks_re_read_only_the_marked_members(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A sync-queued resync re-reads the marked members of a group and leaves its other rows
    alone (that is the point of the marks); a manual resync re-reads the whole group."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    with store.write() as conn:  # drift nobody marked: another member's stored name
        conn.execute(text("UPDATE group_member SET name = 'Stale' WHERE sourced_id = 's-5'"))
    roster = small_roster()
    roster.replace_person("s-4", given_name="Changed")
    report = await sync(settings, store, roster)
    assert report.counts["groups_updated"] == 1
    names = {m["sourced_id"]: m["name"] for m in groups(store)["c-2"]["members"]}
    assert names["s-4"] == "Changed Dent" and names["s-5"] == "Stale"

    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    with store.write() as conn:
        owner = conn.execute(
            text("""SELECT o.user_id FROM group_owner o JOIN groups g ON g.id = o.group_id
                    WHERE g.external_id = 'c-2' ORDER BY o.user_id LIMIT 1""")
        ).scalar_one()
        queue_resync(conn, [owner], reason="manual", run_id=None)
    await engine.drain()
    names = {m["sourced_id"]: m["name"] for m in groups(store)["c-2"]["members"]}
    assert names["s-5"] != "Stale"


def test_a_first_load_finds_the_changes_the_row_by_row_comparison_finds(store: Store) -> None:
    """A source's first load (no enrollment of it in the mirror, no group) counts classes and
    enrollments in SQL: the same dirty classes, owners and new enrollments as reading every
    staged enrollment, here with a sparse ``tobedeleted`` one and an aide among them."""
    roster = small_roster()
    roster.enrollments += [
        RosterEnrollment("e-aide", "c-3", "s-1", "aide"),
        RosterEnrollment("e-gone", "", "", "", status="tobedeleted"),
    ]
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    with store.write() as conn:
        stage(conn, 1, sort_batch(roster.records()))
        event.listen(conn, "before_cursor_execute", seen)
        fast = detect.find_changes(conn, "mem", 1, full=True, grouped={})
        event.remove(conn, "before_cursor_execute", seen)
        # A group for a class the roster does not have: the first-load test fails, the loop runs
        slow = detect.find_changes(conn, "mem", 1, full=True, grouped={"no-such-class": 0})
    assert any("GROUP BY s.class_id" in q for q in statements)  # the first-load path ran
    assert not any("LEFT JOIN roster_enrollment" in q for q in statements)
    # A first load writes every staged enrollment: their ids are not collected (the merge
    # reads all of staging); the loop collects all of them.
    assert "enrollment" not in fast.to_write
    assert slow.to_write.pop("enrollment") == {e.sourced_id for e in roster.enrollments}
    assert fast == slow
    assert fast.dirty_classes == {"c-1", "c-2", "c-3", ""}
    assert fast.owner_classes == {"c-1", "c-2", "c-3", ""}
    assert fast.member_pairs == set()


def test_a_member_diff_is_written_in_one_statement_a_kind(store: Store) -> None:
    """Members added, gone and updated, many of each: the rows end as wanted (an email may
    be gone), and on PostgreSQL each kind is one statement over arrays, where psycopg's
    executemany sent one statement per row."""
    from rostersync.resync.members import _apply_member_diff

    with store.write() as conn:
        gid = conn.execute(
            text(
                "INSERT INTO groups (source, external_id, name) VALUES ('m', 'c', 'C') RETURNING id"
            )
        ).scalar_one()
        have: dict[tuple[int, str], tuple[str | None, str]] = {
            (gid, f"s-{i:03d}"): (f"s{i}@example.org", f"Stu {i}") for i in range(0, 300)
        }
        conn.execute(
            text(
                "INSERT INTO group_member (group_id, sourced_id, email, name) VALUES (:g, :s, :e, :n)"
            ),
            [{"g": g, "s": s, "e": e, "n": n} for (g, s), (e, n) in have.items()],
        )
        want = {k: v for k, v in have.items() if int(k[1][2:]) >= 100}  # 100 gone
        want |= {(gid, f"s-{i:03d}"): (None, f"Renamed {i}") for i in range(200, 300)}
        want |= {(gid, f"s-{i:03d}"): (f"n{i}@example.org", f"New {i}") for i in range(300, 400)}
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(conn, "before_cursor_execute", seen)
        changed = _apply_member_diff(conn, want, have)
        event.remove(conn, "before_cursor_execute", seen)
        rows = conn.execute(
            text("SELECT group_id, sourced_id, email, name FROM group_member WHERE group_id = :g"),
            {"g": gid},
        )
        held = {(g, s): (e, n) for g, s, e, n in rows}
    assert changed == {gid}
    assert held == want
    if store.dialect == "postgresql":
        assert len(statements) == 3 and all("unnest" in s for s in statements)


def test_new_groups_get_their_members_in_one_statement_on_postgresql(store: Store) -> None:
    """The members of just-created groups are their classes' active students; on PostgreSQL
    one statement over an array fills them all (each statement hashes every person of the
    source), on SQLite one per 500 groups."""
    from rostersync.resync.members import sync_members
    from rostersync.source.records import RosterPerson
    from rostersync.source.rows import COLUMNS, enrollment_tuple, person_tuple

    people = [
        RosterPerson("s-1", "student", given_name="S", family_name="One", email="S1@Example.org"),
        RosterPerson("s-2", "student", given_name="S", family_name="Two", status="tobedeleted"),
    ]
    enrollments = [
        RosterEnrollment(f"e-{c}-{p.sourced_id}", f"c-{c:04d}", p.sourced_id, "student")
        for c in range(600)
        for p in people
    ]
    with store.write() as conn:
        for kind, rows in (
            ("person", [person_tuple(p) for p in people]),
            ("enrollment", [enrollment_tuple(e) for e in enrollments]),
        ):
            quoted = ", ".join(f'"{c}"' for c in COLUMNS[kind])
            marks = ", ".join(f":v{i}" for i in range(len(COLUMNS[kind])))
            conn.execute(
                text(f"INSERT INTO roster_{kind} (source, {quoted}) VALUES ('m', {marks})"),
                [{f"v{i}": v for i, v in enumerate(row)} for row in rows],
            )
        conn.execute(
            text("INSERT INTO groups (source, external_id, name) VALUES ('m', :ext, 'G')"),
            [{"ext": f"c-{c:04d}"} for c in range(600)],
        )
        gids = list(conn.execute(text("SELECT id FROM groups")).scalars())
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(conn, "before_cursor_execute", seen)
        sync_members(conn, gids, new=True)
        event.remove(conn, "before_cursor_execute", seen)
        members = conn.execute(text("SELECT group_id, sourced_id, email FROM group_member")).all()
    assert sorted(members) == sorted((g, "s-1", "s1@example.org") for g in gids)
    inserts = [s for s in statements if s.startswith("INSERT INTO group_member")]
    assert len(inserts) == (1 if store.dialect == "postgresql" else 2)


async def test_teachers_of_classes_passes_over_all_teachers_only_for_most_classes(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: Any
) -> None:
    """Asked about most of the source's classes (a first run), teachers_of_classes reads all
    its teacher enrollments in one pass; about fewer than half (a run that changed some), it
    probes just those classes. The same teachers either way."""
    await sync(make_settings(), store, small_roster())
    monkeypatch.setattr(detect, "TEACHER_PASS_MIN_CLASSES", 0)
    statements: list[str] = []
    with store.read() as conn:
        classes = {c for (c,) in conn.execute(text("SELECT sourced_id FROM roster_class"))}
        expected = {
            c: {
                u
                for (u,) in conn.execute(
                    text(
                        "SELECT user_id FROM roster_enrollment "
                        "WHERE role = 'teacher' AND class_id = :c"
                    ),
                    {"c": c},
                )
            }
            for c in classes
        }
        one = min(classes)
        assert len(classes) >= 3 and expected[one]
        event.listen(conn, "before_cursor_execute", lambda _c, _u, s, *_a: statements.append(s))
        assert detect.teachers_of_classes(conn, "mem", {one}) == expected[one]
        probes = [s for s in statements if "FROM roster_enrollment" in s]
        assert probes and all("class_id IN" in s or "ANY" in s for s in probes)
        statements.clear()
        assert detect.teachers_of_classes(conn, "mem", classes) == set().union(*expected.values())
        passes = [s for s in statements if "FROM roster_enrollment" in s]
        assert len(passes) == 1 and "class_id IN" not in passes[0] and "ANY" not in passes[0]
