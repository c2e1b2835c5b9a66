"""Read-side queries for the CLI: users, groups and queue as plain dicts (run history is
:mod:`rostersync.sync.runs`)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, bindparam, text

from rostersync.emails import normalize_email
from rostersync.store.db import as_utc


def json_dict(value: Any) -> dict[str, Any]:
    # text() queries bypass the JSON column type: SQLite hands back the stored string.
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {}
    return {}


def iso_text(value: Any) -> str | None:
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
    """The jobs ``ids``, or else up to ``limit`` jobs, running and queued first. A running job
    whose process stopped (dead on this host, or its lease ran out) keeps ``state`` running,
    as the table says until the next writer puts it back, and is marked ``interrupted`` with
    the reason: a read must not write, but it must not show a dead job as alive either."""
    if limit < 0:
        # SQLite reads LIMIT -1 as "no limit": a caller's arithmetic slip would list them all.
        raise ValueError(f"limit must be 0 or more, not {limit}")
    sql = (
        "SELECT j.id, u.email, j.state, j.attempts, j.interruptions, j.reason, j.last_error, j.live, j.run_id, "
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
        interruptions,
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
                "interruptions": interruptions,
                "reason": reason,
                "last_error": err,
                "live": bool(live),
                "run_id": run_id,
                "run_after": iso_text(run_after),
                "finished_at": iso_text(finished),
                "result": json_dict(result),
                "interrupted": False,
                "interrupted_reason": None,
            }
        )
    if any(job["state"] == "running" for job in out):
        # Here, not at the top: recovery reads sync runs, whose module reads this one.
        from rostersync.daemon.recovery import stopped_jobs

        stopped = stopped_jobs(conn)
        for job in out:
            reason = stopped.get(job["id"]) if job["state"] == "running" else None
            if reason is not None:
                job["interrupted"], job["interrupted_reason"] = True, reason
    return out
