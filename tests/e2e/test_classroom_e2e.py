"""End to end: a fake Google Workspace domain (a real loopback Classroom server) synced through
the engine into users and groups, checked against the same roster synced from a OneRoster CSV
drop; then the failure rules: a shrunken course list, a refused course, missing emails and a
bad key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from connectors.google_classroom import NO_EMAIL_REASON, SCOPES
from rostersync.config.loader import load_settings_text
from rostersync.config.models import Settings
from rostersync.sampledata import DistrictSpec, generate_district, write_oneroster_csv
from rostersync.source.records import STUDENT, TEACHER, MemoryRoster
from rostersync.store.db import Store
from rostersync.sync.engine import SyncEngine
from rostersync.sync.runs import RunReport
from tests.conftest import _pg_schema_store
from tests.fakes.classroom_server import FakeClassroom, generate_keypair, generate_private_pem
from tests.sync.helpers import groups, snapshot, users

CLIENT_EMAIL = "rostersync@district-sync.iam.gserviceaccount.com"
CLIENT_ID = "104200000000000000001"
ADMIN = "admin@example.org"
FAST_RETRY = {"initial_wait": 0.01, "max_wait": 0.05}
SPEC = DistrictSpec(teachers=8, students=60, classes=12, students_per_class=5, edge_cases=False)


# -- keys, domain, settings ----------------------------------------------------------------


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    """(private PEM, public PEM) the fake's token endpoint trusts; RSA generation is slow."""
    return generate_keypair()


@pytest.fixture(scope="module")
def stranger_pem() -> str:
    """A well-formed key the fake does not know (deleted, rotated or from another project)."""
    return generate_private_pem()


@pytest.fixture
def roster() -> MemoryRoster:
    return generate_district(SPEC)


@pytest.fixture
def domain(roster: MemoryRoster, keypair: tuple[str, str]) -> Iterator[FakeClassroom]:
    """The fake Workspace domain serving `roster` as Classroom courses."""
    with FakeClassroom(
        roster, public_key_pem=keypair[1], client_email=CLIENT_EMAIL, allowed_sub=ADMIN
    ) as fake:
        yield fake


@pytest.fixture
def reference_store(store: Store, tmp_path: Path) -> Iterator[Store]:
    """A second, separate database on the same backend as `store`, for the OneRoster run."""
    if store.is_postgres:
        for other in _pg_schema_store():
            other.upgrade()
            yield other
    else:
        other = Store(f"sqlite:///{tmp_path / 'reference.db'}")
        other.upgrade()
        yield other
        other.dispose()


def service_account_json(private_pem: str) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "district-sync",
            "private_key_id": "0123456789abcdef",
            "private_key": private_pem,
            "client_email": CLIENT_EMAIL,
            "client_id": CLIENT_ID,
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


def classroom_source(fake: FakeClassroom, private_pem: str, **overrides: Any) -> dict[str, Any]:
    """A `type: google_classroom` source pointed at `fake` (page size 2: every roster pages)."""
    return {
        "type": "google_classroom",
        "service_account_json": service_account_json(private_pem),
        "delegated_admin": ADMIN,
        "api_base_url": fake.api_base_url,
        "token_url": fake.token_url,
        "page_size": 2,
        "retry": FAST_RETRY,
        **overrides,
    }


def make_settings(tmp_path: Path, sources: dict[str, Any], **extra: Any) -> Settings:
    # No site_map: Classroom has no schools, so every user lands on the default site.
    data: dict[str, Any] = {
        "organization": "Springfield Public Schools",
        "roles": ["Teacher"],
        "sites": ["North High", "South Middle"],
        "provisioning": {"default_role": "Teacher", "default_site": "North High"},
        "sources": sources,
        **extra,
    }
    return load_settings_text(yaml.safe_dump(data), base_dir=tmp_path)


async def sync_and_drain(engine: SyncEngine, source: str) -> RunReport:
    report = await engine.sync(source)
    await engine.drain()
    return report


def directory_view(store: Store, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Users and groups as an admin sees them, with the source's name taken out."""
    user_view = {
        email: {
            "display_name": u["display_name"],
            "roles": u["roles"],
            "sites": u["sites"],
            "status": u["status"],
            "sources": len(u["sources"]),
            "created_by": (u["created_by"] or "").replace(source, "<source>"),
        }
        for email, u in users(store).items()
    }
    group_view = {
        ext: {
            "name": g["name"],
            "owners": sorted(g["owners"]),
            "members": sorted((m["sourced_id"], m["email"], m["name"]) for m in g["members"]),
        }
        for ext, g in groups(store).items()
    }
    return user_view, group_view


def teachers_of(roster: MemoryRoster, class_id: str) -> set[str]:
    return {e.user_id for e in roster.enrollments if e.class_id == class_id and e.role == TEACHER}


def email_of(roster: MemoryRoster, person_id: str) -> str:
    email = next(p.email for p in roster.persons if p.sourced_id == person_id)
    assert email
    return email.lower()


# -- the same directory as OneRoster -------------------------------------------------------


async def test_classroom_domain_syncs_exactly_like_the_same_roster_from_oneroster(
    store: Store,
    reference_store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """A Classroom domain yields the same users, roles, sites, groups and members as OneRoster."""
    folder = tmp_path / "oneroster"
    write_oneroster_csv(roster, folder)
    csv_settings = make_settings(tmp_path, {"csv": {"type": "oneroster_csv", "path": str(folder)}})
    reference = await sync_and_drain(SyncEngine(csv_settings, reference_store), "csv")
    assert reference.status == "succeeded", reference.rejected

    settings = make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])})
    report = await sync_and_drain(SyncEngine(settings, store), "workspace")
    assert report.status == "succeeded", (report.error, report.rejected)
    assert report.fetched["classes"] == len(roster.classes)

    got_users, got_groups = directory_view(store, "workspace")
    want_users, want_groups = directory_view(reference_store, "csv")
    # Not vacuous: every teacher is a user on the default site, every class a full group.
    assert set(want_users) == {
        p.email.lower() for p in roster.persons if p.role == TEACHER and p.email
    }
    assert {u["sites"][0] for u in want_users.values()} == {"North High"}
    assert set(want_groups) == {c.sourced_id for c in roster.classes}
    assert all(len(g["members"]) == SPEC.students_per_class for g in want_groups.values())
    assert got_users == want_users
    assert got_groups == want_groups
    # Every page of every roster was read (page size 2 against 5 students a course).
    assert domain.calls["students"] == len(roster.classes) * 3


# -- item 6: a shrunken course list is held ------------------------------------------------


async def test_course_list_shrinking_below_min_source_ratio_is_held(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Most courses turning ARCHIVED (unlisted) holds the next run; nothing changes."""
    settings = make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])})
    engine = SyncEngine(settings, store)
    first = await sync_and_drain(engine, "workspace")
    assert first.status == "succeeded"
    before = snapshot(store)
    assert len(groups(store)) == len(roster.classes)

    # Only 2 of 12 courses stay ACTIVE: the run sees 2 classes against 12 last time.
    kept = {c.sourced_id for c in roster.classes[:2]}
    domain.course_states.update(
        {c.sourced_id: "ARCHIVED" for c in roster.classes if c.sourced_id not in kept}
    )
    held = await sync_and_drain(engine, "workspace")

    assert held.status == "held"
    assert held.hold_reason is not None
    assert "2 classes against 12" in held.hold_reason
    assert "min_source_ratio=0.5" in held.hold_reason
    assert held.fetched["classes"] == 2
    assert snapshot(store) == before
    # The courses really were unlisted, not merely skipped by the engine.
    assert {r.query["courseStates"][0] for r in domain.requests_to("courses")} == {"ACTIVE"}


async def test_per_source_min_source_ratio_holds_a_milder_shrink(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """sources.X.safety.min_source_ratio 0.9 holds a drop from 12 to 9 courses (0.5 would not)."""
    source = classroom_source(domain, keypair[0], safety={"min_source_ratio": 0.9})
    engine = SyncEngine(make_settings(tmp_path, {"workspace": source}), store)
    assert (await sync_and_drain(engine, "workspace")).status == "succeeded"
    before = snapshot(store)

    domain.course_states.update({c.sourced_id: "ARCHIVED" for c in roster.classes[:3]})
    held = await sync_and_drain(engine, "workspace")

    assert held.status == "held"
    assert held.hold_reason is not None
    assert "9 classes against 12" in held.hold_reason
    assert "min_source_ratio=0.9" in held.hold_reason
    assert snapshot(store) == before


async def test_shrink_above_the_ratio_is_applied(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """One course archived (11 of 12, above 0.5) is an ordinary run: its group goes."""
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])}), store
    )
    assert (await sync_and_drain(engine, "workspace")).status == "succeeded"
    gone = roster.classes[0].sourced_id
    domain.course_states[gone] = "ARCHIVED"

    report = await sync_and_drain(engine, "workspace")

    assert report.status == "succeeded", report.hold_reason
    assert set(groups(store)) == {c.sourced_id for c in roster.classes} - {gone}


async def test_approving_the_held_shrink_applies_it(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """An admin who approves the held run gets exactly the shrunken course list applied."""
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])}), store
    )
    assert (await sync_and_drain(engine, "workspace")).status == "succeeded"
    kept = {c.sourced_id for c in roster.classes[:2]}
    domain.course_states.update(
        {c.sourced_id: "ARCHIVED" for c in roster.classes if c.sourced_id not in kept}
    )
    held = await sync_and_drain(engine, "workspace")
    assert held.status == "held"

    approved = await engine.approve(held.id)
    await engine.drain()

    assert approved.status in ("succeeded", "succeeded_with_errors")
    assert set(groups(store)) == kept


# -- a refused course ----------------------------------------------------------------------


async def test_forbidden_course_is_rejected_and_the_others_synced(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """A 403 on one course's roster rejects that course; every other course becomes a group."""
    # A course whose teacher also teaches another one, so that teacher still gets a user.
    refused = next(
        c.sourced_id
        for c in roster.classes
        if any(
            teachers_of(roster, c.sourced_id) == teachers_of(roster, o.sourced_id)
            for o in roster.classes
            if o is not c
        )
    )
    domain.forbidden_courses.add(refused)
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])}), store
    )

    report = await sync_and_drain(engine, "workspace")

    assert report.status == "succeeded_with_errors"
    assert report.counts["records_rejected"] == 1
    [rejection] = report.rejected
    assert (rejection["entity"], rejection["sourced_id"]) == ("class", refused)
    assert (rejection["reason"] or "").startswith("forbidden: ")
    assert set(groups(store)) == {c.sourced_id for c in roster.classes} - {refused}
    [teacher] = teachers_of(roster, refused)
    assert email_of(roster, teacher) in users(store)


async def test_course_refused_on_a_later_run_keeps_its_group_and_teacher(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """A synced course answering 403 later is rejected, not deleted: group and user stay."""
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])}), store
    )
    assert (await sync_and_drain(engine, "workspace")).status == "succeeded"
    before = directory_view(store, "workspace")
    # A course whose only teacher teaches nothing else: deleting it would archive them.
    refused = next(
        c.sourced_id
        for c in roster.classes
        if not any(
            teachers_of(roster, c.sourced_id) & teachers_of(roster, o.sourced_id)
            for o in roster.classes
            if o is not c
        )
    )
    domain.forbidden_courses.add(refused)

    report = await sync_and_drain(engine, "workspace")

    assert report.status == "succeeded_with_errors"
    assert [(r["entity"], r["sourced_id"]) for r in report.rejected] == [("class", refused)]
    assert report.counts["users_archived"] == 0
    assert directory_view(store, "workspace") == before


# -- missing emails ------------------------------------------------------------------------


async def test_missing_emails_reject_teachers_with_the_scope_hint(
    store: Store,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Profiles without emailAddress reject each teacher with the scope hint; no users appear."""
    with FakeClassroom(
        roster,
        public_key_pem=keypair[1],
        client_email=CLIENT_EMAIL,
        allowed_sub=ADMIN,
        omit_emails=True,
    ) as fake:
        engine = SyncEngine(
            make_settings(tmp_path, {"workspace": classroom_source(fake, keypair[0])}), store
        )
        report = await sync_and_drain(engine, "workspace")

    assert report.status == "succeeded_with_errors"
    teacher_ids = {p.sourced_id for p in roster.persons if p.role == TEACHER}
    hinted = {r["sourced_id"] for r in report.rejected if r["reason"] == NO_EMAIL_REASON}
    assert teacher_ids <= hinted
    assert all(r["entity"] == "user" for r in report.rejected)
    assert users(store) == {}
    assert groups(store) == {}
    assert report.counts["users_created"] == 0


async def test_email_scope_lost_after_a_good_run_is_held(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Emails vanishing after a good run (scope revoked) hold the run: nothing is blanked or archived."""
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])}), store
    )
    assert (await sync_and_drain(engine, "workspace")).status == "succeeded"
    before = snapshot(store)
    domain.omit_emails = True

    report = await sync_and_drain(engine, "workspace")

    assert report.status == "held"
    assert "classroom.profile.emails" in (report.hold_reason or "")
    teacher_ids = {p.sourced_id for p in roster.persons if p.role == TEACHER}
    assert teacher_ids <= {
        r["sourced_id"] for r in report.rejected if r["reason"] == NO_EMAIL_REASON
    }
    assert snapshot(store) == before


# -- a bad key -----------------------------------------------------------------------------


def _assert_no_key_material(text: str, private_pem: str) -> None:
    assert "PRIVATE KEY" not in text
    assert all(line not in text for line in private_pem.splitlines()[1:-1])
    assert "eyJ" not in text  # no JWT assertion
    assert "ya29" not in text  # no access token


async def test_bad_key_fails_the_run_with_a_delegation_hint_and_no_secret(
    store: Store,
    domain: FakeClassroom,
    keypair: tuple[str, str],
    stranger_pem: str,
    tmp_path: Path,
) -> None:
    """A key Google refuses fails the run, names delegation and scopes, shows no key material."""
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, stranger_pem)}), store
    )
    with capture_logs() as logs:
        report = await sync_and_drain(engine, "workspace")

    assert report.status == "failed"
    message = report.error or ""
    assert "Domain-wide delegation" in message
    assert all(scope in message for scope in SCOPES)
    assert CLIENT_ID in message and ADMIN in message
    _assert_no_key_material(message, stranger_pem)
    _assert_no_key_material(json.dumps(report.as_json()), stranger_pem)
    _assert_no_key_material(repr(logs), stranger_pem)
    assert users(store) == {} and groups(store) == {}
    assert domain.calls["token"] == 1  # fatal at once: not retried
    assert domain.api_calls() == 0


async def test_roles_of_a_course_follow_the_classroom_rosters(
    store: Store,
    domain: FakeClassroom,
    roster: MemoryRoster,
    keypair: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Each group's owner is the course teacher and its members exactly the course students."""
    engine = SyncEngine(
        make_settings(tmp_path, {"workspace": classroom_source(domain, keypair[0])}), store
    )
    assert (await sync_and_drain(engine, "workspace")).status == "succeeded"

    for class_id, group in groups(store).items():
        want_owners = sorted(email_of(roster, t) for t in teachers_of(roster, class_id))
        want_members = {
            e.user_id for e in roster.enrollments if e.class_id == class_id and e.role == STUDENT
        }
        assert group["owners"] == want_owners
        assert {m["sourced_id"] for m in group["members"]} == want_members
