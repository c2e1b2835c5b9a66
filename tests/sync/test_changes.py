"""The exact change set of held and dry runs (issue 19, item 1): what `runs approve` and the
resync drain then do, row by row."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.source.records import MemoryRoster, RosterClass, RosterEnrollment, RosterPerson
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync import changes as changeset
from rostersync.sync.engine import SyncEngine
from rostersync.sync.history import list_runs
from rostersync.sync.runs import load_report
from tests.changediff import difference, picture, plain
from tests.sync.helpers import sync


def _stored(store: Store, run_id: int) -> changeset.ChangeSet | None:
    with store.read() as conn:
        return changeset.load(conn, run_id)


def _shaken(roster: MemoryRoster) -> MemoryRoster:
    """Alan leaves, Computing loses its students, Algebra is renamed and changes students, a
    new teacher arrives with a new class, and Grace's empty class gets a student."""
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    roster.enrollments = [
        e for e in roster.enrollments if e.role == "teacher" or e.class_id != "c-2"
    ]
    roster.enrollments = [e for e in roster.enrollments if e.sourced_id != "e-s1c1"]
    roster.enrollments.append(RosterEnrollment("e-s5c1", "c-1", "s-5", "student"))
    roster.classes = [
        RosterClass("c-1", "Algebra II", class_code="ALG1", school_id="sch-1")
        if c.sourced_id == "c-1"
        else c
        for c in roster.classes
    ]
    roster.persons.append(
        RosterPerson(
            "t-9", "teacher", "Kat", "Johnson", "kat@example.org", "kat", org_ids=("sch-1",)
        )
    )
    roster.classes.append(RosterClass("c-9", "Orbits", school_id="sch-1"))
    roster.enrollments += [
        RosterEnrollment("e-t9c9", "c-9", "t-9", "teacher"),
        RosterEnrollment("e-s2c9", "c-9", "s-2", "student"),
        RosterEnrollment("e-s4c9", "c-9", "s-4", "student"),
        RosterEnrollment("e-s4c3", "c-3", "s-4", "student"),
    ]
    return roster


async def test_a_held_runs_change_set_is_what_approval_then_does(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Every user and group change of a held run, with owners and members, equals the
    difference approval plus the resync drain make in the directory, row by row."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _shaken(small_roster())
    held = await sync(settings, store, roster)
    assert held.status == "held"
    stored = _stored(store, held.id)
    assert stored is not None
    doc = stored.as_json(members=True)
    before = picture(store, "mem")
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.approve(held.id)
    await engine.drain()
    after = picture(store, "mem")
    assert plain(doc) == difference(before, after, "mem")
    actions = {(u["action"], u["email"]) for u in doc["users"]}
    assert actions == {
        ("archive", "alan.turing@example.org"),
        ("create", "kat@example.org"),
        ("create", "grace@example.org"),  # her class has a student now
    }
    by_class = {g["class_sourced_id"]: g for g in doc["groups"]}
    assert by_class["c-2"]["action"] == "remove"
    assert by_class["c-2"]["members_removed"] == 3
    assert by_class["c-1"]["action"] == "rename"
    assert by_class["c-1"]["old_name"] == "Algebra I"
    assert (by_class["c-1"]["members_added"], by_class["c-1"]["members_removed"]) == (1, 1)
    assert by_class["c-3"]["action"] == "create"
    assert by_class["c-9"]["owners"]["added"] == ["kat@example.org"]
    archived = next(u for u in doc["users"] if u["action"] == "archive")
    assert archived["sourced_id"] == "t-2"
    assert archived["display_name"] == "Alan Turing"
    assert archived["reason"] == (
        "no longer a teacher of this source: teaches no active class with active students"
    )
    # Approved: the change set describes nothing any more.
    assert _stored(store, held.id) is None


async def test_a_dry_runs_change_set_is_what_the_same_real_run_does(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """`sync --dry-run --changes` lists what the same sync, run for real, then does."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    roster = _shaken(small_roster())
    dry = await sync(settings, store, roster, dry_run=True, changes=True)
    assert dry.status == "succeeded"
    stored = _stored(store, dry.id)
    assert stored is not None
    before = picture(store, "mem")
    real = await sync(settings, store, roster)
    assert real.status == "succeeded"
    assert plain(stored.as_json(members=True)) == difference(before, picture(store, "mem"), "mem")
    assert _stored(store, dry.id) is None  # a later real run succeeded: it is gone


async def test_a_first_sync_dry_run_lists_every_creation(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """On an empty directory the change set is the whole first sync."""
    settings = make_settings()
    dry = await sync(settings, store, small_roster(), dry_run=True, changes=True)
    stored = _stored(store, dry.id)
    assert stored is not None
    before = picture(store, "mem")
    await sync(settings, store, small_roster())
    assert plain(stored.as_json(members=True)) == difference(before, picture(store, "mem"), "mem")
    assert stored.summary()["users"]["create"] == 2  # Grace's class is empty
    assert stored.summary()["groups"]["create"] == 2


async def test_a_dry_run_without_changes_records_none_and_changes_nothing(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A plain dry run stays as cheap as before: no change set is computed or stored."""
    settings = make_settings()
    await sync(settings, store, small_roster())
    before = picture(store, "mem")
    dry = await sync(settings, store, _shaken(small_roster()), dry_run=True)
    assert _stored(store, dry.id) is None
    assert picture(store, "mem") == before


async def test_a_dry_run_a_real_run_would_hold_records_a_change_set_only_when_asked(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A dry run over the limits is still a plain dry run without --changes."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    plain_dry = await sync(settings, store, _shaken(small_roster()), dry_run=True)
    assert plain_dry.status == "held"
    assert _stored(store, plain_dry.id) is None
    asked = await sync(settings, store, _shaken(small_roster()), dry_run=True, changes=True)
    assert asked.status == "held"
    assert _stored(store, asked.id) is not None


async def test_computing_a_change_set_changes_nothing(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The held run's preview (provisioning, resync, member diff) is all rolled back, and
    leaves no job queued."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    before = picture(store, "mem")
    held = await sync(settings, store, _shaken(small_roster()), drain=False)
    assert held.status == "held"
    assert picture(store, "mem") == before
    with store.read() as conn:
        queued = conn.execute(
            text("SELECT count(*) FROM resync_job WHERE state = 'queued'")
        ).scalar_one()
    assert queued == 0


async def test_a_held_run_keeps_its_change_set_until_a_later_run_overtakes_it(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Overtaken (a later real run succeeded), a held run's change set is dropped; a later
    dry run does not overtake it."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    held = await sync(settings, store, _shaken(small_roster()))
    dry = await sync(settings, store, small_roster(), dry_run=True, changes=True)
    assert _stored(store, held.id) is not None
    assert _stored(store, dry.id) is not None
    await sync(settings, store, small_roster())
    assert _stored(store, held.id) is None
    assert _stored(store, dry.id) is None


async def test_approving_a_held_run_drops_the_change_sets_of_later_dry_runs(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A dry run made while a run was held previewed a directory the approval changed."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _shaken(small_roster())
    held = await sync(settings, store, roster)
    dry = await sync(settings, store, roster, dry_run=True, changes=True)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.approve(held.id)
    assert _stored(store, dry.id) is None


async def test_a_live_resync_queued_for_a_user_is_named_in_the_change_set(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A user whose live resync waits in the queue: the change set says its groups come from
    the mirror, not from the source's live read."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    with store.write() as conn:
        uid = conn.execute(
            text("SELECT id FROM \"user\" WHERE email = 'ada@example.org'")
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO resync_job (user_id, state, live, attempts, reason, result) "
                "VALUES (:u, 'queued', :yes, 0, 'x', '{}')"
            ),
            {"u": uid, "yes": True},
        )
    held = await sync(settings, store, _shaken(small_roster()), drain=False)
    stored = _stored(store, held.id)
    assert stored is not None
    assert any("live resync" in n for n in stored.notes)


async def test_members_beyond_the_detail_limit_are_counted_not_listed(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge change set keeps its per-group counts but not every member's email."""
    monkeypatch.setattr(changeset, "MEMBER_DETAIL_MAX", 2)
    settings = make_settings()
    dry = await sync(settings, store, small_roster(), dry_run=True, changes=True)
    stored = _stored(store, dry.id)
    assert stored is not None
    assert not stored.members_listed
    assert all(g["members"] is None for g in stored.groups)
    assert sum(g["members_added"] for g in stored.groups) == 6
    assert any("not listed" in n for n in stored.notes)


async def test_the_held_report_is_the_same_as_before(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Recording the change set leaves the held run's counts as the safety check made them,
    and its ``resync_queued`` is what its approval queues (the counts of a held run are what
    it would have done: README, "Run reports"; it said 0 before)."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _shaken(small_roster())
    held = await sync(settings, store, roster)
    with store.read() as conn:
        report = load_report(conn, held.id)
    assert report.counts["users_archived"] == 1
    assert report.counts["users_created"] == 2
    assert report.counts["groups_removed"] == 1
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    approved = await engine.approve(held.id)
    assert report.counts["resync_queued"] == approved.counts["resync_queued"] > 0


async def test_an_approval_is_the_trigger_of_the_run_it_applies_and_a_failed_one_is_undone(
    store: Store, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An approved run's trigger is `approval` and it keeps no change set; an approval that
    fails leaves the run held as before, trigger and change set included."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    roster = _shaken(small_roster())
    held = await sync(settings, store, roster)
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})

    def broken(ctx: object) -> object:
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine, "_apply", broken)
    with pytest.raises(RuntimeError):
        await engine.approve(held.id)
    with store.read() as conn:
        report = load_report(conn, held.id)
    assert (report.status, report.trigger, report.approved_at) == ("held", "cli", None)
    assert _stored(store, held.id) is not None
    monkeypatch.undo()
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.approve(held.id)
    with store.read() as conn:
        report = load_report(conn, held.id)
    assert (report.status, report.trigger) == ("succeeded", "approval")
    assert report.duration is not None and report.duration >= 0
    assert _stored(store, held.id) is None


async def test_a_superseded_held_run_reads_as_superseded(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Derived, not stored: the report of an overtaken held run says superseded (and by
    which run), while its stored status stays held for approval to refuse."""
    settings = make_settings(safety={"max_removals": 1})
    await sync(settings, store, small_roster())
    held = await sync(settings, store, _shaken(small_roster()))
    dry = await sync(settings, store, small_roster(), dry_run=True)
    with store.read() as conn:
        assert load_report(conn, held.id).superseded_by is None  # a dry run overtakes nothing
    later = await sync(settings, store, small_roster())
    with store.read() as conn:
        report = load_report(conn, held.id)
        listed = {r["id"]: r for r in list_runs(conn)}
    assert report.status == "held" and report.superseded_by == later.id
    assert report.as_json()["status"] == "superseded"
    assert listed[held.id]["status"] == "superseded"
    assert listed[held.id]["superseded_by"] == later.id
    assert listed[dry.id]["status"] == "succeeded" and listed[dry.id]["superseded_by"] is None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"status": "tobedeleted"}, "marked tobedeleted in the source"),
        ({"enabled": False}, "disabled in the source"),
        ({"role": "aide"}, "no longer of a teacher role (roles: aide)"),
    ],
)
async def test_an_archival_says_why_the_person_is_no_longer_a_teacher(
    store: Store,
    make_settings: Callable[..., Settings],
    change: dict[str, object],
    why: str,
) -> None:
    """The reason of an archival names what the source changed about the person."""
    settings = make_settings(safety={"max_removals": 0})
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.replace_person("t-2", **change)
    held = await sync(settings, store, roster)
    stored = _stored(store, held.id)
    assert stored is not None
    (archived,) = [u for u in stored.users if u["action"] == "archive"]
    assert archived["reason"].endswith(f": {why}")


async def test_a_teacher_gone_from_the_source_is_archived_as_gone(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A person missing from a full run: "gone from the source"."""
    settings = make_settings(safety={"max_removals": 0})
    await sync(settings, store, small_roster())
    roster = small_roster()
    roster.persons = [p for p in roster.persons if p.sourced_id != "t-2"]
    held = await sync(settings, store, roster)
    stored = _stored(store, held.id)
    assert stored is not None
    (archived,) = [u for u in stored.users if u["action"] == "archive"]
    assert archived["reason"].endswith(": gone from the source")


async def test_groups_of_another_source_that_the_resync_changes_are_listed(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A teacher_roles edit resyncs every user of the source: the groups they own in another
    source are rebuilt too, and the change set lists them (with their source)."""
    both = ("mem", "other")
    settings = make_settings(memory_sources=both)
    await sync(settings, store, small_roster())
    await sync(settings, store, small_roster(), source="other")
    narrowed = make_settings(
        memory_sources=both,
        safety={"max_removals": 0},
        provisioning={"default_role": "Teacher", "teacher_roles": ["aide"]},
    )
    held = await sync(narrowed, store, small_roster())
    assert held.status == "held"
    stored = _stored(store, held.id)
    assert stored is not None
    doc = stored.as_json(members=True)
    assert {g["source"] for g in doc["groups"]} == {"mem", "other"}
    before = {s: picture(store, s) for s in both}
    engine = SyncEngine(narrowed, store, connectors={"mem": MemoryConnector(small_roster())})
    await engine.approve(held.id)
    await engine.drain()
    for src in both:
        mine = {**doc, "groups": [g for g in doc["groups"] if g["source"] == src]}
        got = plain(mine)
        want = difference(before[src], picture(store, src), src)
        assert got.groups == want.groups, src


async def test_a_held_runs_change_set_counts_the_resyncs_an_earlier_run_left_waiting(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Ada was archived by a run whose drain was cut short: her resync (removing Algebra, and
    leaving Computing to Alan) still waits. Alan then leaves, and that run is held. Approving
    it drains both resyncs, so its change set shows both groups removed (it showed Computing
    losing Alan alone, and no Algebra), with a note saying why, and equals what approval and
    the drain then do."""
    await sync(make_settings(), store, small_roster())
    roster = small_roster()
    roster.persons = [p for p in roster.persons if p.sourced_id != "t-1"]
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-1"]
    assert (await sync(make_settings(), store, roster, drain=False)).status == "succeeded"
    roster.persons = [p for p in roster.persons if p.sourced_id != "t-2"]
    roster.enrollments = [e for e in roster.enrollments if e.user_id != "t-2"]
    strict = make_settings(safety={"max_removals": 0})
    held = await sync(strict, store, roster, drain=False)
    assert held.status == "held"
    stored = _stored(store, held.id)
    assert stored is not None
    doc = stored.as_json(members=True)
    assert {g["class_sourced_id"]: g["action"] for g in doc["groups"]} == {
        "c-1": "remove",
        "c-2": "remove",
    }
    assert any("queued by an earlier run" in note for note in doc["notes"])
    before = picture(store, "mem")
    engine = SyncEngine(strict, store, connectors={"mem": MemoryConnector(roster)})
    await engine.approve(held.id)
    await engine.drain()
    assert plain(doc) == difference(before, picture(store, "mem"), "mem")


def _roles_narrowed(make_settings: Callable[..., Settings], **safety: int) -> Settings:
    """Both sources, teacher_roles edited to `aide`: none of small_roster's teachers is one."""
    return make_settings(
        memory_sources=("mem", "other"),
        safety={"max_removal_percent": 100, **safety},
        provisioning={"default_role": "Teacher", "teacher_roles": ["aide"]},
    )


async def test_a_runs_count_of_groups_removed_includes_those_of_other_sources(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """After a teacher_roles edit a run resyncs every user of its source, whose groups of
    other sources go too: a dry run's groups_removed counts them, as its change set lists
    them and as the real run then removes them (it counted its own source's alone)."""
    settings = make_settings(memory_sources=("mem", "other"))
    await sync(settings, store, small_roster())
    await sync(settings, store, small_roster(), source="other")
    narrowed = _roles_narrowed(make_settings, max_removals=100)
    dry = await sync(narrowed, store, small_roster(), dry_run=True, changes=True)
    stored = _stored(store, dry.id)
    assert stored is not None
    listed = {
        (g["source"], g["class_sourced_id"]) for g in stored.groups if g["action"] == "remove"
    }
    assert listed == {("mem", "c-1"), ("mem", "c-2"), ("other", "c-1"), ("other", "c-2")}
    assert dry.counts["groups_removed"] == len(listed)
    real = await sync(narrowed, store, small_roster())
    assert real.status == "succeeded"
    assert real.counts["groups_removed"] == len(listed)
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM groups")).scalar_one() == 0


async def test_a_run_is_held_for_the_groups_of_other_sources_it_would_remove(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The safety limits count them: two groups of its own and two of the other source are
    over `max_removals: 3`, and the run is held with nothing removed (it removed all four)."""
    settings = make_settings(memory_sources=("mem", "other"))
    await sync(settings, store, small_roster())
    await sync(settings, store, small_roster(), source="other")
    held = await sync(_roles_narrowed(make_settings, max_removals=3), store, small_roster())
    assert held.status == "held"
    assert held.counts["groups_removed"] == 4
    assert "4 removals" in (held.hold_reason or "")
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM groups")).scalar_one() == 4


async def test_a_group_of_another_source_that_its_own_teacher_keeps_is_not_counted(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A group of the other source co-taught by a teacher linked to that source alone: the
    run's resyncs release the teachers of its source, the other keeps the group (nobody
    resyncs her in this run), so it is neither removed nor counted."""
    settings = make_settings(memory_sources=("mem", "other"))
    await sync(settings, store, small_roster())
    other = small_roster()
    other.persons.append(
        RosterPerson("t-9", "teacher", "Mary", "Somerville", "mary@example.org", "mary")
    )
    other.enrollments.append(RosterEnrollment("e-t9c1", "c-1", "t-9", "teacher"))
    await sync(settings, store, other, source="other")
    narrowed = _roles_narrowed(make_settings, max_removals=100)
    dry = await sync(narrowed, store, small_roster(), dry_run=True)
    assert dry.counts["groups_removed"] == 3  # mem's c-1 and c-2, other's c-2
    real = await sync(narrowed, store, small_roster())
    assert real.counts["groups_removed"] == 3
    with store.read() as conn:
        left = conn.execute(
            text(
                "SELECT g.source, g.external_id, u.email FROM groups g JOIN group_owner o "
                'ON o.group_id = g.id JOIN "user" u ON u.id = o.user_id'
            )
        ).all()
    assert [tuple(r) for r in left] == [("other", "c-1", "mary@example.org")]
