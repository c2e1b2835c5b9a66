"""Manual import of eligible teachers from a roster source (for when auto-creation is off).

``teachers list`` shows the source's eligible teachers (active, enabled, teaching an active
class with at least one active student) who are not console users yet; ``teachers import``
creates chosen ones with a role and site, links them to their roster person, and queues
their group resync. Statuses come from the import vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import Connection, CursorResult, insert, text

from rostersync.config.models import Settings
from rostersync.emails import email_problem, normalize_email
from rostersync.importer.plan import resolve_name
from rostersync.importer.statuses import Status, empty_counts
from rostersync.resync.queue import queue_resync
from rostersync.store.db import Store, utcnow
from rostersync.store.tables import user, user_identity, user_role, user_site
from rostersync.sync.provisioning import (
    account_persons,
    count_active_users,
    eligible_teachers,
    linked_users,
    mark_directory_changed,
    sync_catalog,
    users_by_email,
)
from rostersync.sync.rules import (
    ExistingUser,
    Teacher,
    email_rejection,
    name_conflict,
    sites_for,
)


@dataclass(frozen=True, slots=True)
class TeacherOutcome:
    email: str
    status: Status
    message: str
    sourced_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "sourced_id": self.sourced_id,
            "status": str(self.status),
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class NewTeacher:
    email: str
    display_name: str
    role: str
    sites: tuple[str, ...]
    persons: tuple[Teacher, ...]  # every person record of the source with this email


@dataclass(frozen=True, slots=True)
class LinkTeacher:
    user_id: int
    persons: tuple[Teacher, ...]


@dataclass
class TeacherPlan:
    outcomes: list[TeacherOutcome] = field(default_factory=list)
    create: list[NewTeacher] = field(default_factory=list)
    link: list[LinkTeacher] = field(default_factory=list)
    resync: set[int] = field(default_factory=set)  # existing users to resync


@dataclass
class TeachersResult:
    source: str
    outcomes: list[TeacherOutcome]
    resyncs_queued: int = 0
    #: the users whose group resyncs the import queued (what became of them is the CLI's)
    resync_users: set[int] = field(default_factory=set)

    @property
    def counts(self) -> dict[str, int]:
        counts = empty_counts()
        for o in self.outcomes:
            counts[o.status.count_key] += 1
        return counts

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "counts": self.counts,
            "rows": [o.as_json() for o in self.outcomes],
            "resyncs_queued": self.resyncs_queued,
        }


def eligible_by_email(
    conn: Connection, source: str, settings: Settings
) -> dict[str, tuple[Teacher, ...]]:
    """The source's eligible teachers (the sync's rules: a teacher role, classes with
    students, an email that may be an identity here) by normalized email."""
    prov = settings.provisioning
    out: dict[str, list[Teacher]] = {}
    found = eligible_teachers(conn, source, prov.teacher_roles)
    for t in sorted(found, key=lambda t: t.sourced_id):
        if email_rejection(t.email, prov) is None:
            out.setdefault(normalize_email(t.email), []).append(t)
    return {k: tuple(v) for k, v in out.items()}


def candidates(conn: Connection, source: str, settings: Settings) -> list[Teacher]:
    """Eligible teachers who are neither linked nor matched by email to a user."""
    linked = linked_users(conn, source)
    groups = eligible_by_email(conn, source, settings)
    existing = users_by_email(conn, groups)
    return [
        persons[0]
        for email, persons in sorted(groups.items())
        if email not in existing and not any(p.sourced_id in linked for p in persons)
    ]


def plan_teachers(
    source: str,
    requested: Sequence[str],
    eligible: Mapping[str, tuple[Teacher, ...]],
    linked_ids: set[str],
    existing: Mapping[str, ExistingUser],
    *,
    role: str,
    roles: Sequence[str],
    site: str | None,
    sites: Sequence[str],
    settings: Settings,
    active_users: int,
    claims: Mapping[str, Mapping[str, str]] | None = None,
) -> TeacherPlan:
    """Pure: what becomes of each requested email. ``claims``: normalized email -> {sourced
    id: name} of the persons of the source an existing account of that email already has:
    as in a sync, an account is never shared by persons of different names."""
    plan = TeacherPlan()
    prov = settings.provisioning
    limit = settings.license_limit
    headroom = None if limit is None else max(limit - active_users, 0)
    seen: set[str] = set()
    for raw in requested:
        email = normalize_email(raw)

        def out(status: Status, message: str, sid: str | None = None, email: str = email) -> None:
            plan.outcomes.append(TeacherOutcome(email, status, message, sid))

        problem = email_problem(email)
        if problem:
            out(Status.INVALID_EMAIL, problem)
            continue
        if email in seen:
            out(Status.DUPLICATE_ROW, "given twice; imported once")
            continue
        seen.add(email)
        persons = eligible.get(email)
        if not persons:
            out(
                Status.FAILED,
                f"not an eligible teacher of source {source!r} (an active teacher of an active "
                "class with at least one active student)",
            )
            continue
        sid = persons[0].sourced_id
        claimants = {p.sourced_id: p.display_name for p in persons}
        claimants.update((claims or {}).get(email, {}))
        if (conflict := name_conflict(persons[0], claimants, email)) is not None:
            out(Status.FAILED, conflict, sid)  # as a sync rejects them
            continue
        try:
            role_name = resolve_name(role, roles, "role")[0]
        except LookupError as exc:
            kind, msg = exc.args
            out(Status.ROLE_AMBIGUOUS if kind == "ambiguous" else Status.ROLE_NOT_FOUND, msg, sid)
            continue
        try:
            wanted_sites = (site,) if site else sites_for(persons[0], prov)
            site_names = tuple(resolve_name(s, sites, "site")[0] for s in wanted_sites)
        except LookupError as exc:
            kind, msg = exc.args
            out(Status.SITE_AMBIGUOUS if kind == "ambiguous" else Status.SITE_NOT_FOUND, msg, sid)
            continue
        user = existing.get(email)
        unlinked = tuple(p for p in persons if p.sourced_id not in linked_ids)
        if user is not None:
            if not unlinked:
                out(Status.ALREADY_EXISTS, "already a user, linked to this source", sid)
                continue
            plan.link.append(LinkTeacher(user.user_id, unlinked))
            plan.resync.add(user.user_id)
            out(Status.UPDATED, "already a user: linked to this source; group resync queued", sid)
            continue
        if headroom is not None:
            if headroom <= 0:
                out(Status.LICENSE_LIMIT, f"the license allows {limit} active users", sid)
                continue
            headroom -= 1
        plan.create.append(
            NewTeacher(email, persons[0].display_name or email, role_name, site_names, persons)
        )
        where = ", ".join(site_names) or "no site"
        out(Status.SUCCESS, f"created as {role_name} ({where}); group resync queued", sid)
    return plan


def import_teachers(
    store: Store,
    settings: Settings,
    source: str,
    *,
    emails: Sequence[str] | None,
    role: str | None = None,
    site: str | None = None,
) -> TeachersResult:
    """``emails`` None means every candidate (``--all``)."""
    with store.write() as conn:
        sync_catalog(conn, settings)
        eligible = eligible_by_email(conn, source, settings)
        linked = linked_users(conn, source)
        if emails is None:
            emails = [normalize_email(t.email) for t in candidates(conn, source, settings)]
        existing = users_by_email(conn, [normalize_email(e) for e in emails])
        persons = account_persons(conn, source, {u.user_id for u in existing.values()})
        plan = plan_teachers(
            source,
            emails,
            eligible,
            set(linked),
            existing,
            role=role or settings.provisioning.default_role,
            roles=settings.role_names,
            site=site,
            sites=settings.sites,
            settings=settings,
            active_users=count_active_users(conn),
            claims={e: persons[u.user_id] for e, u in existing.items() if u.user_id in persons},
        )
        ids = set(plan.resync) | _apply(conn, source, plan)
        if plan.create or plan.link:
            mark_directory_changed(conn)  # a new account may be another person's link target
        queued = queue_resync(conn, ids, reason=f"teachers import from {source}", run_id=None)
    result = TeachersResult(source, plan.outcomes, queued, ids)
    structlog.get_logger().info("teachers_import_finished", source=source, **result.counts)
    return result


def _apply(conn: Connection, source: str, plan: TeacherPlan) -> set[int]:
    now = utcnow()
    role_ids = {name: rid for rid, name in conn.execute(text("SELECT id, name FROM role"))}
    site_ids = {name: sid for sid, name in conn.execute(text("SELECT id, name FROM site"))}
    created: set[int] = set()
    for new in plan.create:
        uid = _returned_id(
            conn.execute(
                insert(user)
                .values(
                    email=new.email,
                    display_name=new.display_name[:256],
                    status="active",
                    created_by=f"teachers-import:{source}",
                    created_at=now,
                    updated_at=now,
                )
                .returning(user.c.id)
            )
        )
        created.add(uid)
        conn.execute(insert(user_role).values(user_id=uid, role_id=role_ids[new.role]))
        for s in new.sites:
            conn.execute(insert(user_site).values(user_id=uid, site_id=site_ids[s]))
        _link(conn, source, uid, new.persons)
    for link in plan.link:
        _link(conn, source, link.user_id, link.persons)
    return created


def _link(conn: Connection, source: str, uid: int, persons: Sequence[Teacher]) -> None:
    conn.execute(
        insert(user_identity),
        [
            {"user_id": uid, "source": source, "external_id": p.sourced_id, "username": p.username}
            for p in persons
        ],
    )


def _returned_id(result: CursorResult[Any]) -> int:
    return int(result.scalar_one())
