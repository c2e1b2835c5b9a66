"""Manual teacher import from a roster source: who is listed, what import creates and reports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from rostersync.config.models import Settings
from rostersync.importer import candidates, import_teachers
from rostersync.source.records import RosterEnrollment, RosterPerson
from rostersync.source.testdata import small_roster
from rostersync.source.testing import MemoryConnector
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from tests.importer.conftest import add_user, user_row

PROVISIONING = {
    "auto_create_users": False,
    "default_role": "Teacher",
    "default_site": "North High",
    "site_map": {"sch-2": "South Middle"},
}


@pytest.fixture
def mem_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(memory_sources=("mem",), provisioning=PROVISIONING)


async def _synced(store: Store, settings: Settings) -> SyncEngine:
    engine = SyncEngine(settings, store, connectors={"mem": MemoryConnector(small_roster())})
    report = await engine.sync("mem")
    assert report.status == "succeeded"
    return engine


def _statuses(result: Any) -> list[tuple[str, str]]:
    return [(o.email, str(o.status)) for o in result.outcomes]


async def test_list_shows_eligible_teachers_who_are_not_users(
    store: Store, mem_settings: Settings
) -> None:
    """Teachers of populated classes are listed (emails lower-case); a teacher of an empty class is not."""
    await _synced(store, mem_settings)
    with store.read() as conn:
        found = candidates(conn, "mem", mem_settings)
    assert [(t.sourced_id, (t.email or "").lower()) for t in found] == [
        ("t-1", "ada@example.org"),
        ("t-2", "alan.turing@example.org"),
    ]
    add_user(store, mem_settings, "ada@example.org")
    with store.read() as conn:
        assert [t.sourced_id for t in candidates(conn, "mem", mem_settings)] == ["t-2"]


async def test_import_creates_links_and_builds_groups(store: Store, mem_settings: Settings) -> None:
    """An imported teacher gets the role and site, a link to their person, and their groups."""
    engine = await _synced(store, mem_settings)
    result = import_teachers(store, mem_settings, "mem", emails=["ADA@example.org"])
    assert _statuses(result) == [("ada@example.org", "Success")]
    assert result.resyncs_queued == 1
    await engine.drain()
    u = user_row(store, "ada@example.org")
    assert (u["roles"], u["sites"], u["created_by"]) == (
        ["Teacher"],
        ["North High"],
        "teachers-import:mem",
    )
    with store.read() as conn:
        groups = sorted(
            r[0]
            for r in conn.execute(
                text(
                    "SELECT g.external_id FROM groups g JOIN group_owner o ON o.group_id = g.id "
                    'JOIN "user" u ON u.id = o.user_id WHERE u.email = :e'
                ),
                {"e": "ada@example.org"},
            )
        )
        ident = conn.execute(text("SELECT source, external_id FROM user_identity")).all()
    assert groups == ["c-1", "c-2"]
    assert [tuple(i) for i in ident] == [("mem", "t-1")]


async def test_import_reports_each_teacher(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """Per-teacher statuses: Success, Updated (linked), Invalid email, Duplicate row, Failed, License."""
    settings = make_settings(memory_sources=("mem",), provisioning=PROVISIONING, license_limit=2)
    await _synced(store, settings)
    add_user(store, settings, "alan.turing@example.org")
    result = import_teachers(
        store,
        settings,
        "mem",
        emails=[
            "ada@example.org",
            "alan.turing@example.org",
            "nope",
            "ada@example.org",
            "grace@example.org",
        ],
    )
    assert _statuses(result) == [
        ("ada@example.org", "Success"),
        ("alan.turing@example.org", "Updated"),
        ("nope", "Invalid email"),
        ("ada@example.org", "Duplicate row"),
        ("grace@example.org", "Failed"),
    ]
    assert "not an eligible teacher" in result.outcomes[4].message
    again = import_teachers(store, settings, "mem", emails=["alan.turing@example.org"])
    assert _statuses(again) == [("alan.turing@example.org", "Already Exists")]


async def test_license_and_unknown_role_or_site(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """A full license, an unknown --role and an unknown --site are reported per teacher."""
    settings = make_settings(memory_sources=("mem",), provisioning=PROVISIONING, license_limit=0)
    await _synced(store, settings)
    full = import_teachers(store, settings, "mem", emails=["ada@example.org"])
    assert _statuses(full) == [("ada@example.org", "License limit reached")]
    role = import_teachers(store, settings, "mem", emails=["ada@example.org"], role="Wizard")
    assert _statuses(role) == [("ada@example.org", "Role not found")]
    site = import_teachers(store, settings, "mem", emails=["ada@example.org"], site="Atlantis")
    assert _statuses(site) == [("ada@example.org", "Site not found")]
    with store.read() as conn:
        assert conn.execute(text('SELECT count(*) FROM "user"')).scalar_one() == 0


async def test_all_imports_every_candidate_with_chosen_role_and_site(
    store: Store, mem_settings: Settings
) -> None:
    """--all imports every listed teacher with --role and --site; nobody is left to list."""
    await _synced(store, mem_settings)
    result = import_teachers(
        store, mem_settings, "mem", emails=None, role="Site Admin", site="South Middle"
    )
    assert [str(o.status) for o in result.outcomes] == ["Success", "Success"]
    assert user_row(store, "alan.turing@example.org")["sites"] == ["South Middle"]
    assert user_row(store, "ada@example.org")["roles"] == ["Site Admin"]
    with store.read() as conn:
        assert candidates(conn, "mem", mem_settings) == []


async def test_an_email_of_persons_with_other_names_is_not_imported(
    store: Store, mem_settings: Settings
) -> None:
    """Two teachers of the source under one address but other names (a placeholder): the
    manual import refuses it as a sync would, naming both, and creates nothing; under one
    name (a record per school) it is one account for both."""
    roster = small_roster()
    roster.persons.append(RosterPerson("t-9", "teacher", "Bob", "Brown", "Ada@Example.org"))
    roster.enrollments.append(RosterEnrollment("e-t9c2", "c-2", "t-9", "teacher"))
    engine = SyncEngine(mem_settings, store, connectors={"mem": MemoryConnector(roster)})
    await engine.sync("mem")
    result = import_teachers(store, mem_settings, "mem", emails=["ada@example.org"])
    assert _statuses(result) == [("ada@example.org", "Failed")]
    assert result.outcomes[0].message == (
        "email shared under another name: ada@example.org is also the email of t-9 (Bob Brown); "
        "an account is never shared by different names, so none is given until the source "
        "tells them apart"
    )
    with store.read() as conn:
        assert conn.execute(text('SELECT count(*) FROM "user"')).scalar_one() == 0
    roster.persons[-1] = RosterPerson("t-9", "teacher", "Ada", "Lovelace", "ada@example.org")
    await engine.sync("mem")
    result = import_teachers(store, mem_settings, "mem", emails=["ada@example.org"])
    assert _statuses(result) == [("ada@example.org", "Success")]
    with store.read() as conn:
        linked = conn.execute(text("SELECT external_id FROM user_identity ORDER BY 1")).all()
    assert [r[0] for r in linked] == ["t-1", "t-9"]
