"""Read-side queries for the CLI: users, groups, queue and run history as plain dicts."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, bindparam, text

from rostersync.emails import normalize_email
from rostersync.store.db import as_utc


def _json(value: Any) -> dict[str, Any]:
    # text() queries bypass the JSON column type: SQLite hands back the stored string.
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _iso(value: Any) -> str | None:
    ts = as_utc(value)
    return ts.isoformat() if ts else None


def list_users(conn: Connection) -> list[dict[str, Any]]:
    roles: dict[int, list[str]] = defaultdict(list)
    for uid, name in conn.execute(
        text(
            "SELECT ur.user_id, r.name FROM user_role ur JOIN role r ON r.id = ur.role_id ORDER BY r.name"
        )
    ):
        roles[uid].append(name)
    sites: dict[int, list[str]] = defaultdict(list)
    for uid, name in conn.execute(
        text(
            "SELECT us.user_id, s.name FROM user_site us JOIN site s ON s.id = us.site_id ORDER BY s.name"
        )
    ):
        sites[uid].append(name)
    sources: dict[int, set[str]] = defaultdict(set)
    for uid, src in conn.execute(text("SELECT user_id, source FROM user_identity")):
        sources[uid].add(src)
    out = []
    for uid, email, name, status, created_by in conn.execute(
        text('SELECT id, email, display_name, status, created_by FROM "user" ORDER BY email')
    ):
        out.append(
            {
                "email": email,
                "display_name": name,
                "roles": roles.get(uid, []),
                "sites": sites.get(uid, []),
                "status": status,
                "sources": sorted(sources.get(uid, ())),
                "created_by": created_by,
            }
        )
    return out


def user_ids_by_email(conn: Connection, emails: list[str]) -> tuple[dict[str, int], list[str]]:
    wanted = [normalize_email(e) for e in emails]
    rows = conn.execute(
        text('SELECT email, id FROM "user" WHERE email IN :e').bindparams(
            bindparam("e", expanding=True)
        ),
        {"e": wanted or [""]},
    ).all()
    found = {email: uid for email, uid in rows}
    return found, [e for e in wanted if e not in found]


def active_linked_user_ids(conn: Connection) -> list[int]:
    """The ids of active users linked to a roster (with at least one source identity)."""
    return [
        r[0]
        for r in conn.execute(
            text(
                'SELECT DISTINCT u.id FROM "user" u JOIN user_identity i ON i.user_id = u.id '
                "WHERE u.status = 'active'"
            )
        )
    ]


def list_groups(conn: Connection, owner_email: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {}
    where = ""
    if owner_email:
        where = (
            'WHERE g.id IN (SELECT o.group_id FROM group_owner o JOIN "user" u ON u.id = o.user_id '
            "WHERE u.email = :email)"
        )
        params["email"] = normalize_email(owner_email)
    groups = conn.execute(
        text(
            f"SELECT g.id, g.source, g.external_id, g.name FROM groups g {where} ORDER BY g.source, g.name, g.external_id"
        ),
        params,
    ).all()
    ids = [g[0] for g in groups]
    owners: dict[int, list[str]] = defaultdict(list)
    members: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for gid, email in conn.execute(
            text(
                'SELECT o.group_id, u.email FROM group_owner o JOIN "user" u ON u.id = o.user_id '
                "WHERE o.group_id IN :ids ORDER BY u.email"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": chunk},
        ):
            owners[gid].append(email)
        for gid, sid, email, name in conn.execute(
            text(
                "SELECT group_id, sourced_id, email, name FROM group_member WHERE group_id IN :ids "
                "ORDER BY name, sourced_id"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": chunk},
        ):
            members[gid].append({"sourced_id": sid, "email": email, "name": name})
    return [
        {
            "source": src,
            "external_id": ext,
            "name": name,
            "owners": owners.get(gid, []),
            "members": members.get(gid, []),
        }
        for gid, src, ext, name in groups
    ]


def list_jobs(
    conn: Connection, ids: list[int] | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    sql = (
        "SELECT j.id, u.email, j.state, j.attempts, j.reason, j.last_error, j.live, j.run_id, "
        'j.run_after, j.finished_at, j.result FROM resync_job j JOIN "user" u ON u.id = j.user_id '
    )
    params: dict[str, Any] = {"limit": limit}
    stmt: Any
    if ids is not None:
        stmt = text(sql + "WHERE j.id IN :ids ORDER BY j.id").bindparams(
            bindparam("ids", expanding=True)
        )
        params["ids"] = ids or [-1]
    else:
        stmt = text(
            sql
            + "ORDER BY CASE j.state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 WHEN 'failed' THEN 2 "
            "ELSE 3 END, j.id DESC LIMIT :limit"
        )
    out = []
    for (
        jid,
        email,
        state,
        attempts,
        reason,
        err,
        live,
        run_id,
        run_after,
        finished,
        result,
    ) in conn.execute(stmt, params):
        out.append(
            {
                "id": jid,
                "user": email,
                "state": state,
                "attempts": attempts,
                "reason": reason,
                "last_error": err,
                "live": bool(live),
                "run_id": run_id,
                "run_after": _iso(run_after),
                "finished_at": _iso(finished),
                "result": _json(result),
            }
        )
    return out


#: The first real run of a held run's source that succeeded after it (``{run}`` picks the
#: held run, alias ``r``): once there is one, the held run is superseded. Derived, not stored,
#: so that it can never disagree with what `runs approve` checks.
SUPERSEDED_BY = (
    "SELECT min(n.id) FROM sync_run r JOIN sync_run n ON n.source = r.source AND n.id > r.id "
    "WHERE {run} AND n.dry_run = :no AND n.status IN ('succeeded', 'succeeded_with_errors')"
)


def superseded_by(conn: Connection, run_id: int) -> int | None:
    found = conn.execute(text(SUPERSEDED_BY.format(run="r.id = :r")), {"r": run_id, "no": False})
    value = found.scalar()
    return int(value) if value is not None else None


def run_duration(started: Any, approved: Any, finished: Any) -> float | None:
    """Seconds a run took: from its start, or for an approved run from its approval (the
    hold in between is not the run's work), to its end; None while it runs."""
    start = as_utc(approved) or as_utc(started)
    end = as_utc(finished)
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def list_runs(conn: Connection, source: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Runs, newest first. A held run a later real run overtook is listed ``superseded``
    (``superseded_by`` names that run)."""
    where = "WHERE source = :source " if source else ""
    rows = conn.execute(
        text(
            "SELECT id, source, mode, status, trigger, dry_run, started_at, finished_at, counts, "
            f"hold_reason, error, approved_at FROM sync_run {where}ORDER BY id DESC LIMIT :limit"
        ),
        {"source": source, "limit": limit},
    ).all()
    out = []
    for rid, src, mode, status, trigger, dry, started, finished, counts, hold, err, ok in rows:
        newer = superseded_by(conn, rid) if status == "held" and not dry else None
        out.append(
            {
                "id": rid,
                "source": src,
                "mode": mode,
                "status": "superseded" if newer is not None else status,
                "superseded_by": newer,
                "trigger": trigger,
                "dry_run": bool(dry),
                "started_at": _iso(started),
                "finished_at": _iso(finished),
                "approved_at": _iso(ok),
                "duration_seconds": run_duration(started, ok, finished),
                "counts": _json(counts),
                "hold_reason": hold,
                "error": err,
            }
        )
    return out
