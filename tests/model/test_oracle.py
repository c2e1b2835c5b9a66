"""The oracle on its own: its email rules agree with rostersync.emails (compared by outputs,
not shared code), and its decisions on hand-worked cases are the README's."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rostersync import emails
from rostersync.source.records import (
    Rejected,
    RosterClass,
    RosterEnrollment,
    RosterOrg,
    RosterPerson,
    TeacherRoster,
)
from tests.model.feed import EMAIL_KINDS, TEACHERS, Feed, teacher_email
from tests.model.oracle import (
    SOURCE,
    Config,
    Mirror,
    Oracle,
    email_problem,
    live_apply,
    norm_email,
    safety_reasons,
)


def test_the_oracle_normalizes_and_validates_the_feeds_emails_as_the_engine_does() -> None:
    """Every email form the steps draw: the same normalized value and the same verdict."""
    for pid in TEACHERS:
        for kind in EMAIL_KINDS:
            raw = teacher_email(pid, kind)
            assert norm_email(raw) == emails.normalize_email(raw), (kind, raw)
            value = norm_email(raw)
            assert (email_problem(value) is None) == (emails.email_problem(value) is None), raw


@settings(max_examples=300, derandomize=True, database=None)
@given(
    st.text(
        alphabet=st.sampled_from("aK\u212a\uff4b.@-_ +\u200b\u0430Z9\t\ufeffé"), max_size=30
    ).map(lambda t: t.replace("@@", "@"))
)
def test_the_oracle_agrees_with_the_email_module_on_any_text(text: str) -> None:
    """Look-alikes, spaces, zero-width characters, odd punctuation: the same verdicts."""
    assert norm_email(text) == emails.normalize_email(text)
    value = norm_email(text)
    assert (email_problem(value) is None) == (emails.email_problem(value) is None)


def test_email_domains_match_exactly_and_ignore_case() -> None:
    assert email_problem("a@springfield.example.org", ["Springfield.Example.ORG"]) is None
    assert email_problem("a@hs.springfield.example.org", ["springfield.example.org"])
    assert email_problem("a@other.example.net", ["springfield.example.org"])


def _feed(emails_by_teacher: dict[str, str | None], *, role: str = "teacher") -> Feed:
    feed = Feed()
    feed.put("org", RosterOrg("sch-1", "Lincoln High"))
    feed.put("person", RosterPerson("s1", "student", "Stu", "One", "s1@example.org"))
    for n, (pid, email) in enumerate(emails_by_teacher.items()):
        feed.put("person", RosterPerson(pid, role, "Ada", pid, email, org_ids=("sch-1",)))
        feed.put("class", RosterClass(f"c{n}", f"Class {n}"))
        feed.new_enrollment(f"c{n}", pid, "teacher")
        feed.new_enrollment(f"c{n}", "s1", "student")
    return feed


def test_teachers_of_one_name_sharing_an_email_get_one_account_and_a_warning() -> None:
    oracle = Oracle(Config())
    feed = _feed({"t1": "t1@example.org", "t2": "T1@Example.org "})
    feed.change("person", "t2", family_name="T1")  # "Ada t1" and "Ada T1": one name
    d = oracle.decide(SOURCE, "full", feed.records())
    assert d.counts["users_created"] == 1
    assert d.shared_emails == {"t1@example.org": ["t1", "t2"]}
    assert d.directory.persons_of("t1@example.org") == {(SOURCE, "t1"), (SOURCE, "t2")}


def test_teachers_of_other_names_sharing_an_email_are_rejected_not_merged() -> None:
    """Arriving together, both are rejected; one already linked keeps the account, and the
    newcomer under another name is rejected."""
    oracle = Oracle(Config())
    d = oracle.decide(
        SOURCE, "full", _feed({"t1": "noemail@example.org", "t2": "noemail@example.org"}).records()
    )
    assert d.counts["users_created"] == 0
    assert {sid: p for sid, (_, _, p) in d.email_rejects.items()} == {
        "t1": "email shared under another name",
        "t2": "email shared under another name",
    }
    oracle = Oracle(Config())
    oracle.commit(SOURCE, oracle.decide(SOURCE, "full", _feed({"t1": "t1@example.org"}).records()))
    d = oracle.decide(
        SOURCE, "full", _feed({"t1": "t1@example.org", "t2": "\uff541@example.org"}).records()
    )
    assert set(d.email_rejects) == {"t2"}
    assert d.directory.persons_of("t1@example.org") == {(SOURCE, "t1")}


def test_placeholder_emails_are_rejected_and_never_merged() -> None:
    oracle = Oracle(Config())
    d = oracle.decide(SOURCE, "full", _feed({"t1": "N/A", "t2": "n/a"}).records())
    assert d.counts["users_created"] == 0
    assert set(d.email_rejects) == {"t1", "t2"}
    assert d.status == "succeeded_with_errors"


def test_an_administrator_teaches_only_when_teacher_roles_say_so() -> None:
    feed = _feed({"t1": "t1@example.org"}, role="administrator")
    assert Oracle(Config()).decide(SOURCE, "full", feed.records()).counts["users_created"] == 0
    widened = Oracle(Config(teacher_roles=("teacher", "administrator")))
    assert widened.decide(SOURCE, "full", feed.records()).counts["users_created"] == 1


def test_license_seats_and_holds_are_counted_at_the_start_of_the_run() -> None:
    oracle = Oracle(Config(license_limit=1))
    feed = _feed({"t1": "t1@example.org", "t2": "t2@example.org"})
    d = oracle.decide(SOURCE, "full", feed.records())
    assert (d.counts["users_created"], d.counts["users_skipped_license"]) == (1, 1)
    assert "t1@example.org" in d.directory.users


def _reasons(**given: Any) -> list[str]:
    counts: dict[str, Any] = {
        "archived": 0,
        "removed": 0,
        "managed_users": 100,
        "managed_groups": 100,
        "emails_lost": 0,
        "emails_before": 0,
        "fetched": None,
        "last": None,
    }
    config = Config(max_removals=10, max_removal_percent=20, min_source_ratio=0.5)
    return safety_reasons(config, **{**counts, **given})


def test_safety_reasons() -> None:
    """max_removals; the percentage once a run removes 10; lost emails; a shrunken pull."""
    assert _reasons(archived=6, removed=5) == ["max_removals"]
    assert _reasons(archived=1, removed=2, managed_users=2, managed_groups=2) == []
    assert _reasons(archived=5, removed=5, managed_users=10) == ["max_removal_percent users"]
    assert _reasons(emails_lost=10, emails_before=40) == ["emails lost"]
    assert _reasons(emails_lost=9, emails_before=9) == []
    shrunk = _reasons(
        fetched={"persons": 4, "classes": 0, "enrollments": 10},
        last={"persons": 10, "classes": 2, "enrollments": 10},
    )
    assert shrunk == ["min_source_ratio persons", "min_source_ratio classes"]


def test_a_rejected_class_keeps_its_rows_in_a_full_run() -> None:
    oracle = Oracle(Config())
    feed = _feed({"t1": "t1@example.org"})
    oracle.commit(SOURCE, oracle.decide(SOURCE, "full", feed.records()))
    feed.reject("class", "c0")
    feed.drop("enrollment", "e1")
    d = oracle.decide(SOURCE, "full", feed.records())
    assert "c0" in d.mirror.klass and "e1" in d.mirror.enrollment
    assert d.counts["records_rejected"] == 1


def test_a_live_answer_goes_into_the_mirror_by_class_person_and_role() -> None:
    """Matched on (class, person, role): a key the answer has is active (a tobedeleted
    enrollment of the answer is one it has not); a student or the teacher's own row it has
    not is tobedeleted, a co-teacher's stays; a new key is added with the answer's id."""
    mirror = Mirror(
        klass={"c1": RosterClass("c1", "Art"), "c2": RosterClass("c2", "Music")},
        enrollment={
            "e1": RosterEnrollment("e1", "c1", "t1", "teacher"),
            "e2": RosterEnrollment("e2", "c1", "t2", "teacher"),
            "e3": RosterEnrollment("e3", "c1", "s1", "student", status="tobedeleted"),
            "e4": RosterEnrollment("e4", "c1", "s2", "student"),
            "e5": RosterEnrollment("e5", "c2", "t1", "teacher"),
        },
    )
    answer = TeacherRoster(
        teacher=None,
        classes=[RosterClass("c1", "Art")],
        enrollments=[
            RosterEnrollment("x1", "c1", "t1", "teacher"),
            RosterEnrollment("x3", "c1", "s1", "student"),
            RosterEnrollment("x4", "c1", "s2", "student", status="tobedeleted"),
            RosterEnrollment("x5", "c1", "s3", "student"),
        ],
    )
    out = live_apply(mirror, "t1", answer)
    status = {sid: e.status for sid, e in out.enrollment.items()}
    assert status == {
        "e1": "active",
        "e2": "active",
        "e3": "active",
        "e4": "tobedeleted",
        "e5": "tobedeleted",
        "x5": "active",
    }


def _rejecting_answer(*rejected: Rejected) -> TeacherRoster:
    """t1's answer for the mirror of the test below, without class c2 (which the mirror says
    t1 teaches) and without student s2: each is gone unless a rejection says otherwise."""
    return TeacherRoster(
        teacher=None,
        classes=[RosterClass("c1", "Art")],
        enrollments=[
            RosterEnrollment("x1", "c1", "t1", "teacher"),
            RosterEnrollment("x3", "c1", "s1", "student"),
        ],
        rejected=list(rejected),
    )


#: The mirror the answer above is written into: t1 teaches c1 (s1, s2) and c2.
REJECTING_MIRROR = Mirror(
    klass={"c1": RosterClass("c1", "Art"), "c2": RosterClass("c2", "Music")},
    enrollment={
        "e1": RosterEnrollment("e1", "c1", "t1", "teacher"),
        "e2": RosterEnrollment("e2", "c1", "s1", "student"),
        "e3": RosterEnrollment("e3", "c1", "s2", "student"),
        "e4": RosterEnrollment("e4", "c2", "t1", "teacher"),
    },
)


def test_a_live_answer_takes_no_rejected_record_for_gone() -> None:
    """A class or person the answer rejects (by id) keeps its rows; a rejection naming no id
    keeps every record of its kind; a rejected enrollment naming neither its class nor its
    person keeps every enrollment, the teacher's classes included. Other records missing
    from the answer go."""
    mirror = REJECTING_MIRROR
    cases = {
        (): {"e3", "e4"},
        (Rejected("class", "c2", "no title"),): {"e3"},
        (Rejected("class", "c9", "no title"),): {"e3", "e4"},
        (Rejected("class", None, "not an object"),): {"e3"},
        (Rejected("user", "s2", "no role"),): {"e4"},
        (Rejected("user", "s9", "no role"),): {"e3", "e4"},
        (Rejected("user", None, "not an object"),): {"e4"},
        (Rejected("enrollment", "x9", "bad status"),): set(),
        (Rejected("org", "sch-1", "no name"),): {"e3", "e4"},
    }
    for rejected, gone in cases.items():
        out = live_apply(mirror, "t1", _rejecting_answer(*rejected))
        dropped = {sid for sid, e in out.enrollment.items() if e.status == "tobedeleted"}
        assert dropped == gone, rejected


def _enrollment(class_id: str | None, user_id: str | None) -> Rejected:
    """A rejected enrollment row naming this class and this person (None: left blank)."""
    return Rejected("enrollment", "x9", "bad role", class_id=class_id, user_id=user_id)


def test_a_rejected_enrollment_keeps_only_the_rows_it_may_be() -> None:
    """A rejected enrollment that names its class, its person or both may be any row of
    what it names: that row is kept (s2's in c1 is e3; t1's of c2 keeps the class, e4).
    Every other row the answer lacks goes; several rejections keep each what it may be."""
    cases = {
        (_enrollment(None, "s2"),): {"e4"},
        (_enrollment("c1", None),): {"e4"},
        (_enrollment("c1", "s2"),): {"e4"},
        (_enrollment("c2", None),): {"e3"},
        (_enrollment(None, "t1"),): {"e3"},
        (_enrollment("c2", "t1"),): {"e3"},
        # Rows it cannot be: another student's, t1's of c1 (which the answer has), s2 in c2.
        (_enrollment(None, "s9"),): {"e3", "e4"},
        (_enrollment("c1", "t1"),): {"e3", "e4"},
        (_enrollment("c2", "s2"),): {"e3", "e4"},
        (_enrollment("c9", None),): {"e3", "e4"},
        (_enrollment(None, "s2"), _enrollment("c2", None)): set(),
        (_enrollment(None, "s9"), _enrollment(None, None)): set(),
    }
    for rejected, gone in cases.items():
        out = live_apply(REJECTING_MIRROR, "t1", _rejecting_answer(*rejected))
        dropped = {sid for sid, e in out.enrollment.items() if e.status == "tobedeleted"}
        assert dropped == gone, rejected


def test_removals_an_earlier_run_decided_do_not_count_against_the_limits() -> None:
    """t1 leaves; the run archives them, and its drain is cut: c0's group stays, with t1's
    job queued. The next run removes nothing itself, and is not held under max_removals 0;
    once the job ran (the queue drained), a removal of its own is counted again."""
    oracle = Oracle(Config())
    feed = _feed({"t1": "t1@example.org", "t2": "t2@example.org"})
    oracle.commit(SOURCE, oracle.decide(SOURCE, "full", feed.records()))
    feed.change("person", "t1", status="tobedeleted")
    first = oracle.decide(SOURCE, "full", feed.records())
    assert first.counts["users_archived"] == 1 and not first.held
    oracle.commit(SOURCE, first, cut=True)
    assert oracle.queued == {"t1@example.org"}
    assert (SOURCE, "c0") in oracle.groups()
    oracle.config = Config(max_removals=0)
    d = oracle.decide(SOURCE, "full", feed.records())
    assert (d.held, d.counts["groups_removed"], d.decided_earlier, d.spared) == (False, 0, 1, True)
    oracle.batch_done({"t1@example.org"})
    assert (SOURCE, "c0") not in oracle.groups()
    oracle.drained()
    feed.change("person", "t2", status="tobedeleted")
    assert oracle.decide(SOURCE, "full", feed.records()).held


def test_a_group_an_import_owner_keeps_is_no_removal_and_follows_its_class() -> None:
    """An import makes a1 an owner of c0's group. t1 stops teaching c0: under max_removals
    0 the run is not held for it (no removal), and the group stays, a1 its owner; when its
    class loses its student the group keeps no member, and when the class leaves the source
    it keeps its last title."""
    oracle = Oracle(Config())
    feed = _feed({"t1": "t1@example.org", "t2": "t2@example.org"})
    oracle.commit(SOURCE, oracle.decide(SOURCE, "full", feed.records()))
    statuses = oracle.import_rows(
        [
            ("a1@example.org", "", "Class 0"),
            ("t1@example.org", "", "Class 0"),  # owns it already, as its teacher
            ("t2@example.org", "", "class 1"),  # a near miss
            ("a2@example.org", "", "Class 0; Quantum Physics"),
            ("a3@example.org", "", "none"),
        ]
    )
    assert statuses == [
        "Success",
        "Already Exists",
        "Group not found",
        "Group not found",
        "Success",
    ]
    assert oracle.groups()[(SOURCE, "c0")].owners == ("a1@example.org", "t1@example.org")
    oracle.config = Config(max_removals=0)
    (eid,) = [sid for sid, e in feed.enrollments.items() if (e.class_id, e.user_id) == ("c0", "t1")]
    feed.change("enrollment", eid, status="tobedeleted")
    feed.new_enrollment("c1", "t1", "teacher")  # t1 stays a teacher: no archival
    d = oracle.decide(SOURCE, "full", feed.records())
    assert (d.held, d.counts["groups_removed"], d.kept_by_import, d.import_spared) == (
        False,
        0,
        1,
        True,
    )
    oracle.commit(SOURCE, d)
    oracle.config = Config()
    group = oracle.groups()[(SOURCE, "c0")]
    assert (group.owners, group.imports) == (("a1@example.org",), ("a1@example.org",))
    assert [m.sourced_id for m in group.members] == ["s1"]
    feed.change("person", "s1", status="tobedeleted")
    oracle.commit(SOURCE, oracle.decide(SOURCE, "full", feed.records()))
    assert oracle.groups()[(SOURCE, "c0")].members == ()
    feed.drop("class", "c0")
    oracle.commit(SOURCE, oracle.decide(SOURCE, "full", feed.records()))
    assert oracle.groups()[(SOURCE, "c0")].name == "Class 0"
    assert set(oracle.groups()) == {(SOURCE, "c0")}  # c1 lost its student too
