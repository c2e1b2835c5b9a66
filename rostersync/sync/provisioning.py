"""Provisioning's reads and writes: who is eligible, who is linked, the users, roles, sites and
identities a plan creates or changes, and the groups a run would leave without an owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, text, update

from rostersync.config.models import Settings
from rostersync.emails import normalize_email
from rostersync.store.db import executemany, in_text, utcnow
from rostersync.store.tables import role, site, user
from rostersync.sync import runs
from rostersync.sync.mirror import ids_in, teacher_role, teacher_role_params, teaches_populated
from rostersync.sync.rules import (
    NAME_CONFLICT,
    ExistingUser,
    LinkedUser,
    ProvisionPlan,
    Teacher,
    chunks,
)

# -- eligibility ------------------------------------------------------------------------------


def person_name(given: str | None, family: str | None) -> str:
    """A person's name as accounts and reports show it: given and family name."""
    return " ".join(p for p in (given, family) if p).strip()


def _rows_for(
    conn: Connection, sql: str, params: Mapping[str, Any], only: set[str] | None, column: str
) -> Iterable[Any]:
    """Rows of ``sql``, or (``only`` given) just those whose ``column`` is in ``only``."""
    if only is None:
        yield from conn.execute(text(sql), dict(params))
        return
    stmt = in_text(f"{sql} AND {column} IN :only", "only", dialect=conn.dialect.name)
    for chunk in chunks(sorted(only)):
        yield from conn.execute(stmt, {**params, "only": chunk})


def eligible_teachers(
    conn: Connection, source: str, teacher_roles: Sequence[str], only: set[str] | None = None
) -> list[Teacher]:
    """The source's candidates (see :class:`~rostersync.sync.rules.Teacher`): active, enabled
    persons of a teacher role teaching >= 1 active class with >= 1 active student (of the
    persons in ``only``, when given: a delta run looks only at the people it touched). Whether
    their email makes them eligible is the plan's to say."""
    # Everyone of the source (a full run): SQLite would walk the (source, email) index and
    # read the person rows in email order, all over the table; a scan in table order is
    # cheaper. For a delta's few ids the primary key answers.
    scan = "NOT INDEXED" if only is None and conn.dialect.name == "sqlite" else ""
    # PostgreSQL, which cannot estimate the role test, hashed every teacher enrollment of
    # the source with its class's populated test; fenced, the test is a probe of each
    # teacher's enrollments that stops at the first populated class (SQLite's plan).
    fence = " OFFSET 0" if conn.dialect.name == "postgresql" else ""
    sql = f"""
        SELECT tp.sourced_id, tp.email, tp.given_name, tp.family_name, tp.username, tp.org_ids
        FROM roster_person tp {scan}
        WHERE tp.source = :src AND tp.status = 'active' AND tp.enabled = :yes
          -- the role test first: students never teach, and it spares their enrollment probes
          AND {teacher_role(conn, teacher_roles)}
          AND EXISTS (SELECT 1 FROM roster_enrollment te
                      WHERE te.source = tp.source AND te.user_id = tp.sourced_id
                        AND {teaches_populated(conn, teacher_roles)}{fence})
    """
    orgs: dict[str, str] = {
        sid: name
        for sid, name in conn.execute(
            text("SELECT sourced_id, name FROM roster_org WHERE source = :src"), {"src": source}
        )
    }
    out = []
    params = {"src": source, "yes": True, **teacher_role_params(teacher_roles)}
    rows = _rows_for(conn, sql, params, only, "tp.sourced_id")
    for sid, email, given, family, username, org_ids in rows:
        schools = tuple(o for o in (org_ids or "").split(",") if o)
        out.append(
            Teacher(
                sourced_id=sid,
                email=email,
                display_name=person_name(given, family),
                username=username,
                school_ids=schools,
                school_names=tuple(orgs[o] for o in schools if o in orgs),
            )
        )
    return out


def persons_with_emails(
    conn: Connection, source: str, teacher_roles: Sequence[str], emails: Set[str]
) -> set[str]:
    """The active, enabled persons of a teacher role whose email, normalized, is one of
    ``emails``: a delta run decides them with the persons it touched who share an address
    (an account is shared only under one name, :func:`rules.plan_provisioning`)."""
    sql = f"""
        SELECT tp.sourced_id, tp.email FROM roster_person tp
        WHERE tp.source = :src AND tp.status = 'active' AND tp.enabled = :yes
          AND tp.email IS NOT NULL AND {teacher_role(conn, teacher_roles)}
    """
    params = {"src": source, "yes": True, **teacher_role_params(teacher_roles)}
    return {
        sid for sid, email in conn.execute(text(sql), params) if normalize_email(email) in emails
    }


def account_persons(
    conn: Connection, source: str, user_ids: Iterable[int]
) -> dict[int, dict[str, str]]:
    """The persons of this source the mirror holds that are linked to these users: user id ->
    {sourced id: name}."""
    out: dict[int, dict[str, str]] = {}
    sql = """
        SELECT i.user_id, i.external_id, p.given_name, p.family_name FROM user_identity i
        JOIN roster_person p ON p.source = i.source AND p.sourced_id = i.external_id
        WHERE i.source = :src AND i.user_id IN :ids
    """
    for chunk in chunks(sorted(set(user_ids))):
        for uid, sid, given, family in conn.execute(
            in_text(sql, "ids", dialect=conn.dialect.name), {"src": source, "ids": chunk}
        ):
            out.setdefault(uid, {})[sid] = person_name(given, family)
    return out


#: Persons the source's last applied run rejected because another person claims their email
#: under another name (rules.NAME_CONFLICT).
_NAME_CONFLICTS = f"""
    SELECT r.sourced_id FROM run_rejection r
    WHERE r.run_id = (
        SELECT max(id) FROM sync_run WHERE source = :src AND dry_run = :no
          AND status IN ('succeeded', 'succeeded_with_errors'))
      AND r.entity = 'user' AND r.reason LIKE '{NAME_CONFLICT}%'
"""


def name_conflicts(conn: Connection, source: str) -> set[str]:
    """Who the last applied run rejected for an email shared under another name: a delta
    run decides them again, as the person their email clashed with may have changed."""
    rows = conn.execute(text(_NAME_CONFLICTS), {"src": source, "no": False})
    return {sid for (sid,) in rows if sid is not None}


def linked_users(
    conn: Connection, source: str, only: set[str] | None = None
) -> dict[str, LinkedUser]:
    """This source's persons linked to a user (those in ``only``, when given)."""
    sql = """
        SELECT i.external_id, u.id, u.email, u.status, u.created_by, u.archived_by_sync,
          EXISTS (SELECT 1 FROM user_identity i2
                  JOIN roster_person p2 ON p2.source = i2.source AND p2.sourced_id = i2.external_id
                  WHERE i2.user_id = u.id AND i2.source <> :src AND p2.status = 'active')
        FROM user_identity i JOIN "user" u ON u.id = i.user_id
        WHERE i.source = :src
    """
    return {
        ext: LinkedUser(uid, ext, email, status, created_by, bool(archived), bool(elsewhere))
        for ext, uid, email, status, created_by, archived, elsewhere in _rows_for(
            conn, sql, {"src": source}, only, "i.external_id"
        )
    }


def users_by_email(conn: Connection, emails: Iterable[str]) -> dict[str, ExistingUser]:
    """Directory users by (normalized) email."""
    out: dict[str, ExistingUser] = {}
    for chunk in chunks(sorted({normalize_email(e) for e in emails})):
        rows = conn.execute(
            text('SELECT id, email, status FROM "user" WHERE email IN :emails').bindparams(
                bindparam("emails", expanding=True)
            ),
            {"emails": chunk},
        )
        for uid, email, status in rows:
            out[email] = ExistingUser(uid, email, status)
    return out


def count_active_users(conn: Connection) -> int:
    return int(
        conn.execute(text("SELECT count(*) FROM \"user\" WHERE status = 'active'")).scalar_one()
    )


# -- directory writes -----------------------------------------------------------------------


def sync_catalog(conn: Connection, settings: Settings) -> None:
    """Make the role and site rows match the config (added or updated, never deleted:
    users may still hold a role an admin removed from the file)."""
    roles = {
        name: (rid, scope, perms)
        for rid, name, scope, perms in conn.execute(
            text("SELECT id, name, scope, permissions FROM role")
        )
    }
    for spec in settings.roles:
        perms = list(spec.permissions)
        current = roles.get(spec.name)
        if current is None:
            conn.execute(insert(role).values(name=spec.name, scope=spec.scope, permissions=perms))
        elif current[1] != spec.scope or list(current[2] or []) != perms:
            conn.execute(
                update(role)
                .where(role.c.id == current[0])
                .values(scope=spec.scope, permissions=perms)
            )
    sites = {name for (name,) in conn.execute(text("SELECT name FROM site"))}
    for name in settings.sites:
        if name not in sites:
            conn.execute(insert(site).values(name=name))


def _name_ids(conn: Connection, table: str) -> dict[str, int]:
    return {name: rid for rid, name in conn.execute(text(f"SELECT id, name FROM {table}"))}


def _insert_users(
    conn: Connection, plan: ProvisionPlan, created_by: str, now: datetime
) -> dict[str, int]:
    """Create the plan's new users; their ids by email."""
    if not plan.create:
        return {}
    if conn.dialect.name == "postgresql":
        # One statement that returns the ids: looked up afterwards, the new users would be
        # found with a plan made for the table as it was (empty).
        rows = conn.execute(
            text(
                'INSERT INTO "user" (email, display_name, status, created_by, archived_by_sync, '
                "delegated, created_at, updated_at) SELECT k.e, k.n, 'active', :by, false, "
                "false, :now, :now FROM unnest(CAST(:emails AS text[]), CAST(:names AS text[])) "
                "AS k(e, n) RETURNING email, id"
            ),
            {
                "by": created_by,
                "now": now,
                "emails": [n.email for n in plan.create],
                "names": [n.display_name[:256] for n in plan.create],
            },
        )
        return {email: uid for email, uid in rows}
    executemany(
        conn,
        'INSERT INTO "user" (email, display_name, status, created_by, archived_by_sync, '
        "delegated, created_at, updated_at) VALUES (?, ?, 'active', ?, ?, ?, ?, ?)",
        [(n.email, n.display_name[:256], created_by, False, False, now, now) for n in plan.create],
        timestamps=True,
    )
    return {e: u.user_id for e, u in users_by_email(conn, [n.email for n in plan.create]).items()}


def apply_provisioning(conn: Connection, source: str, plan: ProvisionPlan) -> set[int]:
    """Carry out a provisioning plan; returns the ids of the users it created."""
    now = utcnow()
    role_ids = _name_ids(conn, "role")
    site_ids = _name_ids(conn, "site")
    created_by = f"source:{source}"
    # Bulk writes: a first sync creates every teacher of the district at once.
    ids = _insert_users(conn, plan, created_by, now)
    created = {ids[n.email] for n in plan.create}
    executemany(
        conn,
        "INSERT INTO user_role (user_id, role_id) VALUES (?, ?)",
        [(ids[n.email], role_ids[n.role]) for n in plan.create],
    )
    executemany(
        conn,
        "INSERT INTO user_site (user_id, site_id) VALUES (?, ?)",
        [(ids[n.email], site_ids[s]) for n in plan.create for s in n.sites],
    )
    executemany(
        conn,
        "INSERT INTO user_identity (user_id, source, external_id, username) VALUES (?, ?, ?, ?)",
        [
            (ids[n.email], source, ext, username)
            for n in plan.create
            for ext, username in n.identities
        ]
        + [(link.user_id, source, link.sourced_id, link.username) for link in plan.link],
    )
    if plan.restore:
        conn.execute(
            update(user)
            .where(user.c.id.in_(plan.restore))
            .values(status="active", archived_by_sync=False, updated_at=now)
        )
    if plan.archive:
        conn.execute(
            update(user)
            .where(user.c.id.in_(plan.archive))
            .values(status="archived", archived_by_sync=True, updated_at=now)
        )
    return created


def users_of_persons(conn: Connection, source: str, person_ids: set[str]) -> set[int]:
    if len(person_ids) > 2000:
        # Many persons (a first run): one read of the source's identities beats a hundred
        # IN-list queries, which PostgreSQL answered with a scan each.
        rows = conn.execute(
            text("SELECT external_id, user_id FROM user_identity WHERE source = :src"),
            {"src": source},
        )
        return {uid for ext, uid in rows if ext in person_ids}
    sql = "SELECT user_id FROM user_identity WHERE source = :src AND external_id IN :ids"
    return ids_in(conn, sql, person_ids, src=source)


def managed_counts(conn: Connection, source: str) -> tuple[int, int]:
    """(active users rostersync created from this source, groups of this source)."""
    users = conn.execute(
        text("SELECT count(*) FROM \"user\" WHERE created_by = :cb AND status = 'active'"),
        {"cb": f"source:{source}"},
    ).scalar_one()
    groups = conn.execute(
        text("SELECT count(*) FROM groups WHERE source = :src"), {"src": source}
    ).scalar_one()
    return int(users), int(groups)


#: Groups whose removal an earlier run or command decided: they have owners, every one an
#: archived user holding it from the roster, whose resync (queued by that run, or by this one:
#: :func:`leftover_owners`) releases it and so removes the group. They go whatever this run
#: does, so its safety limits do not count them: a run after a drain cut short, or after a
#: job that failed for good, was held for removals an earlier run had made (and an admin may
#: have approved).
_REMOVAL_DECIDED = """
    SELECT g.external_id FROM groups g WHERE g.source = :src AND g.external_id IN :ids
      AND EXISTS (SELECT 1 FROM group_owner o WHERE o.group_id = g.id)
      AND NOT EXISTS (
        SELECT 1 FROM group_owner o JOIN "user" u ON u.id = o.user_id
        WHERE o.group_id = g.id AND (u.status = 'active' OR o.origin <> 'roster'))
"""

#: Archived users still holding a group of the source from the roster, with no resync job
#: queued or running: the job that was to release it failed for good (or was lost). From the
#: archived users (the status index), not from the source's groups.
_LEFTOVER_OWNERS = """
    SELECT DISTINCT u.id FROM "user" u CROSS JOIN group_owner o CROSS JOIN groups g
    WHERE u.status = 'archived' AND o.user_id = u.id AND o.origin = 'roster'
      AND g.id = o.group_id AND g.source = :src
      AND NOT EXISTS (
        SELECT 1 FROM resync_job j WHERE j.user_id = u.id AND j.state IN ('queued', 'running'))
"""


#: Users linked to the source whose newest resync job failed for good (no job after it):
#: their groups stay as they were until something resyncs them again.
_FAILED_LAST = """
    SELECT DISTINCT j.user_id FROM resync_job j
    JOIN user_identity i ON i.user_id = j.user_id AND i.source = :src
    WHERE j.state = 'failed'
      AND NOT EXISTS (SELECT 1 FROM resync_job k WHERE k.user_id = j.user_id AND k.id > j.id)
"""


def failed_last(conn: Connection, source: str) -> set[int]:
    """Users of this source whose last resync failed for good (:data:`_FAILED_LAST`): a run
    queues them again, so that an outage longer than ``resync.max_attempts`` retries does
    not leave their groups behind for good."""
    return {uid for (uid,) in conn.execute(text(_FAILED_LAST), {"src": source})}


def leftover_owners(conn: Connection, source: str) -> set[int]:
    """Archived users whose groups of this source are still theirs because their resync
    never completed (:data:`_LEFTOVER_OWNERS`): a run queues them again, or the groups of a
    teacher who left would stay in the directory for good."""
    return {uid for (uid,) in conn.execute(text(_LEFTOVER_OWNERS), {"src": source})}


#: Groups of the source one of whose owners has a resync job queued or running, or whose
#: last job failed for good (the run queues it again: :func:`failed_last`). Each part starts
#: from the job's state index (CROSS JOIN fixes SQLite's order): from the source's groups it
#: read every group on every run.
_OWNED_BY_JOBS = """
    SELECT o.group_id FROM resync_job j CROSS JOIN group_owner o CROSS JOIN groups g
    WHERE o.user_id = j.user_id AND g.id = o.group_id AND g.source = :src AND """
_PENDING_OWNED = (
    f"{_OWNED_BY_JOBS} j.state IN ('queued', 'running') UNION {_OWNED_BY_JOBS} j.state = "
    "'failed' AND NOT EXISTS (SELECT 1 FROM resync_job k WHERE k.user_id = j.user_id "
    "AND k.id > j.id)"
)


def removals_pending(conn: Connection, source: str, teacher_roles: Sequence[str]) -> set[str]:
    """Groups an earlier run or command already decided to remove, whose removal a waiting
    resync job carries out (or the job of an owner whose last one failed for good, which the
    run queues again): the mirror as this run found it gives the group no eligible owner (a
    teacher who left under ``on_teacher_removed: keep`` keeps an active account, so
    :data:`_REMOVAL_DECIDED` does not see it, and the drain was cut short or the job failed).
    Call it before the run merges anything."""
    gids = {gid for (gid,) in conn.execute(text(_PENDING_OWNED), {"src": source})}
    if not gids:
        return set()
    return _without_owner(conn, source, teacher_roles, (), (), gids)


def _without_owner(
    conn: Connection,
    source: str,
    teacher_roles: Sequence[str],
    archived: Iterable[int],
    restored: Iterable[int],
    gids: set[int] | None,
) -> set[str]:
    """The classes of the source's groups (of these ``gids``; None: all) that no eligible,
    provisioned teacher teaches, the users ``archived`` not counted and those ``restored``
    counted, and that no owner an admin added (origin ``import``) keeps: resyncs release
    roster ownerships alone, and a group goes only when it has no owner left.

    On PostgreSQL the test for a few groups is fenced (``OFFSET 0``): a probe of each
    group's teacher enrollments. As an anti-join the planner, which cannot estimate the
    teacher-role test, hashed every teacher enrollment of the source for any number of
    groups (a delta at district M: 0.19-0.23 s for 300 groups, fenced 13 ms). For all the
    groups the hash is the cheaper plan and stays."""
    fence = " OFFSET 0" if gids is not None and conn.dialect.name == "postgresql" else ""
    sql = f"""
        SELECT g.external_id FROM groups g WHERE g.source = :src AND NOT EXISTS (
            SELECT 1 FROM roster_enrollment te
            JOIN roster_person tp ON tp.source = te.source AND tp.sourced_id = te.user_id
            JOIN user_identity i ON i.source = te.source AND i.external_id = te.user_id
            JOIN "user" u ON u.id = i.user_id
            WHERE te.source = g.source AND te.class_id = g.external_id
              AND (u.status = 'active' OR u.id IN :restored) AND u.id NOT IN :archived
              AND {teaches_populated(conn, teacher_roles)}{fence})
    """
    params = {
        "src": source,
        "yes": True,
        "archived": sorted(set(archived)) or [-1],
        "restored": sorted(set(restored)) or [-1],
        **teacher_role_params(teacher_roles),
    }
    classes: set[str] = set()
    if gids is None:
        classes = {c for (c,) in conn.execute(in_text(sql, "archived", "restored"), params)}
    else:
        stmt = in_text(f"{sql} AND g.id IN :gids", "archived", "restored", "gids")
        for chunk in chunks(sorted(gids)):
            classes |= {c for (c,) in conn.execute(stmt, {**params, "gids": chunk})}
    if classes:
        classes -= ids_in(conn, _KEPT_BY_IMPORT, classes, src=source)
    return classes


#: Groups of the source (by class) with an owner an admin added: no resync takes it away.
_KEPT_BY_IMPORT = """
    SELECT g.external_id FROM groups g WHERE g.source = :src AND g.external_id IN :ids
      AND EXISTS (SELECT 1 FROM group_owner o WHERE o.group_id = g.id AND o.origin <> 'roster')
"""


def groups_to_remove(
    conn: Connection,
    source: str,
    teacher_roles: Sequence[str],
    archived: Iterable[int] = (),
    only_classes: set[str] | None = None,
    *,
    restored: Iterable[int] = (),
    new_owners: Iterable[str] = (),
    decided: Set[str] = frozenset(),
) -> int:
    """Groups of this source that no eligible, provisioned teacher will own after this run.

    Not those whose removal an earlier run decided: every owner archived
    (:data:`_REMOVAL_DECIDED`), or ``decided`` (:func:`removals_pending`, before the merge).

    ``archived`` and ``restored``: the users this run archives and restores; ``new_owners``:
    the persons it links or creates accounts for, who take over the classes they teach (the
    count is made before the accounts exist). ``only_classes``: a delta run counts just the
    groups its changes can concern, those of these classes and those of the users it
    archives; no other group's owners changed.
    """
    archived = set(archived)
    candidates: set[int] | None = None
    if only_classes is not None:
        candidates = {
            gid
            for gid, ext in conn.execute(
                text("SELECT id, external_id FROM groups WHERE source = :src"), {"src": source}
            )
            if ext in only_classes
        } | ids_in(conn, "SELECT group_id FROM group_owner WHERE user_id IN :ids", archived)
    classes = _without_owner(conn, source, teacher_roles, archived, restored, candidates)
    classes -= decided
    if classes:
        classes -= ids_in(conn, _REMOVAL_DECIDED, classes, src=source)
    owners = set(new_owners)
    if classes and owners:
        taken = f"""
            SELECT te.class_id FROM roster_enrollment te
            JOIN roster_person tp ON tp.source = te.source AND tp.sourced_id = te.user_id
            WHERE te.source = :src AND te.user_id IN :ids AND {teaches_populated(conn, teacher_roles)}
        """
        classes -= ids_in(
            conn, taken, owners, src=source, yes=True, **teacher_role_params(teacher_roles)
        )
    return len(classes)


def source_identities(
    conn: Connection, source: str, user_ids: Iterable[int]
) -> dict[int, list[tuple[str, str]]]:
    """The persons of this source linked to these users: user id -> [(sourced id, name)]."""
    out: dict[int, list[tuple[str, str]]] = {}
    sql = """
        SELECT i.user_id, i.external_id, p.given_name, p.family_name FROM user_identity i
        LEFT JOIN roster_person p ON p.source = i.source AND p.sourced_id = i.external_id
        WHERE i.source = :src AND i.user_id IN :ids ORDER BY i.external_id
    """
    for chunk in chunks(sorted(set(user_ids))):
        for uid, sid, given, family in conn.execute(
            in_text(sql, "ids", dialect=conn.dialect.name), {"src": source, "ids": chunk}
        ):
            name = person_name(given, family)
            out.setdefault(uid, []).append((sid, name))
    return out


#: Groups of other sources that only users linked to the source own, none of them added by
#: an import: a resync of every user of the source rebuilds all of them. Not those whose
#: owners are all archived: their removal was decided before (see _REMOVAL_DECIDED).
_OWNED_FROM_SOURCE = """
    SELECT g.id, g.source FROM groups g WHERE g.source <> :src
      AND EXISTS (
        SELECT 1 FROM group_owner o JOIN "user" u ON u.id = o.user_id
        WHERE o.group_id = g.id AND u.status = 'active')
      AND NOT EXISTS (
        SELECT 1 FROM group_owner o WHERE o.group_id = g.id AND (o.origin <> 'roster'
          OR NOT EXISTS (
            SELECT 1 FROM user_identity i WHERE i.user_id = o.user_id AND i.source = :src)))
"""


def other_sources_removals(
    conn: Connection,
    source: str,
    teacher_roles: Sequence[str],
    archived: Iterable[int] = (),
    *,
    restored: Iterable[int] = (),
) -> tuple[int, int]:
    """(groups of other sources that a resync of every user of this source removes, groups
    of other sources it rebuilds whole): after a change of the provisioning settings the run
    resyncs every user linked to the source, and a resync rebuilds all of a user's groups,
    whatever their source. A group of another source goes when every owner is such a user
    and none of them teaches its class under ``teacher_roles`` (a role edit: the next run of
    any source removes them, and its safety limits count them). A group that another owner
    keeps, one added by an import among them, is rebuilt by nobody in this run."""
    by_source: dict[str, set[int]] = {}
    for gid, other in conn.execute(text(_OWNED_FROM_SOURCE), {"src": source}):
        by_source.setdefault(str(other), set()).add(int(gid))
    archived, restored = set(archived), set(restored)
    removed = sum(
        len(_without_owner(conn, other, teacher_roles, archived, restored, gids))
        for other, gids in by_source.items()
    )
    return removed, sum(map(len, by_source.values()))


def source_users(conn: Connection, source: str) -> set[int]:
    """Every user linked to a person of this source."""
    rows = conn.execute(
        text("SELECT user_id FROM user_identity WHERE source = :src"), {"src": source}
    )
    return {int(uid) for (uid,) in rows}


#: Put before a source's ``decided_with`` fingerprint when the directory changed outside a
#: sync (an import): the next run re-decides every teacher, as after a settings change.
DIRECTORY_CHANGED = "directory-changed:"


def mark_directory_changed(conn: Connection) -> None:
    """Users were created, linked or changed outside a sync (an import): a delta run's
    decisions for the teachers it did not touch may no longer hold (an unlinked teacher may
    now have an account to be linked to), so every source's next run decides for all."""
    runs.prefix_decided_with(conn, DIRECTORY_CHANGED)
