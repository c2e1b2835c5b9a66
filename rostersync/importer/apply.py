"""Carry out an import: one transaction for the whole file, one savepoint per row.

The whole import commits or nothing does (a crash leaves nothing half-applied). Inside it each
row is written under a savepoint, so a row the database refuses after all (a concurrent
writer took the email a moment ago) becomes ``Failed`` on its own while the other rows go in.

A dry run runs exactly the same code, writes included, and then rolls the transaction back:
the preview and the import agree row by row because they are the same computation. Dry runs
leave no trace (no ``import_run`` either): "changes nothing" is meant literally.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy import Connection, CursorResult, delete, insert, text, update
from sqlalchemy.exc import SQLAlchemyError

from rostersync.config.models import Settings
from rostersync.emails import normalize_email
from rostersync.importer.columns import match_columns
from rostersync.importer.errors import ImportRefused
from rostersync.importer.outbox import queue_verification
from rostersync.importer.plan import (
    OPERATOR,
    Actor,
    Change,
    Directory,
    GroupInfo,
    Policy,
    RoleInfo,
    RowOutcome,
    UserInfo,
    actor_for,
    plan_import,
)
from rostersync.importer.reader import Sheet
from rostersync.importer.rows import RowInput, parse_row
from rostersync.importer.statuses import Status, empty_counts
from rostersync.logs import scrub
from rostersync.resync.queue import queue_resync
from rostersync.store.db import Store, in_text, unusable, utcnow
from rostersync.store.tables import (
    group_owner,
    import_row,
    import_run,
    user,
    user_identity,
    user_role,
    user_site,
)
from rostersync.sync.provisioning import (
    count_active_users,
    mark_directory_changed,
    sync_catalog,
)
from rostersync.sync.rules import chunks

CREATED_BY = "import"


@dataclass
class ImportResult:
    file_name: str
    actor: str  # the --as email, or "operator"
    dry_run: bool
    rows: list[RowOutcome]
    warnings: list[str] = field(default_factory=list)
    import_id: int | None = None
    verifications_queued: int = 0
    resyncs_queued: int = 0
    #: the users whose group resyncs the import queued (what became of them is the CLI's)
    resync_users: set[int] = field(default_factory=set)

    @property
    def counts(self) -> dict[str, int]:
        counts = empty_counts()
        for r in self.rows:
            counts[r.status.count_key] += 1
        return counts

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "counts": self.counts,
            "rows": [r.as_json() for r in self.rows],
            "import_id": self.import_id,
            "file": self.file_name,
            "actor": self.actor,
            "warnings": self.warnings,
            "verifications_queued": self.verifications_queued,
            "resyncs_queued": self.resyncs_queued,
        }


def policy_from(settings: Settings) -> Policy:
    google = tuple(
        sorted(n for n, s in settings.sources.items() if s.type == "google_classroom" and s.enabled)
    )
    return Policy(
        license_limit=settings.license_limit,
        default_role=settings.provisioning.default_role,
        default_site=settings.provisioning.default_site,
        google_sources=google,
    )


def parse_sheet(sheet: Sheet, settings: Settings) -> tuple[list[RowInput], list[str]]:
    """Rows parsed on their own; refuses the file (ImportRefused) if a required column is missing."""
    columns = match_columns(sheet.headers, sheet.name)
    warnings = list(sheet.warnings)
    warnings += [f"unknown column {h!r} ignored" for h in columns.unknown]
    return [parse_row(raw, columns, settings.sources) for raw in sheet.rows], warnings


class _Rollback(Exception):
    """Raised to end a dry run's transaction without committing it."""


def run_import(
    store: Store,
    settings: Settings,
    sheet: Sheet,
    *,
    actor_email: str | None = None,
    dry_run: bool = False,
) -> ImportResult:
    rows, warnings = parse_sheet(sheet, settings)
    # The log line, the JSON and the stored import_run name the actor alike: the --as email
    # (lower-cased), else "operator".
    label = normalize_email(actor_email) if actor_email else OPERATOR.label
    log = structlog.get_logger().bind(file=sheet.name, dry_run=dry_run, actor=label)
    result = ImportResult(sheet.name, label, dry_run, [], warnings)
    started = utcnow()
    try:
        with store.write() as conn:
            sync_catalog(conn, settings)
            actor = load_actor(conn, actor_email) if actor_email else OPERATOR
            directory = load_directory(conn, rows, settings)
            planned = plan_import(rows, directory, actor, policy_from(settings))
            result.rows = _write(conn, planned, settings, result)
            if dry_run:
                raise _Rollback
            result.import_id = _record(conn, result, started)
    except _Rollback:
        pass
    log.info("import_finished", import_id=result.import_id, rows=len(result.rows), **result.counts)
    return result


# -- reading the directory --------------------------------------------------------------------


def _json_list(value: Any) -> tuple[str, ...]:
    # text() bypasses the JSON column type: SQLite hands back the stored string.
    if isinstance(value, str):
        value = json.loads(value) if value else []
    return tuple(value or ())


def _roles(conn: Connection) -> list[tuple[int, RoleInfo]]:
    return [
        (rid, RoleInfo(name, scope, _json_list(perms)))
        for rid, name, scope, perms in conn.execute(
            text("SELECT id, name, scope, permissions FROM role ORDER BY id")
        )
    ]


def load_actor(conn: Connection, email: str) -> Actor:
    email = normalize_email(email)
    row = conn.execute(text('SELECT id, status FROM "user" WHERE email = :e'), {"e": email}).first()
    if row is None:
        raise ImportRefused(f"--as {email}: no such user")
    uid, status = row
    role_ids = {
        r
        for (r,) in conn.execute(
            text("SELECT role_id FROM user_role WHERE user_id = :u"), {"u": uid}
        )
    }
    roles = [info for rid, info in _roles(conn) if rid in role_ids]
    sites = [
        name
        for (name,) in conn.execute(
            text(
                "SELECT s.name FROM user_site us JOIN site s ON s.id = us.site_id WHERE us.user_id = :u"
            ),
            {"u": uid},
        )
    ]
    return actor_for(email, roles, sites, active=status == "active")


def load_directory(conn: Connection, rows: Sequence[RowInput], settings: Settings) -> Directory:
    """The snapshot the rules need: catalog, groups, and only the users the file names."""
    roles = tuple(info for _rid, info in _roles(conn))
    sites = tuple(name for (name,) in conn.execute(text("SELECT name FROM site ORDER BY id")))
    groups: tuple[GroupInfo, ...] = ()
    if any(r.groups for r in rows):
        owner_sites: dict[int, set[str]] = defaultdict(set)
        for gid, site in conn.execute(
            text(
                "SELECT o.group_id, s.name FROM group_owner o "
                "JOIN user_site us ON us.user_id = o.user_id JOIN site s ON s.id = us.site_id"
            )
        ):
            owner_sites[gid].add(site)
        groups = tuple(
            GroupInfo(gid, name, source, frozenset(owner_sites.get(gid, ())))
            for gid, name, source in conn.execute(
                text("SELECT id, name, source FROM groups ORDER BY id")
            )
        )
    users = _users(conn, {r.email for r in rows if r.problem is None})

    wanted: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        for source, username in r.source_usernames:
            wanted[source].add(username.lower())
    person_by_username: dict[tuple[str, str], str] = {}
    identity_owner: dict[tuple[str, str], int] = {}
    for source, names in wanted.items():
        for chunk in chunks(sorted(names)):
            for sid, username in conn.execute(
                in_text(
                    "SELECT sourced_id, lower(username) FROM roster_person "
                    "WHERE source = :src AND lower(username) IN :names ORDER BY sourced_id",
                    "names",
                    dialect=conn.dialect.name,
                ),
                {"src": source, "names": chunk},
            ):
                person_by_username.setdefault((source, username), sid)
        exts = {person_by_username.get((source, n), "") for n in names} | set()
        exts |= {f"username:{u}" for r in rows for s, u in r.source_usernames if s == source}
        for chunk in chunks(sorted(e for e in exts if e)):
            for ext, uid in conn.execute(
                in_text(
                    "SELECT external_id, user_id FROM user_identity "
                    "WHERE source = :src AND external_id IN :ids",
                    "ids",
                    dialect=conn.dialect.name,
                ),
                {"src": source, "ids": chunk},
            ):
                identity_owner[(source, ext)] = uid
    return Directory(
        roles=roles,
        sites=sites,
        groups=groups,
        users=users,
        active_users=count_active_users(conn),
        identity_owner=identity_owner,
        person_by_username=person_by_username,
    )


def _users(conn: Connection, emails: Iterable[str]) -> dict[str, UserInfo]:
    base: dict[int, dict[str, Any]] = {}
    for chunk in chunks(sorted(emails)):
        for uid, email, name, status, delegated in conn.execute(
            in_text(
                'SELECT id, email, display_name, status, delegated FROM "user" WHERE email IN :e',
                "e",
                dialect=conn.dialect.name,
            ),
            {"e": chunk},
        ):
            base[uid] = {
                "email": email,
                "name": name,
                "status": status,
                "delegated": bool(delegated),
            }
    roles: dict[int, list[str]] = defaultdict(list)
    sites: dict[int, list[str]] = defaultdict(list)
    groups: dict[int, set[int]] = defaultdict(set)
    idents: dict[int, set[tuple[str, str]]] = defaultdict(set)
    for chunk in chunks(sorted(base)):
        p = {"u": chunk}
        for uid, name in conn.execute(
            in_text(
                "SELECT ur.user_id, r.name FROM user_role ur JOIN role r ON r.id = ur.role_id "
                "WHERE ur.user_id IN :u ORDER BY r.name",
                "u",
                dialect=conn.dialect.name,
            ),
            p,
        ):
            roles[uid].append(name)
        for uid, name in conn.execute(
            in_text(
                "SELECT us.user_id, s.name FROM user_site us JOIN site s ON s.id = us.site_id "
                "WHERE us.user_id IN :u ORDER BY s.name",
                "u",
                dialect=conn.dialect.name,
            ),
            p,
        ):
            sites[uid].append(name)
        for uid, gid in conn.execute(
            in_text(
                "SELECT user_id, group_id FROM group_owner WHERE user_id IN :u",
                "u",
                dialect=conn.dialect.name,
            ),
            p,
        ):
            groups[uid].add(gid)
        for uid, src, ext in conn.execute(
            in_text(
                "SELECT user_id, source, external_id FROM user_identity WHERE user_id IN :u",
                "u",
                dialect=conn.dialect.name,
            ),
            p,
        ):
            idents[uid].add((src, ext))
    return {
        b["email"]: UserInfo(
            id=uid,
            email=b["email"],
            display_name=b["name"],
            status=b["status"],
            delegated=b["delegated"],
            roles=tuple(roles[uid]),
            sites=tuple(sites[uid]),
            groups=frozenset(groups[uid]),
            identities=frozenset(idents[uid]),
        )
        for uid, b in base.items()
    }


# -- writing ----------------------------------------------------------------------------------


def _roster_linked(conn: Connection, user_ids: set[int]) -> set[int]:
    """Those of these users linked to a roster person (whose classes are groups)."""
    out: set[int] = set()
    sql = in_text(
        "SELECT DISTINCT user_id FROM user_identity WHERE user_id IN :u "
        "AND external_id NOT LIKE 'username:%'",
        "u",
        dialect=conn.dialect.name,
    )
    for chunk in chunks(sorted(user_ids)):
        out |= {uid for (uid,) in conn.execute(sql, {"u": chunk})}
    return out


def _name_ids(conn: Connection, table: str) -> dict[str, int]:
    return {name: rid for rid, name in conn.execute(text(f"SELECT id, name FROM {table}"))}


def _write(
    conn: Connection, planned: list[RowOutcome], settings: Settings, result: ImportResult
) -> list[RowOutcome]:
    role_ids = _name_ids(conn, "role")
    site_ids = _name_ids(conn, "site")
    live: set[int] = set()
    linked: set[int] = set()
    restatused: set[int] = set()  # existing users archived or reactivated
    out: list[RowOutcome] = []
    for outcome in planned:
        change = outcome.change
        if change is None:
            out.append(outcome)
            continue
        try:
            with conn.begin_nested():
                uid = _apply_change(conn, change, role_ids, site_ids)
                if change.send_verification and queue_verification(
                    conn,
                    uid,
                    change.email,
                    change.display_name or change.email,
                    settings.organization,
                ):
                    result.verifications_queued += 1
        except SQLAlchemyError as exc:
            if unusable(exc) is not None:
                raise  # a full disk or a lost server is no row's fault: the import stops
            reason = scrub(str(getattr(exc, "orig", exc)))[:300]
            structlog.get_logger().warning("import_row_failed", row=outcome.row, error=reason)
            out.append(
                replace(outcome, status=Status.FAILED, message=f"not saved: {reason}", change=None)
            )
            continue
        if change.live_resync:
            live.add(uid)
        if any(not ext.startswith("username:") for _s, ext, _u in change.add_identities):
            linked.add(uid)  # linked to a roster person: their classes become groups
        elif change.status is not None and change.user_id is not None:
            restatused.add(uid)
        out.append(outcome)
    if any(o.change is not None for o in out):
        mark_directory_changed(conn)
    # Plain resyncs first: queue_resync upgrades a queued job to live, never the reverse.
    # An archived user owns no roster group, a reactivated one owns their classes' again.
    restated = _roster_linked(conn, restatused - linked - live)
    result.resyncs_queued += queue_resync(
        conn, linked - live, reason="import: source username linked", run_id=None
    )
    result.resyncs_queued += queue_resync(
        conn, restated, reason="import: status changed", run_id=None
    )
    result.resyncs_queued += queue_resync(
        conn, live, reason="import: DataSync (live)", run_id=None, live=True
    )
    result.resync_users |= (linked - live) | restated | live
    return out


def _apply_change(
    conn: Connection, c: Change, role_ids: dict[str, int], site_ids: dict[str, int]
) -> int:
    now = utcnow()
    if c.user_id is None:
        uid = _returned_id(
            conn.execute(
                insert(user)
                .values(
                    email=c.email,
                    display_name=c.display_name,
                    status=c.status or "active",
                    created_by=CREATED_BY,
                    delegated=bool(c.delegated),
                    created_at=now,
                    updated_at=now,
                )
                .returning(user.c.id)
            )
        )
    else:
        uid = c.user_id
        values: dict[str, Any] = {
            k: v
            for k, v in (
                ("display_name", c.display_name),
                ("status", c.status),
                ("delegated", c.delegated),
            )
            if v is not None
        }
        if c.status == "active":
            values["archived_by_sync"] = False
        if values or c.roles is not None or c.sites is not None:
            conn.execute(update(user).where(user.c.id == uid).values(updated_at=now, **values))
        if c.roles is not None:
            conn.execute(delete(user_role).where(user_role.c.user_id == uid))
        if c.sites is not None:
            conn.execute(delete(user_site).where(user_site.c.user_id == uid))
    if c.roles:
        conn.execute(insert(user_role), [{"user_id": uid, "role_id": role_ids[r]} for r in c.roles])
    if c.sites:
        conn.execute(insert(user_site), [{"user_id": uid, "site_id": site_ids[s]} for s in c.sites])
    if c.add_groups:
        conn.execute(
            insert(group_owner),
            [{"group_id": g, "user_id": uid, "origin": "import"} for g in c.add_groups],
        )
    if c.add_identities:
        conn.execute(
            insert(user_identity),
            [
                {"user_id": uid, "source": s, "external_id": e, "username": u}
                for s, e, u in c.add_identities
            ],
        )
    return uid


def _record(conn: Connection, result: ImportResult, started: Any) -> int:
    import_id = _returned_id(
        conn.execute(
            insert(import_run)
            .values(
                file_name=result.file_name[:1024],
                actor=result.actor,
                dry_run=result.dry_run,
                counts=result.counts,
                started_at=started,
                finished_at=utcnow(),
            )
            .returning(import_run.c.id)
        )
    )
    if result.rows:
        conn.execute(
            insert(import_row),
            [
                {
                    "import_id": import_id,
                    "row": r.row,
                    "email": r.email[:512] or None,
                    "status": str(r.status),
                    "message": r.message[:2000],
                }
                for r in result.rows
            ],
        )
    return import_id


def _returned_id(result: CursorResult[Any]) -> int:
    return int(result.scalar_one())
