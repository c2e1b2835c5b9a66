"""The pure provisioning and safety rules of a sync run, tested on plain values (no database)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rostersync.config.models import Provisioning, Safety
from rostersync.emails import MAX_EMAIL
from rostersync.sync.rules import (
    EMAIL_REJECTIONS,
    NO_EMAIL,
    ExistingUser,
    Link,
    LinkedUser,
    NewUser,
    SafetyVerdict,
    Teacher,
    check_safety,
    chunks,
    email_rejection,
    plan_provisioning,
    sites_for,
)

SOURCE = "district"


def _prov(**kw: Any) -> Provisioning:
    return Provisioning(default_role="Teacher", **kw)


def _teacher(sid: str, email: str | None = None, **kw: Any) -> Teacher:
    values: dict[str, Any] = {
        "email": f"{sid}@school.org" if email is None else email,
        "display_name": f"Teacher {sid}",
        "username": f"u-{sid}",
        "school_ids": ("sch-1",),
    }
    values.update(kw)
    return Teacher(sourced_id=sid, **values)


def _linked(uid: int, sid: str, **kw: Any) -> LinkedUser:
    values: dict[str, Any] = {
        "email": f"{sid}@school.org",
        "status": "active",
        "created_by": f"source:{SOURCE}",
        "archived_by_sync": False,
        "linked_elsewhere_active": False,
    }
    values.update(kw)
    return LinkedUser(user_id=uid, external_id=sid, **values)


def _plan(
    candidates: list[Teacher],
    linked: dict[str, LinkedUser] | None = None,
    existing: dict[str, ExistingUser] | None = None,
    *,
    prov: Provisioning | None = None,
    active_users: int = 0,
    license_limit: int | None = None,
    teaching_elsewhere: frozenset[int] = frozenset(),
    claims: dict[str, dict[str, str]] | None = None,
) -> Any:
    return plan_provisioning(
        SOURCE,
        candidates,
        linked or {},
        existing or {},
        prov=prov or _prov(),
        active_users=active_users,
        license_limit=license_limit,
        teaching_elsewhere=teaching_elsewhere,
        claims=claims,
    )


# -- sites_for ------------------------------------------------------------------------------------


def test_sites_come_from_the_site_map_by_school_id_then_name() -> None:
    """Each school maps to its site, by sourcedId or by name, each site once, in that order."""
    prov = _prov(site_map={"sch-1": "North", "South High": "South", "sch-3": "North"})
    teacher = _teacher("t-1", school_ids=("sch-1", "sch-3"), school_names=("South High",))
    assert sites_for(teacher, prov) == ("North", "South")


def test_an_unmapped_teacher_gets_the_default_site_or_none() -> None:
    """No school in the site map: the default site, if there is one."""
    teacher = _teacher("t-1", school_ids=("sch-9",))
    assert sites_for(teacher, _prov(default_site="Central")) == ("Central",)
    assert sites_for(teacher, _prov()) == ()


def test_a_mapped_school_beats_the_default_site() -> None:
    """The site map wins over default_site."""
    prov = _prov(default_site="Central", site_map={"sch-1": "North"})
    assert sites_for(_teacher("t-1"), prov) == ("North",)


# -- email_rejection ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "   ", "\u200b"])
def test_a_missing_email_is_rejected_as_none(raw: str | None) -> None:
    """No address at all (or only blanks) is the NO_EMAIL rejection."""
    assert email_rejection(raw, _prov()) == NO_EMAIL


def test_an_email_that_is_not_an_address_is_rejected_naming_it() -> None:
    """A value such as "N/A" is invalid and the reason quotes the value as sent."""
    assert email_rejection("N/A", _prov()) == "invalid email: 'N/A' is not an email address"


def test_an_overlong_email_is_rejected_without_quoting_it() -> None:
    """An address longer than the store's column is invalid; the reason names the limit only."""
    raw = "a" * MAX_EMAIL + "@school.org"
    reason = email_rejection(raw, _prov())
    assert reason == f"invalid email: longer than {MAX_EMAIL} characters"
    assert raw not in reason


def test_an_email_outside_the_allowed_domains_is_rejected() -> None:
    """With email_domains set, another domain (a subdomain included) is rejected."""
    prov = _prov(email_domains=["school.org"])
    assert email_rejection("Ada@School.org", prov) is None
    reason = email_rejection("ada@hs.school.org", prov)
    assert reason is not None
    assert reason.startswith("email outside the allowed domains:")
    assert "hs.school.org" in reason


def test_a_valid_email_is_accepted_whatever_its_case_and_spacing() -> None:
    """Normalization comes first: case and surrounding blanks do not make an address invalid."""
    assert email_rejection("  Ada.Cook@School.ORG ", _prov()) is None


@given(st.one_of(st.none(), st.text(max_size=40)))
def test_every_rejection_starts_with_a_known_prefix(raw: str | None) -> None:
    """The run report tells provisioning rejections apart by these prefixes."""
    reason = email_rejection(raw, _prov(email_domains=["school.org"]))
    assert reason is None or reason.startswith(EMAIL_REJECTIONS)


# -- plan_provisioning: creating, linking, restoring ---------------------------------------------


def test_a_new_eligible_teacher_gets_an_account() -> None:
    """A candidate with a valid, unknown email is created with the default role and site."""
    prov = _prov(default_site="Central")
    plan = _plan([_teacher("t-1", email=" Ada@School.org ", display_name="Ada")], prov=prov)
    assert plan.create == [
        NewUser(
            email="ada@school.org",
            display_name="Ada",
            role="Teacher",
            sites=("Central",),
            identities=(("t-1", "u-t-1"),),
        )
    ]
    assert (plan.link, plan.restore, plan.archive, plan.rejected) == ([], [], [], [])


def test_a_teacher_without_a_name_is_named_by_their_email() -> None:
    """An empty display name falls back to the email."""
    plan = _plan([_teacher("t-1", display_name="")])
    assert plan.create[0].display_name == "t-1@school.org"


def test_a_teacher_whose_email_is_a_directory_user_is_linked_not_created() -> None:
    """An existing user with the same (normalized) email is linked to the person."""
    existing = {"t-1@school.org": ExistingUser(7, "t-1@school.org", "active")}
    plan = _plan([_teacher("t-1", email="T-1@School.org", display_name="Ada")], existing=existing)
    assert plan.link == [Link(7, "t-1", "u-t-1", "t-1@school.org", "Ada")]
    assert plan.create == []
    assert plan.touched_users == {7}


def test_an_already_linked_active_teacher_needs_nothing() -> None:
    """A linked, active account of a candidate is left alone (and not touched)."""
    plan = _plan([_teacher("t-1")], linked={"t-1": _linked(3, "t-1")})
    assert (plan.create, plan.link, plan.restore, plan.archive) == ([], [], [], [])
    assert plan.touched_users == set()


def test_a_teacher_archived_by_sync_who_returns_is_restored() -> None:
    """An account the sync archived comes back when its person is a candidate again."""
    linked = {"t-1": _linked(3, "t-1", status="archived", archived_by_sync=True)}
    plan = _plan([_teacher("t-1")], linked=linked)
    assert plan.restore == [3]
    assert plan.touched_users == {3}


def test_an_account_an_admin_archived_is_not_restored() -> None:
    """Only the sync's own archivals are undone by the sync."""
    linked = {"t-1": _linked(3, "t-1", status="archived", archived_by_sync=False)}
    plan = _plan([_teacher("t-1")], linked=linked)
    assert plan.restore == []


def test_an_account_of_two_returning_persons_is_restored_once() -> None:
    """Two persons (one per school) linked to one archived account restore it once."""
    linked = {
        "t-1": _linked(3, "t-1", status="archived", archived_by_sync=True),
        "t-2": _linked(3, "t-2", status="archived", archived_by_sync=True),
    }
    plan = _plan([_teacher("t-1"), _teacher("t-2")], linked=linked, license_limit=1)
    assert plan.restore == [3]
    assert plan.skipped_license == []


def test_persons_sharing_an_email_get_one_account_with_every_identity() -> None:
    """Several person records of one name with one email become one account, and the plan
    names them."""
    a = _teacher("t-1", email="ada@school.org", display_name="Ada Lovelace")
    b = _teacher("t-2", email="ADA@school.org", display_name=" ada  LOVELACE")
    plan = _plan([b, a])
    assert [n.identities for n in plan.create] == [(("t-1", "u-t-1"), ("t-2", "u-t-2"))]
    assert plan.shared == {"ada@school.org": [a, b]}


def test_persons_of_other_names_never_share_an_account() -> None:
    """Under one email and other names, no one not linked yet gets the account: both new
    ones are rejected naming the other; against an account whose person of the source has
    another name (``claims``), the newcomer is; a person already linked keeps theirs."""
    a = _teacher("t-1", email="noemail@school.org", display_name="Ada Lovelace")
    b = _teacher("t-2", email="NoEmail@school.org", display_name="Bob Brown")
    plan = _plan([a, b])
    assert plan.create == [] and plan.shared == {}
    assert dict(plan.rejected) == {
        "t-1": "email shared under another name: noemail@school.org is also the email of t-2 "
        "(Bob Brown); an account is never shared by different names, so none is given until "
        "the source tells them apart",
        "t-2": "email shared under another name: noemail@school.org is also the email of t-1 "
        "(Ada Lovelace); an account is never shared by different names, so none is given "
        "until the source tells them apart",
    }
    existing = {"noemail@school.org": ExistingUser(7, "noemail@school.org", "active")}
    plan = _plan([b], existing=existing, claims={"noemail@school.org": {"t-1": "Ada Lovelace"}})
    assert plan.link == [] and [sid for sid, _ in plan.rejected] == ["t-2"]
    same = _teacher("t-3", email="noemail@school.org", display_name="ADA lovelace")
    plan = _plan([same], existing=existing, claims={"noemail@school.org": {"t-1": "Ada Lovelace"}})
    assert [link.user_id for link in plan.link] == [7] and plan.rejected == []


def test_without_auto_create_a_new_teacher_is_only_reported() -> None:
    """auto_create_users off: nobody is created; the email is listed as not created."""
    existing = {"t-2@school.org": ExistingUser(7, "t-2@school.org", "active")}
    plan = _plan(
        [_teacher("t-1"), _teacher("t-2")],
        existing=existing,
        prov=_prov(auto_create_users=False),
    )
    assert plan.create == []
    assert plan.not_created == ["t-1@school.org"]
    assert [link.user_id for link in plan.link] == [7]  # linking an existing user still happens


# -- plan_provisioning: rejections ------------------------------------------------------------


def test_a_candidate_with_an_unusable_email_is_rejected_and_gets_nothing() -> None:
    """No account is created, linked or restored for a rejected candidate."""
    linked = {"t-2": _linked(3, "t-2", status="archived", archived_by_sync=True)}
    existing = {"n/a": ExistingUser(9, "n/a", "active")}
    plan = _plan(
        [_teacher("t-1", email=""), _teacher("t-2", email="N/A")], linked=linked, existing=existing
    )
    assert plan.rejected == [
        ("t-1", NO_EMAIL),
        ("t-2", "invalid email: 'N/A' is not an email address"),
    ]
    assert (plan.create, plan.link, plan.restore) == ([], [], [])


def test_a_linked_candidate_whose_email_went_bad_is_not_archived() -> None:
    """A blanked or mistyped address in the source does not take the account away."""
    plan = _plan([_teacher("t-1", email="")], linked={"t-1": _linked(3, "t-1")})
    assert plan.rejected == [("t-1", NO_EMAIL)]
    assert plan.archive == []


# -- plan_provisioning: license limit ---------------------------------------------------------


def test_creations_stop_at_the_license_limit() -> None:
    """With one seat left, the first candidate (by sourcedId) is created, the next skipped."""
    plan = _plan([_teacher("t-2"), _teacher("t-1")], active_users=4, license_limit=5)
    assert [n.email for n in plan.create] == ["t-1@school.org"]
    assert plan.skipped_license == ["t-2@school.org"]


def test_a_restoration_takes_a_seat_too() -> None:
    """Restored accounts count against the limit; with none left they wait as skipped."""
    linked = {"t-1": _linked(3, "t-1", status="archived", archived_by_sync=True)}
    plan = _plan([_teacher("t-1"), _teacher("t-2")], linked=linked, active_users=5, license_limit=6)
    assert plan.restore == [3]
    assert plan.create == []
    assert plan.skipped_license == ["t-2@school.org"]
    full = _plan([_teacher("t-1")], linked=linked, active_users=6, license_limit=6)
    assert full.restore == []
    assert full.skipped_license == ["t-1@school.org"]


def test_an_over_full_license_gives_no_seat() -> None:
    """More active users than the limit allows (the limit lowered) is no seat, not a negative."""
    plan = _plan([_teacher("t-1")], active_users=9, license_limit=5)
    assert plan.create == []
    assert plan.skipped_license == ["t-1@school.org"]


# -- plan_provisioning: archiving -------------------------------------------------------------


def test_a_teacher_who_left_is_archived() -> None:
    """A linked, active account the source created, whose person is no candidate, is archived."""
    plan = _plan([], linked={"t-1": _linked(3, "t-1")})
    assert plan.archive == [3]
    assert plan.touched_users == {3}


@pytest.mark.parametrize(
    ("link", "kw"),
    [
        ({"created_by": "import"}, {}),  # an account rostersync did not create
        ({"created_by": "source:other"}, {}),  # another source's
        ({"status": "archived"}, {}),  # already archived
        ({"linked_elsewhere_active": True}, {}),  # an active person elsewhere still has it
        ({}, {"teaching_elsewhere": frozenset({3})}),  # a person not decided here teaches
        ({}, {"prov": _prov(on_teacher_removed="keep")}),
    ],
)
def test_a_teacher_who_left_keeps_the_account_when(
    link: dict[str, Any], kw: dict[str, Any]
) -> None:
    """Only accounts the source created are archived, once nothing else holds them."""
    plan = _plan([], linked={"t-1": _linked(3, "t-1", **link)}, **kw)
    assert plan.archive == []


def test_an_account_stays_while_another_of_its_persons_is_a_candidate() -> None:
    """A teacher with a record per school keeps the account while one record still teaches."""
    linked = {"t-1": _linked(3, "t-1"), "t-2": _linked(3, "t-2")}
    assert _plan([_teacher("t-2")], linked=linked).archive == []
    assert _plan([], linked=linked).archive == [3]


def test_a_user_linked_in_this_run_is_not_archived() -> None:
    """A user the plan links (touched) is not archived by another of its persons leaving."""
    existing = {"t-1@school.org": ExistingUser(3, "t-1@school.org", "active")}
    plan = _plan([_teacher("t-1")], linked={"t-9": _linked(3, "t-9")}, existing=existing)
    assert [link.user_id for link in plan.link] == [3]
    assert plan.archive == []


# -- plan_provisioning: properties ------------------------------------------------------------

emails = st.sampled_from(["a@school.org", "B@school.org", "b@school.org", "", "N/A", "c@x.org"])
teachers = st.builds(
    lambda sid, email: _teacher(sid, email=email),
    st.sampled_from([f"t-{i}" for i in range(6)]),
    emails,
)
linked_users = st.builds(
    lambda uid, sid, status, by_sync, creator: _linked(
        uid, sid, status=status, archived_by_sync=by_sync, created_by=creator
    ),
    st.integers(1, 4),
    st.sampled_from([f"t-{i}" for i in range(8)]),
    st.sampled_from(["active", "archived"]),
    st.booleans(),
    st.sampled_from([f"source:{SOURCE}", "import"]),
)


@given(
    st.lists(teachers, max_size=6, unique_by=lambda t: t.sourced_id),
    st.lists(linked_users, max_size=6, unique_by=lambda link: link.external_id),
    st.one_of(st.none(), st.integers(0, 6)),
    st.integers(0, 6),
)
def test_provisioning_plans_keep_the_rules(
    candidates: list[Teacher],
    links: list[LinkedUser],
    limit: int | None,
    active: int,
) -> None:
    """Whatever the roster: the license is never exceeded, no candidate's account is archived,
    a rejected candidate gets nothing, and no email is created twice."""
    linked = {link.external_id: link for link in links}
    plan = _plan(candidates, linked, active_users=active, license_limit=limit)
    if limit is not None:
        assert len(plan.create) + len(plan.restore) <= max(limit - active, 0)
    candidate_users = {linked[t.sourced_id].user_id for t in candidates if t.sourced_id in linked}
    assert not set(plan.archive) & candidate_users
    rejected = {sid for sid, _ in plan.rejected}
    given_ids = {sid for n in plan.create for sid, _ in n.identities} | {
        link.sourced_id for link in plan.link
    }
    assert not rejected & given_ids
    assert len({n.email for n in plan.create}) == len(plan.create)
    assert set(plan.archive) <= plan.touched_users
    assert plan.archive == sorted(set(plan.archive))


# -- check_safety --------------------------------------------------------------------------------


def _safety(**kw: Any) -> SafetyVerdict:
    values: dict[str, Any] = {
        "safety": Safety(),
        "users_archived": 0,
        "groups_removed": 0,
        "managed_users": 1000,
        "managed_groups": 1000,
        "fetched": None,
        "last_fetched": None,
    }
    values.update(kw)
    return check_safety(**values)


def test_a_small_run_is_not_held() -> None:
    """Few removals of a large directory pass."""
    assert _safety(users_archived=3, groups_removed=4) == SafetyVerdict(False)


def test_more_removals_than_max_removals_hold_the_run() -> None:
    """Archived users and removed groups count together against max_removals."""
    verdict = _safety(safety=Safety(max_removals=10), users_archived=6, groups_removed=5)
    assert verdict.hold
    assert verdict.reasons == (
        "11 removals (6 users archived, 5 groups removed) exceed safety.max_removals=10",
    )


def test_a_large_share_removed_holds_the_run() -> None:
    """Removing more than max_removal_percent of the users (or groups) holds the run."""
    verdict = _safety(users_archived=30, managed_users=100, groups_removed=2, managed_groups=100)
    assert verdict.reasons == (
        "30 of 100 users archived (30.0%) exceed safety.max_removal_percent=20",
    )


def test_the_percentage_rule_waits_for_ten_removals() -> None:
    """A five-teacher school losing one teacher (20+%) is not held."""
    assert not _safety(users_archived=1, managed_users=5).hold
    assert not _safety(users_archived=9, managed_users=10).hold
    assert _safety(users_archived=10, managed_users=10).hold
    assert not _safety(users_archived=3, managed_users=5, min_removals_for_percent=4).hold


def test_the_percentage_rule_ignores_an_empty_base() -> None:
    """No managed groups yet: no share to compute, no hold for it."""
    assert not _safety(groups_removed=12, managed_groups=0).hold


def test_many_people_losing_their_email_hold_the_run() -> None:
    """A source that stops sending emails (a lost scope) is held, with the hint."""
    verdict = _safety(emails_lost=30, emails_before=100)
    assert verdict.hold
    assert "30 of 100 people would lose their email address" in verdict.reasons[0]
    assert "classroom.profile.emails" in verdict.reasons[0]
    assert not _safety(emails_lost=9, emails_before=10).hold  # fewer than ten
    assert not _safety(emails_lost=15, emails_before=100).hold  # within the share


def test_a_shrunken_or_empty_source_holds_the_run() -> None:
    """A full pull with fewer records than min_source_ratio of the last one is held."""
    last = {"persons": 100, "classes": 10, "enrollments": 50}
    verdict = _safety(fetched={"persons": 40, "classes": 0, "enrollments": 50}, last_fetched=last)
    assert verdict.reasons == (
        "a shrunken source: 40 persons against 100 in the last successful run "
        "(below safety.min_source_ratio=0.5)",
        "an empty pull: 0 classes against 10 in the last successful run "
        "(below safety.min_source_ratio=0.5)",
    )
    assert not _safety(
        fetched={"persons": 50, "classes": 5, "enrollments": 25}, last_fetched=last
    ).hold


def test_without_a_previous_full_pull_the_source_size_is_not_checked() -> None:
    """The first run (or a delta run, which passes no counts) has nothing to compare with."""
    assert not _safety(fetched={"persons": 0}, last_fetched=None).hold
    assert not _safety(fetched={"persons": 0}, last_fetched={}).hold
    assert not _safety(fetched=None, last_fetched={"persons": 100}).hold


def test_every_reason_is_given_at_once() -> None:
    """A run that breaks several rules says so for each."""
    verdict = _safety(
        safety=Safety(max_removals=5),
        users_archived=6,
        emails_lost=50,
        emails_before=100,
        fetched={"persons": 0},
        last_fetched={"persons": 10},
    )
    assert len(verdict.reasons) == 3


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 100), st.integers(0, 100))
def test_a_run_within_every_limit_is_never_held(
    archived: int, removed: int, more_users: int, more_groups: int
) -> None:
    """With limits no run can reach, nothing is held; a verdict holds exactly when it gives a
    reason."""
    counts = {
        "users_archived": archived,
        "groups_removed": removed,
        "managed_users": archived + more_users,
        "managed_groups": removed + more_groups,
    }
    lax = Safety(max_removals=1000, max_removal_percent=100, min_source_ratio=0)
    assert _safety(safety=lax, **counts) == SafetyVerdict(False)
    verdict = _safety(safety=Safety(max_removals=40), **counts)
    assert verdict.hold == bool(verdict.reasons)


# -- chunks ---------------------------------------------------------------------------------------


@given(st.lists(st.integers(), max_size=30), st.integers(1, 7))
def test_chunks_split_in_order_without_loss(items: list[int], size: int) -> None:
    """Bounded, non-empty batches whose concatenation is the input."""
    parts = list(chunks(items, size))
    assert [x for part in parts for x in part] == items
    assert all(0 < len(part) <= size for part in parts)
