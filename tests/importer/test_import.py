"""Bulk import against a real store (SQLite and PostgreSQL): statuses, semantics, idempotence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from rostersync.config.models import Settings
from rostersync.importer import Status, report_csv, run_import
from rostersync.importer import apply as apply_mod
from rostersync.store.db import Store
from tests.importer.conftest import (
    Run,
    add_group,
    add_user,
    count,
    sheet,
    statuses,
    user_row,
    with_google,
)

HEADER = "Email,Display Name,Role,Site,Groups,SendVerification,DataSync,Overwrite,Delegated,Current Status\n"


def test_every_status_is_produced(store: Store, make_settings: Callable[..., Settings]) -> None:
    """One file (plus a run by a user without permission) yields every status of the contract."""
    settings = make_settings(
        memory_sources=(),
        license_limit=3,
        roles=[
            "Teacher",
            {"name": "Organization Admin", "permissions": ["import_users"]},
            "Coach",
            "coach",
        ],
        sites=["North High", "South Middle", "East Campus", "East campus"],
    )
    uid = add_user(
        store, settings, "existing@example.org", roles=("Teacher",), sites=("North High",)
    )
    add_user(store, settings, "same@example.org", roles=("Teacher",), sites=("North High",))
    add_group(store, "Algebra I", owner=uid)
    add_group(store, "Chemistry")
    text_ = HEADER + (
        "new@example.org,New,Teacher,North High,,,,,,\n"  # 2 Success
        "existing@example.org,,,,Chemistry,,,,,\n"  # 3 Updated (added to a group)
        "same@example.org,,,,,,,,,\n"  # 4 Already Exists
        "not-an-email,,,,,,,,,\n"  # 5 Invalid email
        "NEW@example.org,,,,,,,,,\n"  # 6 Duplicate row
        "f@example.org,,,,,,,,maybe,\n"  # 7 Failed
        "r@example.org,,Nope,,,,,,,\n"  # 8 Role not found
        "ra@example.org,,COACH,,,,,,,\n"  # 9 Ambiguous role name detected
        "s@example.org,,,Nowhere,,,,,,\n"  # 10 Site not found
        "sa@example.org,,,east CAMPUS,,,,,,\n"  # 11 Ambiguous site name detected
        "g@example.org,,,,Underwater Basket,,,,,\n"  # 12 Group not found
        "l@example.org,,,,,,,,,\n"  # 13 License limit reached
    )
    result = run_import(store, settings, sheet(text_))
    add_user(store, settings, "teacher@example.org", roles=("Teacher",))
    refused = run_import(
        store,
        settings,
        sheet(HEADER + "x@example.org,,,,,,,,,\n"),
        actor_email="teacher@example.org",
    )
    seen = set(statuses(result)) | set(statuses(refused))
    assert seen == {str(s) for s in Status}
    assert statuses(result) == [
        "Success", "Updated", "Already Exists", "Invalid email", "Duplicate row", "Failed",
        "Role not found", "Ambiguous role name detected", "Site not found",
        "Ambiguous site name detected", "Group not found", "License limit reached",
    ]  # fmt: skip
    assert [r.row for r in result.rows] == list(range(2, 14))
    assert result.counts == {"created": 1, "updated": 1, "unchanged": 1, "failed": 9}


def test_a_refused_status_or_flag_cell_is_echoed_as_the_file_has_it(run: Run) -> None:
    """`Deleted` in Current Status (or `Maybe` in Overwrite) fails its row quoting the cell
    as written, not lower-cased as it was compared ('deleted')."""
    result = run(HEADER + "d@example.org,,,,,,,,,Deleted\n" + "m@example.org,,,,,,,Maybe,,\n")
    assert [(str(r.status), r.message) for r in result.rows] == [
        ("Failed", "Current Status must be Active or Archived, not 'Deleted'"),
        ("Failed", "Overwrite must be TRUE or FALSE, not 'Maybe'"),
    ]


def test_dry_run_agrees_with_the_import_and_changes_nothing(
    run: Run, store: Store, settings: Settings
) -> None:
    """A dry run's rows equal the real import's, and it writes nothing (no users, no run, no mail)."""
    add_user(store, settings, "old@example.org", roles=("Teacher",), sites=("North High",))
    text_ = HEADER + (
        "a@example.org,A,Teacher,North High,,TRUE,,,,\n"
        "old@example.org,Renamed,,,,,,TRUE,,\n"
        "bad@,B,,,,,,,,\n"
        "c@example.org,C,Nope,,,,,,,\n"
    )
    preview = run(text_, dry_run=True)
    assert count(store, 'SELECT count(*) FROM "user"') == 1
    assert count(store, "SELECT count(*) FROM import_run") == 0
    assert count(store, "SELECT count(*) FROM outbox_email") == 0
    real = run(text_)
    assert [r.as_json() for r in preview.rows] == [r.as_json() for r in real.rows]
    assert preview.dry_run and not real.dry_run
    assert user_row(store, "old@example.org")["display_name"] == "Renamed"


def test_reimport_changes_nothing_and_queues_no_second_email(run: Run, store: Store) -> None:
    """Importing the same file again reports Already Exists and leaves one verification email."""
    text_ = HEADER + (
        "a@example.org,Ada,Teacher,North High,,TRUE,,TRUE,,\n"
        "b@example.org,Bob,Teacher,South Middle,,yes,,,,\n"
    )
    first = run(text_)
    assert statuses(first) == ["Success", "Success"]
    assert first.verifications_queued == 2
    before = user_row(store, "a@example.org")
    second = run(text_)
    assert statuses(second) == ["Already Exists", "Already Exists"]
    assert second.verifications_queued == 0
    assert "verification email not sent" in second.rows[0].message
    assert count(store, "SELECT count(*) FROM outbox_email") == 2
    assert user_row(store, "a@example.org") == before


def test_new_user_defaults(run: Run, store: Store) -> None:
    """A bare email gets Console User, the default role and site, status active, created_by import."""
    result = run("Email\nplain@example.org\n")
    assert statuses(result) == ["Success"]
    u = user_row(store, "plain@example.org")
    assert (u["display_name"], u["roles"], u["sites"], u["status"], u["created_by"]) == (
        "Console User",
        ["Teacher"],
        ["North High"],
        "active",
        "import",
    )


def test_first_and_last_name_and_unicode(run: Run, store: Store) -> None:
    """First Name + Last Name make the display name; unicode is kept."""
    run("Email,First Name,Last Name\nz@example.org,Zoë,Ñúñez\n")
    assert user_row(store, "z@example.org")["display_name"] == "Zoë Ñúñez"


def test_formula_looking_name_is_stored_but_neutralized_in_the_report(
    store: Store, settings: Settings
) -> None:
    """A name like =HYPERLINK(...) is data in the directory and a quoted text cell in the report."""
    parsed = sheet(
        'Email,Name\nf@example.org,"=HYPERLINK(""http://x"",""y"")"\nm@example.org,-2+3\n'
    )
    result = run_import(store, settings, parsed)
    assert user_row(store, "f@example.org")["display_name"].startswith("=HYPERLINK")
    report = report_csv(parsed, result.rows).splitlines()
    assert report[0] == "Email,Name,Status,Message"
    assert report[1].startswith("f@example.org,\"'=HYPERLINK(")
    assert report[2].startswith("m@example.org,'-2+3,Success,")


def test_license_limit(store: Store, make_settings: Callable[..., Settings]) -> None:
    """Past license_limit new active users are refused; an archived new user takes no seat."""
    settings = make_settings(memory_sources=(), license_limit=2)
    add_user(store, settings, "seat@example.org")
    result = run_import(
        store,
        settings,
        sheet(
            HEADER
            + "a@example.org,,,,,,,,,\nb@example.org,,,,,,,,,\nc@example.org,,,,,,,,,Archived\n"
        ),
    )
    assert statuses(result) == ["Success", "License limit reached", "Success"]
    assert "license allows 2 active users" in result.rows[1].message
    assert user_row(store, "c@example.org")["status"] == "archived"


def test_overwrite_reactivation_needs_a_seat(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Overwrite turning an archived user Active counts against the license."""
    settings = make_settings(memory_sources=(), license_limit=1)
    add_user(store, settings, "seat@example.org")
    add_user(store, settings, "gone@example.org", status="archived")
    result = run_import(store, settings, sheet(HEADER + "gone@example.org,,,,,,,TRUE,,Active\n"))
    assert statuses(result) == ["License limit reached"]
    assert user_row(store, "gone@example.org")["status"] == "archived"


def test_delegated_keeps_the_first_role(run: Run, store: Store) -> None:
    """Delegated TRUE keeps only the first of several roles and the message says which."""
    result = run(HEADER + 'd@example.org,D,"Site Admin;Teacher",North High,,,,,TRUE,\n')
    assert statuses(result) == ["Success"]
    assert "kept only the first role 'Site Admin'" in result.rows[0].message
    u = user_row(store, "d@example.org")
    assert u["roles"] == ["Site Admin"] and u["delegated"] is True


def test_overwrite_replaces_name_roles_sites_status(
    run: Run, store: Store, settings: Settings
) -> None:
    """Overwrite TRUE replaces name, roles, sites and status (Updated); FALSE leaves them (Already Exists)."""
    add_user(
        store, settings, "o@example.org", roles=("Teacher",), sites=("North High",), name="Old"
    )
    kept = run(HEADER + "o@example.org,New,Site Admin,South Middle,,,,FALSE,,Archived\n")
    assert statuses(kept) == ["Already Exists"]
    assert "Overwrite is FALSE" in kept.rows[0].message
    assert user_row(store, "o@example.org")["display_name"] == "Old"
    replaced = run(HEADER + "o@example.org,New,Site Admin,South Middle,,,,TRUE,,Archived\n")
    assert statuses(replaced) == ["Updated"]
    assert replaced.rows[0].message.startswith("name, roles, sites, status replaced")
    u = user_row(store, "o@example.org")
    assert (u["display_name"], u["roles"], u["sites"], u["status"]) == (
        "New",
        ["Site Admin"],
        ["South Middle"],
        "archived",
    )
    again = run(HEADER + "o@example.org,New,Site Admin,South Middle,,,,TRUE,,Archived\n")
    assert statuses(again) == ["Already Exists"]


def test_groups_are_additive_without_overwrite(run: Run, store: Store, settings: Settings) -> None:
    """Groups are added to an existing user (Updated) even without Overwrite; `none` adds nothing."""
    add_user(store, settings, "t@example.org", roles=("Teacher",), sites=("North High",))
    gid = add_group(store, "Algebra I")
    assert statuses(run(HEADER + "t@example.org,,,,none,,,,,\n")) == ["Already Exists"]
    result = run(HEADER + 't@example.org,,,,"Algebra I",,,,,\n')
    assert statuses(result) == ["Updated"]
    assert "added to 'Algebra I'" in result.rows[0].message
    assert count(store, f"SELECT count(*) FROM group_owner WHERE group_id = {gid}") == 1
    assert statuses(run(HEADER + 't@example.org,,,,"Algebra I",,,,,\n')) == ["Already Exists"]


def test_same_named_groups_fail_as_ambiguous(run: Run, store: Store) -> None:
    """Two visible groups with one name: the row fails, saying the name is ambiguous."""
    add_group(store, "Study Hall", ext="c-1")
    add_group(store, "Study Hall", ext="c-2")
    result = run(HEADER + 'n@example.org,,,,"Study Hall",,,,,\n')
    assert statuses(result) == ["Failed"]
    assert "matches 2 groups" in result.rows[0].message


def test_site_scoped_admin_sees_only_own_sites_and_roles(
    run: Run, store: Store, settings: Settings
) -> None:
    """A Site Admin of North High: other sites and org-wide admin roles are not found; other
    sites' users are No Access; a new user without Site lands in North High."""
    add_user(store, settings, "sa@example.org", roles=("Site Admin",), sites=("North High",))
    add_user(store, settings, "south@example.org", roles=("Teacher",), sites=("South Middle",))
    add_user(
        store,
        settings,
        "north@example.org",
        roles=("Teacher", "Organization Admin"),
        sites=("North High", "South Middle"),
    )
    result = run(
        HEADER
        + "a@example.org,,Teacher,South Middle,,,,,,\n"
        + "b@example.org,,Organization Admin,North High,,,,,,\n"
        + "c@example.org,,Site Admin,North High,,,,,,\n"
        + "south@example.org,,,,,,,TRUE,,\n"
        + "d@example.org,,,,,,,,,\n"
        + "north@example.org,,Site Admin,North High,,,,TRUE,,\n",
        actor_email="SA@example.org",
    )
    assert statuses(result) == [
        "Site not found", "Role not found", "Success", "No Access", "Success", "Updated",
    ]  # fmt: skip
    assert user_row(store, "d@example.org")["sites"] == ["North High"]
    # Overwrite replaced only what the site admin can see: the org-wide role and the other site stay.
    north = user_row(store, "north@example.org")
    assert north["roles"] == ["Organization Admin", "Site Admin"]
    assert north["sites"] == ["North High", "South Middle"]


def test_groups_visible_to_site_admin(run: Run, store: Store, settings: Settings) -> None:
    """A site admin sees groups owned by users of their sites, not others."""
    add_user(store, settings, "sa@example.org", roles=("Site Admin",), sites=("North High",))
    n = add_user(store, settings, "n@example.org", roles=("Teacher",), sites=("North High",))
    s = add_user(store, settings, "s@example.org", roles=("Teacher",), sites=("South Middle",))
    add_group(store, "North Algebra", owner=n)
    add_group(store, "South Algebra", owner=s)
    result = run(
        HEADER + "x@example.org,,,,North Algebra,,,,,\ny@example.org,,,,South Algebra,,,,,\n",
        actor_email="sa@example.org",
    )
    assert statuses(result) == ["Success", "Group not found"]


def test_no_permission_means_no_access_on_every_row(
    run: Run, store: Store, settings: Settings
) -> None:
    """An importer without import_users (or archived) gets No Access on every row, valid or not."""
    add_user(store, settings, "t@example.org", roles=("Teacher",))
    add_user(store, settings, "gone@example.org", roles=("Organization Admin",), status="archived")
    text_ = HEADER + "a@example.org,,,,,,,,,\nnot-an-email,,,,,,,,,\n"
    for actor in ("t@example.org", "gone@example.org"):
        result = run(text_, actor_email=actor)
        assert statuses(result) == ["No Access", "No Access"]
    assert count(store, 'SELECT count(*) FROM "user"') == 2


def test_unknown_actor_refuses_the_import(run: Run) -> None:
    """--as naming no user refuses the whole import."""
    from rostersync.importer import ImportRefused

    with pytest.raises(ImportRefused, match=r"--as nobody@example\.org: no such user"):
        run(HEADER + "a@example.org,,,,,,,,,\n", actor_email="nobody@example.org")


def test_data_sync_queues_a_live_resync_or_says_why_not(
    run: Run, store: Store, settings: Settings
) -> None:
    """DataSync TRUE queues a live resync with a Google Classroom source; without one, the row says so."""
    without = run(HEADER + "a@example.org,,,,,,TRUE,,,\n")
    assert "no Google Classroom source is configured" in without.rows[0].message
    assert count(store, "SELECT count(*) FROM resync_job") == 0
    result = run(HEADER + "a@example.org,,,,,,TRUE,,,\n", settings_=with_google(settings))
    assert statuses(result) == ["Already Exists"]
    assert (
        "live group resync queued from Google Classroom source 'workspace'"
        in result.rows[0].message
    )
    with store.read() as conn:
        jobs = conn.execute(text("SELECT live, state FROM resync_job")).all()
    assert [(bool(live), state) for live, state in jobs] == [(True, "queued")]


def add_roster_teacher(store: Store, sourced_id: str, *, username: str) -> None:
    """A teacher in source ``mem``'s mirror, as a sync would have left it."""
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO roster_person (source, sourced_id, role, given_name, family_name,"
                " email, username, enabled, org_ids, status, row_hash) VALUES ('mem', :sid,"
                " 'teacher', 'X', 'Y', 'x@example.org', :username, :yes, '', 'active', 'h')"
            ),
            {"sid": sourced_id, "username": username, "yes": True},
        )


def test_source_usernames_link_roster_people(
    run: Run, store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A Source Username known in the mirror links that person (and queues a resync); unknown
    ones are kept as usernames; one username cannot go to two users."""
    settings = make_settings(memory_sources=("mem",))
    add_roster_teacher(store, "t-9", username="Ada9")
    result = run(
        'Email,Source Username(s)\na@example.org,"mem:ada9; mem:other"\nb@example.org,mem:other\n'
        "c@example.org,nosuch:x\n",
        settings_=settings,
    )
    assert statuses(result) == ["Success", "Failed", "Failed"]
    assert "also given for a@example.org" in result.rows[1].message
    assert "no source named 'nosuch'" in result.rows[2].message
    with store.read() as conn:
        ids = sorted(
            conn.execute(text("SELECT source, external_id, username FROM user_identity")).all()
        )
    assert ids == [("mem", "t-9", "ada9"), ("mem", "username:other", "other")]
    assert result.resyncs_queued == 1


def test_source_username_matches_beyond_ascii_case(
    run: Run, store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A username with a capital letter outside ASCII ("Élodie") is found however the file
    writes it, on SQLite as on PostgreSQL (SQLite's own LOWER() folds ASCII only)."""
    settings = make_settings(memory_sources=("mem",))
    add_roster_teacher(store, "t-7", username="ÉLODIE")
    result = run("Email,Source Username(s)\ne@example.org,mem:élodie\n", settings_=settings)
    assert statuses(result) == ["Success"]
    with store.read() as conn:
        ids = conn.execute(text("SELECT source, external_id FROM user_identity")).all()
    assert [tuple(i) for i in ids] == [("mem", "t-7")]


def test_import_run_and_rows_are_kept(run: Run, store: Store) -> None:
    """Each import is an import_run with one import_row per data row."""
    result = run(HEADER + "a@example.org,,,,,,,,,\nbad,,,,,,,,,\n", actor_email=None)
    with store.read() as conn:
        run_row = conn.execute(text("SELECT file_name, dry_run, counts FROM import_run")).one()
        rows = conn.execute(text("SELECT row, email, status FROM import_row ORDER BY row")).all()
    assert run_row[0] == "users.csv" and not run_row[1]
    assert result.import_id is not None
    assert [tuple(r) for r in rows] == [
        (2, "a@example.org", "Success"),
        (3, "bad", "Invalid email"),
    ]


def test_a_row_the_database_refuses_fails_alone(
    run: Run, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose write fails is Failed on its own (savepoint); the other rows are imported."""
    real = apply_mod._apply_change

    def flaky(conn: Any, change: Any, *args: Any) -> int:
        if change.email == "b@example.org":
            raise IntegrityError("INSERT", {}, Exception("duplicate key (injected)"))
        return real(conn, change, *args)

    monkeypatch.setattr(apply_mod, "_apply_change", flaky)
    result = run(
        HEADER + "a@example.org,,,,,,,,,\nb@example.org,,,,,,,,,\nc@example.org,,,,,,,,,\n"
    )
    assert statuses(result) == ["Success", "Failed", "Success"]
    assert "injected" in result.rows[1].message
    assert count(store, 'SELECT count(*) FROM "user"') == 2
