"""Hand-picked step sequences through the model: the rule paths random steps reach only
rarely (restorations, links to an existing account, shared accounts, rejected classes,
approvals in order), run on every CI run with the engine compared to the oracle after each
operation, exactly as in the random test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rostersync.source.records import RosterClass, RosterOrg, RosterPerson
from rostersync.store.db import Store
from rostersync.sync import changes as changeset
from tests.model.feed import Feed
from tests.model.harness import Harness, Refs
from tests.model.machine import STATS, Cut, RosterModel
from tests.model.oracle import Config

Model = Callable[..., RosterModel]


def school(teachers: dict[str, str], classes: dict[str, str]) -> Feed:
    """Teachers (id -> email), classes (id -> teacher id), one student in each class."""
    feed = Feed()
    feed.put("org", RosterOrg("sch-1", "Lincoln High"))
    for pid, email in teachers.items():
        feed.put("person", RosterPerson(pid, "teacher", "Teach", pid.upper(), email))
    for n, (cid, pid) in enumerate(classes.items(), start=1):
        feed.put("person", RosterPerson(f"s{n}", "student", "Stu", str(n), f"s{n}@example.org"))
        feed.put("class", RosterClass(cid, f"Class {cid}", school_id="sch-1"))
        feed.new_enrollment(cid, pid, "teacher")
        feed.new_enrollment(cid, f"s{n}", "student")
    return feed


@pytest.fixture
def model(store: Store, tmp_path: Path) -> Iterator[Model]:
    """A model over a fresh store, started (first full sync) on the given feed and config."""
    harness = Harness(store, tmp_path)

    def make(feed: Feed, config: Config | None = None, fingerprints: bool = False) -> RosterModel:
        machine = RosterModel(harness)
        machine.start(feed, config or Config(), fingerprints)
        return machine

    yield make


def user(m: RosterModel, email: str) -> tuple[str, set[str]]:
    """A user's status and persons, as the oracle has them (the engine was compared to it)."""
    d = m.oracle.directory
    return d.users[email].status, {pid for (_s, pid), e in d.identities.items() if e == email}


def test_an_archived_teacher_who_comes_back_is_restored(model: Model) -> None:
    """Archived by a sync when no longer a candidate, restored when a candidate again."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1"}))
    m.feed.change("person", "t1", enabled=False)
    m.sync("delta")
    assert user(m, "t1@example.org")[0] == "archived"
    m.feed.change("person", "t1", enabled=True)
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "active"


def test_a_new_person_with_an_archived_users_email_is_linked_then_restored(
    model: Model,
) -> None:
    """A teacher who comes back under a new sourcedId finds their archived account by email."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1"}))
    m.feed.drop("person", "t1")
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "archived"
    m.feed.put("person", RosterPerson("t9", "teacher", "Teach", "T1", "T1@Example.org"))
    m.feed.new_enrollment("c1", "t9", "teacher")
    m.sync("full")
    assert user(m, "t1@example.org")[1] == {"t1", "t9"}
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "active"


def test_two_persons_sharing_an_email_share_one_account(model: Model) -> None:
    """One account for both (one name: a teacher with a record per school); it stays while
    either still teaches, and comes back once."""
    feed = school({"t1": "t1@example.org", "t2": " T1@example.ORG"}, {"c1": "t1", "c2": "t2"})
    feed.change("person", "t2", family_name="t1")  # "Teach T1" and "Teach t1": one name
    m = model(feed)
    assert user(m, "t1@example.org") == ("active", {"t1", "t2"})
    m.feed.change("class", "c2", status="tobedeleted")
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "active"
    m.feed.change("class", "c1", status="tobedeleted")
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "archived"
    m.feed.change("class", "c1", status="active")
    m.feed.change("class", "c2", status="active")
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "active"


def test_persons_of_other_names_sharing_an_email_never_share_an_account(model: Model) -> None:
    """A placeholder address on two teachers of other names: neither gets an account (the
    machine compares the rejections); Ada renamed to Bob's name is the same teacher, and a
    delta run gives them one account; renamed again, the account stays with the person it
    was given to first and the other is rejected."""
    feed = school(
        {"t1": "noemail@example.org", "t2": "noemail@example.org"}, {"c1": "t1", "c2": "t2"}
    )
    m = model(feed)
    assert "noemail@example.org" not in m.oracle.directory.users
    m.feed.change("person", "t2", family_name="T1")
    m.sync("delta")
    assert user(m, "noemail@example.org") == ("active", {"t1", "t2"})
    m.feed.change("person", "t2", family_name="Other")
    m.sync("delta")
    assert user(m, "noemail@example.org") == ("active", {"t1", "t2"})  # both linked: kept
    m.feed.put("person", RosterPerson("t3", "teacher", "Eve", "Else", "NoEmail@example.org"))
    m.feed.new_enrollment("c2", "t3", "teacher")
    m.sync("delta")
    assert user(m, "noemail@example.org") == ("active", {"t1", "t2"})
    m.sync("full")
    assert user(m, "noemail@example.org") == ("active", {"t1", "t2"})


@pytest.mark.parametrize("same_name", [True, False])
def test_the_share_email_step_shares_an_account_only_with_the_name(
    model: Model, same_name: bool
) -> None:
    """The machine's step itself: a new teacher t3 takes t1's address, with t1's name (one
    account for both, linked by a delta run) or without it (t3 rejected, t1 keeps the
    account). A linked teacher who takes another's address keeps their own account."""
    feed = school({"t1": "t1@example.org", "t2": "t2@example.org"}, {"c1": "t1", "c2": "t2"})
    m = model(feed)
    m.feed.put("person", RosterPerson("t3", "teacher", "New", "Comer", "t3@example.org"))
    m.feed.new_enrollment("c2", "t3", "teacher")
    m._share_email(2, 0, True, same_name)  # t3 (third of t1, t2, t3) takes t1's
    m._share_email(1, 0, False, same_name)  # t2, already linked, too
    shared = STATS["emails shared"]
    m.sync("delta")
    persons = {"t1", "t3"} if same_name else {"t1"}
    assert user(m, "t1@example.org") == ("active", persons)
    assert user(m, "t2@example.org") == ("active", {"t2"})
    assert STATS["emails shared"] == shared + 1


def test_a_rejected_class_keeps_its_group(model: Model) -> None:
    """A class the connector rejects keeps its mirror rows, enrollments and people in a full
    run, so its group stays."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1"}))
    m.feed.reject("class", "c1")
    m.feed.reject("person", "s1")
    m.sync("full")
    assert ("mem", "c1") in m.oracle.groups()
    m.feed.unreject(("class", "c1"))
    m.sync("full")
    assert ("mem", "c1") in m.oracle.groups()


def test_only_the_latest_held_run_can_be_approved(model: Model) -> None:
    """Two held runs; approving the newer one overtakes the older, which is refused after."""
    m = model(
        school({"t1": "t1@example.org", "t2": "t2@example.org"}, {"c1": "t1", "c2": "t2"}),
        Config(max_removals=0),
    )
    m.disrupt_source("shrink")
    m.sync("full")
    m.disrupt_source("empty")
    m.sync("full")
    held = sorted(r.id for r in m.oracle.runs.values() if r.status == "held")
    assert len(held) == 2
    m._approve(held[1], None)
    m._approve(held[0], None)
    assert m.oracle.runs[held[0]].status == "held"
    assert user(m, "t1@example.org")[0] == "archived"


def test_license_seats_go_to_restorations_first(model: Model) -> None:
    """With one seat free, an archived teacher coming back takes it before a new teacher."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1"}), Config(license_limit=1))
    m.feed.change("person", "t1", status="tobedeleted")
    m.sync("full")
    m.feed.change("person", "t1", status="active")
    m.feed.put("person", RosterPerson("t0", "teacher", "New", "One", "t0@example.org"))
    m.feed.new_enrollment("c1", "t0", "teacher")
    m.sync("full")
    assert user(m, "t1@example.org")[0] == "active"
    assert "t0@example.org" not in m.oracle.directory.users


def test_a_held_runs_change_set_is_what_its_approval_does(model: Model) -> None:
    """A held run's change set matches the oracle's decision when it is held and, with
    nothing changed in between, what its approval then does to the directory."""
    m = model(
        school({"t1": "t1@example.org", "t2": "t2@example.org"}, {"c1": "t1", "c2": "t2"}),
        Config(max_removals=0),
    )
    m.feed.drop("person", "t2")
    m.feed.put("person", RosterPerson("t3", "teacher", "Teach", "T3", "t3@example.org"))
    m.feed.new_enrollment("c1", "t3", "teacher")
    m.feed.change("class", "c1", title="Class c1, renamed")
    checked = STATS["change sets checked against approval"]
    m.sync("full")
    held = [r.id for r in m.oracle.runs.values() if r.status == "held"]
    assert len(held) == 1
    m._approve(held[0], None)
    assert m.oracle.runs[held[0]].status == "succeeded"
    assert STATS["change sets checked against approval"] == checked + 1


def test_a_resync_job_held_at_three_deaths_fails_and_the_rest_are_done(model: Model) -> None:
    """Everyone's resync, its process killed three times: the oldest job, held each time,
    fails for good (the machine checks which, and its error); the others are done and the
    directory is what the rules say."""
    teachers = {f"t{n}": f"t{n}@example.org" for n in range(1, 4)}
    m = model(school(teachers, {f"c{n}": f"t{n}" for n in range(1, 4)}))
    before = m.h.last_job()
    m.killed_resync(3, 2)
    failed = m.h.failed_jobs(before)
    assert len(failed) == 1 and min(failed) == before + 1
    assert m.h.job_states(before) == {"failed": 1, "succeeded": 2, "interruptions": 3}


def member_names(m: RosterModel, class_id: str) -> dict[str, str]:
    """The members of a class's group in the engine's directory, by sourced id."""
    group = next(g for g in m.h.groups() if g["external_id"] == class_id)
    return {x["sourced_id"]: x["name"] for x in group["members"]}


def test_a_live_resync_sees_a_change_and_the_next_full_sync_makes_it_everyones(
    model: Model,
) -> None:
    """The source renames a student of two teachers and enrolls a new one with the first;
    a live resync of the first shows both in their group at once, while the second
    teacher's group keeps the old name (only the first teacher's groups are rebuilt). The
    next full sync brings every group to the source's view."""
    feed = school({"t1": "t1@example.org", "t2": "t2@example.org"}, {"c1": "t1", "c2": "t2"})
    feed.new_enrollment("c2", "s1", "student")
    m = model(feed)
    m.feed.change("person", "s1", given_name="Renamed")
    m.feed.put("person", RosterPerson("s9", "student", "New", "One", "s9@example.org"))
    m.feed.new_enrollment("c1", "s9", "student")
    m.live_resync([0], [], [], False)
    assert member_names(m, "c1") == {"s1": "Renamed 1", "s9": "New One"}
    assert member_names(m, "c2") == {"s1": "Stu 1", "s2": "Stu 2"}
    assert m.oracle.built is not None
    m.sync("delta")  # run full: a delta run does not promise to restore the source's view
    assert m.oracle.built is None
    assert member_names(m, "c2") == {"s1": "Renamed 1", "s2": "Stu 2"}


@pytest.mark.parametrize("fingerprints", [False, True], ids=["hash", "fingerprint"])
@pytest.mark.parametrize("change", ["enrollment_status", "drop"])
def test_a_full_sync_restores_the_enrollment_a_live_resync_dropped(
    model: Model, change: str, fingerprints: bool
) -> None:
    """The shape of the bug 4ccd670 fixed: the source drops a student's enrollment (or marks
    it tobedeleted), a live resync writes that into the mirror, and the source goes back to
    what the last sync saw. The next full sync must take the student back: the row the live
    resync marked tobedeleted kept the feed's fingerprint, so the full sync took it for
    unchanged and the student stayed out for good. The same with records known by their
    fingerprints: the live resync clears the row's."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1"}), None, fingerprints)
    # with fingerprints, the source sends the very records it sent before (bytes it knows)
    m.live_resync([0], [(change, 0, 0)], [], "exact" if fingerprints else True)
    assert member_names(m, "c2") == {"s2": "Stu 2"}
    assert "c1" not in {g["external_id"] for g in m.h.groups()}
    m.sync("full")
    assert member_names(m, "c1") == {"s1": "Stu 1"}


def owned(m: RosterModel) -> set[str]:
    """The classes whose group the engine's directory holds."""
    return {g["external_id"] for g in m.h.groups()}


@pytest.mark.parametrize("change", ["reject_own", "reject_class", "reject_student"])
def test_a_live_answer_takes_no_record_it_rejects_for_gone(model: Model, change: str) -> None:
    """The connector rejects, in t1's live answer, t1's teacher enrollment of c1, the class
    c1, or its student s1: the answer lacks the record, which is not taken for gone, so the
    group stays as it was; the next full sync (which keeps a rejected record's rows) too."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1"}))
    m.live_resync([0], [(change, 0, 0)], [], False)
    assert owned(m) == {"c1", "c2"} and member_names(m, "c1") == {"s1": "Stu 1"}
    m.sync("full")
    assert owned(m) == {"c1", "c2"}


@pytest.mark.parametrize("unnamed", [(), ("class",)])
def test_a_class_rejection_without_an_id_keeps_every_class(
    model: Model, unnamed: tuple[str, ...]
) -> None:
    """t1 stops teaching c2 while the connector rejects c1: a rejection naming c1 lets c2
    go; one that names no class could be c2's, and keeps it until the next full sync."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1"}))
    m.live_resync([0], [("reject_class", 0, 0)], [("unenroll", 2)], False, frozenset(unnamed))
    assert owned(m) == ({"c1", "c2"} if unnamed else {"c1"})
    m.sync("full")
    assert owned(m) == {"c1"}


def test_a_oneroster_shaped_answer_adds_live_rows_the_next_full_sync_replaces(
    model: Model,
) -> None:
    """A OneRoster-shaped live answer (made-up ``live:`` enrollment ids, active records only)
    enrolls a new student under a ``live:`` id; the class the source turned tobedeleted is
    missing from it, so its group goes. The next full sync deletes the ``live:`` row, and
    the source's own enrollment of the student takes its place."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1"}))
    m.live_resync([0], [("enroll", 0, 8), ("class_status", 1, 0)], [], False, frozenset(), True)
    assert "live:c1:s9:student" in m.h.mirror("enrollment")
    assert owned(m) == {"c1"} and set(member_names(m, "c1")) == {"s1", "s9"}
    m.sync("full")
    assert not [sid for sid in m.h.mirror("enrollment") if sid.startswith("live:")]
    assert set(member_names(m, "c1")) == {"s1", "s9"}


def last_status(m: RosterModel) -> str:
    return m.oracle.runs[max(m.oracle.runs)].status


@pytest.mark.parametrize(
    "cut", [Cut(0, 1, False), Cut(1, 1, True)], ids=["no batch", "one batch, then killed"]
)
@pytest.mark.parametrize("approved", [False, True], ids=["sync", "approval"])
def test_a_run_after_a_drain_cut_short_is_not_held_for_the_removals_before_it(
    model: Model, cut: Cut, approved: bool
) -> None:
    """The shape of the bug b9da827 fixed: a run archives t1 and t2 (within the limits, or
    held and approved), and its drain is cut short: none, or one, of their resync jobs runs,
    so their groups c1 and c2 are still there, to go with the jobs left in the queue. The
    next run, under a limit of no removal at all, removes nothing itself: it is not held,
    and its drain removes the groups. Reverting b9da827's subtraction (now ``_REMOVAL_DECIDED``)
    holds it (on both stores)."""
    teachers = {f"t{n}": f"t{n}@example.org" for n in range(1, 4)}
    config = Config(max_removals=0) if approved else Config()
    m = model(school(teachers, {f"c{n}": f"t{n}" for n in range(1, 4)}), config)
    m.feed.drop("person", "t1")
    m.feed.drop("person", "t2")
    if approved:
        m.sync("full")
        assert last_status(m) == "held"
        m._approve(max(m.oracle.runs), None, cut)
    else:
        m._sync("full", cut=cut)
        m.configure({"max_removals": 0, "max_removal_percent": 20.0, "min_source_ratio": 0.5})
    assert user(m, "t1@example.org")[0] == user(m, "t2@example.org")[0] == "archived"
    assert len(owned(m)) == (3 if cut.batches == 0 else 2)  # removals waiting in the queue
    spared = STATS["runs not held for removals decided earlier"]
    m.sync("full")
    assert last_status(m) == "succeeded"
    assert STATS["runs not held for removals decided earlier"] == spared + 1
    assert owned(m) == {"c3"}


@pytest.mark.parametrize("mode", ["full", "delta"])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry run"])
def test_under_keep_a_run_after_a_drain_cut_short_is_not_held_for_the_removals_before_it(
    model: Model, mode: str, dry: bool
) -> None:
    """Under ``on_teacher_removed: keep`` t1 and t2 leave and keep active accounts; the run's
    drain is cut short, so c1 and c2 wait for their removal. The next run (or dry run),
    full or delta, under a limit of no removal, removes nothing itself: it is not held
    (c19d957: the full run was held for c1 and c2; the model found a delta dry run that
    the oracle held and the engine did not), and the drain after it removes them."""
    teachers = {f"t{n}": f"t{n}@example.org" for n in range(1, 4)}
    m = model(
        school(teachers, {f"c{n}": f"t{n}" for n in range(1, 4)}),
        Config(on_teacher_removed="keep"),
    )
    m.feed.drop("person", "t1")
    m.feed.drop("person", "t2")
    m._sync("full", cut=Cut(0, 1, False))
    assert user(m, "t1@example.org")[0] == user(m, "t2@example.org")[0] == "active"
    assert owned(m) == {"c1", "c2", "c3"}  # removals waiting in the queue
    m.configure({"max_removals": 0, "max_removal_percent": 20.0, "min_source_ratio": 0.5})
    m._sync(mode, dry=dry)
    assert last_status(m) == "succeeded"
    assert owned(m) == {"c3"}  # the waiting jobs ran after it (a dry run's too)


@pytest.mark.parametrize(("refs", "kept"), [("user", False), ("neither", True)])
def test_another_students_rejected_enrollment_without_its_class_drops_what_went(
    model: Model, refs: Refs, kept: bool
) -> None:
    """The connector rejects s2's enrollment row of t2's c2, whose class is blank: it is in
    t1's live answer too (it may be one of t1's classes), naming s2. s1 leaves t1's c1:
    the row is not s1's, so s1 is dropped from c1 (one such row anywhere used to stop every
    live resync from dropping anyone, fca0b29). A row naming neither may be s1's and keeps
    them until the next full sync."""
    feed = school({"t1": "t1@example.org", "t2": "t2@example.org"}, {"c1": "t1", "c2": "t2"})
    # A second student, so that c1 keeps a group (one without members is removed).
    feed.put("person", RosterPerson("s3", "student", "Stu", "3", "s3@example.org"))
    feed.new_enrollment("c1", "s3", "student")
    m = model(feed)
    (eid,) = [sid for sid, e in m.feed.enrollments.items() if e.user_id == "s2"]
    m.feed.reject("enrollment", eid)
    named = STATS["live answers with named enrollment rejections"]
    m.live_resync([0], [("drop", 0, 0)], [], False, frozenset(), False, (refs,))
    assert STATS["live answers with named enrollment rejections"] == named + (not kept)
    assert set(member_names(m, "c1")) == ({"s1", "s3"} if kept else {"s3"})
    m.sync("full")
    assert set(member_names(m, "c1")) == {"s3"}


def owners_of(m: RosterModel, class_id: str) -> list[str]:
    """The owners of a class's group in the engine's directory."""
    return next(list(g["owners"]) for g in m.h.groups() if g["external_id"] == class_id)


def failed_for_good(model: Model, config: Config) -> RosterModel:
    """t1 and t2 leave and a run archives them, but the resync jobs that were to take their
    groups away fail for good: c1 and c2 stay, theirs. (t1 also co-teaches c3 with t3,
    whose job, queued by the change to c3's teachers, ran: it made c3 t3's alone.) t4
    teaches c4 and stays."""
    teachers = {f"t{n}": f"t{n}@example.org" for n in range(1, 5)}
    feed = school(teachers, {f"c{n}": f"t{n}" for n in range(1, 5)})
    feed.new_enrollment("c3", "t1", "teacher")
    m = model(feed, config)
    m.feed.change("person", "t1", status="tobedeleted")
    m.feed.change("person", "t2", status="tobedeleted")
    if config.max_removals < 2:
        m.sync("full")
        assert last_status(m) == "held"
        m._approve(max(m.oracle.runs), None, Cut(0, 1, False, fail=(0, 1)))
    else:
        m._sync("full", cut=Cut(0, 1, False, fail=(0, 1)))
    assert user(m, "t1@example.org")[0] == user(m, "t2@example.org")[0] == "archived"
    assert owned(m) == {"c1", "c2", "c3", "c4"}
    assert owners_of(m, "c3") == ["t3@example.org"]
    assert owners_of(m, "c1") == ["t1@example.org"]
    assert m.oracle.leftover("mem") == {"t1@example.org", "t2@example.org"}
    assert STATS["drains with jobs failed for good"] >= 1
    return m


@pytest.mark.parametrize("mode", ["full", "delta"])
@pytest.mark.parametrize("approved", [False, True], ids=["sync", "approval"])
def test_groups_whose_jobs_failed_for_good_go_with_the_next_run_not_held(
    model: Model, mode: str, approved: bool
) -> None:
    """The shape of the bug dcdf588 fixed: after the failed jobs, the next run (full or
    delta, with nothing changed) under a limit of no removal at all queues t1's and t2's
    resyncs again, says so in its report (the machine checks the warning) and is not held
    for c1 and c2: its drain removes them. The run after has
    nothing left to do. Reverting the engine part of dcdf588 holds the run (the machine's
    status check), or with the limits lifted leaves the groups (its group comparison)."""
    m = failed_for_good(model, Config(max_removals=0) if approved else Config())
    m.configure({"max_removals": 0, "max_removal_percent": 20.0, "min_source_ratio": 0.5})
    spared = STATS["runs not held for the groups of failed jobs"]
    m.sync(mode)
    assert last_status(m) == "succeeded"
    assert STATS["runs not held for the groups of failed jobs"] == spared + 1
    report = m.h.report(max(m.oracle.runs))
    assert report.counts["resync_queued"] >= 2, report.counts
    assert owned(m) == {"c3", "c4"} and owners_of(m, "c3") == ["t3@example.org"]
    assert m.oracle.built is None and not m.oracle.leftover("mem")
    m.sync(mode)
    assert m.h.report(max(m.oracle.runs)).warnings == []


def test_a_held_run_after_failed_jobs_lists_their_groups_removed(model: Model) -> None:
    """After the failed jobs, t4 leaves too, and a run under a limit of no removal is held
    for t4's archival (and c4) alone, not for c1 and c2. Its change set (compared with the
    oracle's by the machine) lists c1, c2 and c4 removed, since approving
    it queues t1's and t2's resyncs again; the approval does just that (the machine compares
    the change set with what it did)."""
    m = failed_for_good(model, Config())
    m.configure({"max_removals": 0, "max_removal_percent": 20.0, "min_source_ratio": 0.5})
    m.feed.change("person", "t4", status="tobedeleted")
    m.sync("full")
    held = max(m.oracle.runs)
    assert last_status(m) == "held"
    report = m.h.report(held)
    assert report.counts["groups_removed"] == 1, report.counts  # c4: not c1 nor c2
    with m.h.store.read() as conn:
        stored = changeset.load(conn, held)
    assert stored is not None
    groups = {g["class_sourced_id"]: g for g in stored.as_json()["groups"]}
    assert {k for k, g in groups.items() if g["action"] == "remove"} == {"c1", "c2", "c4"}
    checked = STATS["change sets checked against approval"]
    m._approve(held, None)
    assert STATS["change sets checked against approval"] == checked + 1
    assert owned(m) == {"c3"} and owners_of(m, "c3") == ["t3@example.org"]


@pytest.mark.parametrize("mode", ["full", "delta"])
def test_an_import_owner_keeps_the_group_its_last_teacher_leaves_and_no_hold(
    model: Model, mode: str
) -> None:
    """The shape of the bug fd97904 fixed: an admin makes admin@example.org an owner of
    c1's group by import (its ``Groups`` column). t1, c1's only teacher, stops teaching it
    (the enrollment turns tobedeleted; t1 keeps c2, so no one is archived). Under a limit of
    no removal at all the run is not held: the import owner keeps the group, which is no
    removal (the held run's report said 1 group removed before the fix). The group stays,
    the import owner its only owner, its student still a member; a resync of everyone does
    not take it away either. Then the class is renamed and loses its student: the group
    follows it (ab6918b)."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1"}))
    statuses = m._import(
        ["Email", "Display Name", "Groups"],
        [("admin@example.org", "Ada Admin", "Class c1"), ("t1@example.org", "", "Class c2")],
    )
    assert statuses == ["Success", "Already Exists"]  # t1 owns c2's group already
    assert owners_of(m, "c1") == ["admin@example.org", "t1@example.org"]
    m.configure({"max_removals": 0, "max_removal_percent": 20.0, "min_source_ratio": 0.5})
    (eid,) = [
        sid
        for sid, e in m.feed.enrollments.items()
        if (e.class_id, e.user_id, e.role) == ("c1", "t1", "teacher")
    ]
    m.feed.change("enrollment", eid, status="tobedeleted")
    spared = STATS["runs not held for groups import owners keep"]
    m.sync(mode)
    assert last_status(m) == "succeeded"
    assert STATS["runs not held for groups import owners keep"] == spared + 1
    assert m.h.report(max(m.oracle.runs)).counts["groups_removed"] == 0
    assert owned(m) == {"c1", "c2"}
    assert owners_of(m, "c1") == ["admin@example.org"]
    assert member_names(m, "c1") == {"s1": "Stu 1"}
    m.manual_resync(True, 0)
    assert owners_of(m, "c1") == ["admin@example.org"]
    # The group goes on following its class (ab6918b): renamed, and without the student
    # the class no longer has.
    m.feed.change("class", "c1", title="Class c1, renamed")
    (sid,) = [sid for sid, e in m.feed.enrollments.items() if e.user_id == "s1"]
    m.feed.change("enrollment", sid, status="tobedeleted")
    m.sync(mode)
    assert last_status(m) == "succeeded"
    group = next(g for g in m.h.groups() if g["external_id"] == "c1")
    assert (group["name"], group["owners"], group["members"]) == (
        "Class c1, renamed",
        ["admin@example.org"],
        [],
    )


def group_name(m: RosterModel, class_id: str) -> str:
    """The name of a class's group in the engine's directory."""
    return next(str(g["name"]) for g in m.h.groups() if g["external_id"] == class_id)


def test_a_group_import_owners_alone_keep_follows_a_live_answer_of_its_class(
    model: Model,
) -> None:
    """The shape the long profile found (seed 56053185725668214256428269704340345785): c1's
    group is admin@example.org's alone (by import; t1's teacher enrollment of c1 turned
    tobedeleted). The source renames c1 and a live resync of t1 writes that into the mirror
    (the class is in t1's answer by that enrollment): the group follows its class at once
    (docs/import.md, "Owners added by import"). Then c1 leaves the source: the group keeps
    the name it had. The engine kept the old name at the live resync, and the oracle gave
    the group the mirror's last title once the class was gone."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1"}))
    assert m._import(
        ["Email", "Display Name", "Groups"], [("admin@example.org", "", "Class c1")]
    ) == ["Success"]
    (eid,) = [
        sid
        for sid, e in m.feed.enrollments.items()
        if (e.class_id, e.user_id, e.role) == ("c1", "t1", "teacher")
    ]
    m.feed.change("enrollment", eid, status="tobedeleted")
    m.sync("full")
    assert owners_of(m, "c1") == ["admin@example.org"]
    m.live_resync([0], [("class_title", 0, 4)], [], False)  # c1 becomes "Study Hall"
    assert group_name(m, "c1") == "Study Hall"
    m.configure({"min_source_ratio": 0})
    m.feed.drop("class", "c1")
    m.sync("full")
    assert last_status(m) == "succeeded"
    assert group_name(m, "c1") == "Study Hall"


def test_a_group_left_behind_by_a_live_resync_keeps_its_name_when_its_class_goes(
    model: Model,
) -> None:
    """c1's group is t1's and admin@example.org's (by import). The source renames c1 and a
    live resync of t2 (c1 is in t2's answer by a tobedeleted teacher enrollment) writes that
    into the mirror; t1's group is not rebuilt, so it keeps its name (docs/sources.md: only
    the resynced teachers' groups are). Then c1 leaves the source with its enrollments: t1
    lets go of the group, which admin@example.org keeps under the name it had, not the
    title the mirror had last (the oracle gave it that title)."""
    m = model(school({"t1": "t1@example.org", "t2": "t2@example.org"}, {"c1": "t1", "c2": "t2"}))
    assert m._import(
        ["Email", "Display Name", "Groups"], [("admin@example.org", "", "Class c1")]
    ) == ["Success"]
    m.feed.new_enrollment("c1", "t2", "teacher")
    (eid,) = [
        sid for sid, e in m.feed.enrollments.items() if (e.class_id, e.user_id) == ("c1", "t2")
    ]
    m.feed.change("enrollment", eid, status="tobedeleted")
    m.feed.change("class", "c1", title="Study Hall")
    m.live_resync([1], [], [], False)
    assert group_name(m, "c1") == "Class c1"
    m.configure({"min_source_ratio": 0})
    m.feed.drop("class", "c1")
    for sid in [sid for sid, e in m.feed.enrollments.items() if e.class_id == "c1"]:
        m.feed.drop("enrollment", sid)
    m.sync("full")
    assert last_status(m) == "succeeded"
    assert (group_name(m, "c1"), owners_of(m, "c1")) == ("Class c1", ["admin@example.org"])


def test_an_import_names_groups_exactly_and_fails_a_name_several_groups_match(
    model: Model,
) -> None:
    """Group names match exactly: c1 and c2 are both "Class c1", c3 is "class C1". A row
    naming "Class c1" fails (several groups); "class C1" is c3's alone; "CLASS C1" matches
    none exactly and two loosely, and fails too; "Class c9" is no group's. The machine
    compares each row's status with the oracle's."""
    m = model(school({"t1": "t1@example.org"}, {"c1": "t1", "c2": "t1", "c3": "t1"}))
    m.feed.change("class", "c2", title="Class c1")
    m.feed.change("class", "c3", title="class C1")
    m.sync("full")
    statuses = m._import(
        ["Email", "Display Name", "Groups"],
        [
            ("a1@example.org", "", "Class c1"),
            ("a2@example.org", "", "class C1"),
            ("a3@example.org", "", "CLASS C1"),
            ("a4@example.org", "", "class C1; Class c9"),
        ],
    )
    assert statuses == ["Failed", "Success", "Failed", "Group not found"]
    assert owners_of(m, "c3") == ["a2@example.org", "t1@example.org"]
