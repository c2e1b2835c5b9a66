"""The pure import rules: name resolution, the importer's powers, planning without a database."""

from __future__ import annotations

import pytest

from rostersync.importer.plan import (
    OPERATOR,
    Directory,
    Policy,
    RoleInfo,
    UserInfo,
    actor_for,
    plan_import,
    resolve_name,
)
from rostersync.importer.rows import RowInput
from rostersync.importer.statuses import Status

ROLES = (
    RoleInfo("Teacher"),
    RoleInfo("Organization Admin", "organization", ("import_users",)),
    RoleInfo("Site Admin", "site", ("import_users",)),
)
SITES = ("North High", "South Middle")


def test_exact_match_wins_and_near_matches_are_hints_or_ambiguous() -> None:
    """Exact names resolve; one near-match is a hint; several near-matches are ambiguous."""
    assert resolve_name("Coach", ["Coach", "coach"], "role") == ("Coach", 0)
    with pytest.raises(LookupError) as missing:
        resolve_name("teacher", ["Teacher"], "role")
    assert missing.value.args == (
        "missing",
        "role 'teacher' does not exist or is not visible to you (did you mean 'Teacher'?)",
    )
    with pytest.raises(LookupError) as ambiguous:
        resolve_name("COACH", ["Coach", "coach"], "role")
    assert ambiguous.value.args[0] == "ambiguous"


def test_actor_scope_comes_from_roles() -> None:
    """Organization scope wins over site scope; no import permission or archived means no access."""
    assert actor_for("a@x.org", ROLES[1:], [], active=True).scope == "organization"
    site = actor_for("a@x.org", [ROLES[2]], ["North High"], active=True)
    assert (site.can_import, site.scope, site.sites) == (True, "site", frozenset({"North High"}))
    assert not actor_for("a@x.org", [ROLES[0]], [], active=True).can_import
    assert not actor_for("a@x.org", [ROLES[1]], [], active=False).can_import


def test_license_headroom_is_shared_by_the_rows_of_a_file() -> None:
    """With one free seat, the first new active user takes it and the next is refused."""
    d = Directory(roles=ROLES, sites=SITES, active_users=4)
    rows = [
        RowInput(2, "a@x.org"),
        RowInput(3, "b@x.org"),
        RowInput(4, "c@x.org", status="archived"),
    ]
    out = plan_import(rows, d, OPERATOR, Policy(license_limit=5, default_role="Teacher"))
    assert [o.status for o in out] == [Status.SUCCESS, Status.LICENSE_LIMIT, Status.SUCCESS]


def test_overwrite_with_delegated_keeps_first_role_only() -> None:
    """Overwrite + Delegated on an existing user leaves just the row's first role."""
    user = UserInfo(7, "u@x.org", "U", "active", roles=("Teacher",), sites=("North High",))
    d = Directory(roles=ROLES, sites=SITES, users={"u@x.org": user})
    row = RowInput(2, "u@x.org", roles=("Site Admin", "Teacher"), overwrite=True, delegated=True)
    [out] = plan_import([row], d, OPERATOR, Policy())
    assert out.status is Status.UPDATED
    assert out.change is not None and out.change.roles == ("Site Admin",)
    assert out.change.delegated is True
    assert "kept only the first role 'Site Admin'" in out.message


def test_unchanged_user_plans_no_write() -> None:
    """An existing user the row would not change yields Already Exists and no change to apply."""
    user = UserInfo(7, "u@x.org", "U", "active", roles=("Teacher",), sites=("North High",))
    d = Directory(roles=ROLES, sites=SITES, users={"u@x.org": user})
    [out] = plan_import(
        [RowInput(2, "u@x.org", roles=("Teacher",), overwrite=True)], d, OPERATOR, Policy()
    )
    assert (out.status, out.change) == (Status.ALREADY_EXISTS, None)
