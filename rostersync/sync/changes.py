"""The exact change set of a held or dry run: every user and group it would change.

A held or dry run applies everything inside its transaction and then rolls it back (see
:mod:`rostersync.sync.engine`). Before it rolls back, it also rebuilds the groups of the
users it would queue for resync (what the workers would do after it, from the mirror) and
diffs the directory against a snapshot taken before it provisioned anyone:

* users come from the provisioning plan (created, linked, archived, restored), which the
  apply carries out exactly;
* groups are compared by id: created, removed, renamed, or updated (owners or members);
* members are copied once into a temporary table (one ``INSERT ... SELECT``, no rows in
  Python), and only the groups the rebuild touched are compared member by member.

The result is stored after the rollback (``run_change``) and kept until a later real run
of the source succeeds, an approval of the run included: it then describes nothing any more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, insert, select, text

from rostersync.store.db import in_text
from rostersync.store.tables import run_change
from rostersync.sync import runs
from rostersync.sync.rules import ProvisionPlan, chunks

USER_ACTIONS = ("create", "link", "archive", "restore")
GROUP_ACTIONS = ("create", "rename", "remove", "update")

#: Added and removed members listed by email in one change set; beyond it they are counted
#: only (a first sync of a large district creates a million memberships).
MEMBER_DETAIL_MAX = 100_000

REASONS = {
    "create": "teaches a class with students; no account has this email",
    "link": "teaches a class with students; an account with this email exists",
    "archive": "no longer a teacher of this source",
    "restore": "archived by a sync, and a teacher of this source again",
}

_USER_KEYS = ("action", "email", "display_name", "sourced_id", "reason")
_GROUP_KEYS = (
    "action",
    "class_sourced_id",
    "name",
    "owners_added",
    "owners_removed",
    "members_added",
    "members_removed",
)


@dataclass
class ChangeSet:
    """What applying a run does to the directory (see the module docstring)."""

    run_id: int
    users: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: each group's added and removed members are listed, not only counted
    members_listed: bool = True

    def summary(self) -> dict[str, dict[str, int]]:
        users = Counter(u["action"] for u in self.users)
        groups = Counter(g["action"] for g in self.groups)
        return {
            "users": {a: users[a] for a in USER_ACTIONS},
            "groups": {a: groups[a] for a in GROUP_ACTIONS},
        }

    def as_json(self, *, members: bool = False) -> dict[str, Any]:
        """The contract's shape; ``members`` adds each group's owners and members by email
        (``owners``/``members``: ``{"added": [...], "removed": [...]}``)."""
        groups = []
        for g in self.groups:
            out = {k: g[k] for k in _GROUP_KEYS}
            out["source"] = g.get("source")
            out["old_name"] = g.get("old_name")
            out["members_changed"] = g.get("members_changed", 0)
            if members:
                out["owners"] = g["owners"]
                out["members"] = g.get("members")
            groups.append(out)
        return {
            "run_id": self.run_id,
            "users": [
                {**{k: u[k] for k in _USER_KEYS}, "sourced_ids": u["sourced_ids"]}
                for u in self.users
            ],
            "groups": groups,
            "summary": self.summary(),
            "notes": self.notes,
            "members_listed": self.members_listed,
        }


@dataclass
class Snapshot:
    """The groups and owners before the run changes anything (members are in the temporary
    table ``rs_change_members``). Every source's: a user the run restores or links may own
    groups of another source too, and the resync after the run rebuilds those as well."""

    groups: dict[int, tuple[str, str, str, str]]  # id -> (source, class, name, updated_at)
    owners: dict[int, set[int]]


def _groups(conn: Connection) -> dict[int, tuple[str, str, str, str]]:
    rows = conn.execute(text("SELECT id, source, external_id, name, updated_at FROM groups"))
    return {int(gid): (src, ext, name, str(upd)) for gid, src, ext, name, upd in rows}


def _owners(conn: Connection) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for gid, uid in conn.execute(text("SELECT group_id, user_id FROM group_owner")):
        out.setdefault(int(gid), set()).add(int(uid))
    return out


def snapshot(conn: Connection) -> Snapshot:
    """Take the before-picture, inside the run's transaction (rolled back with it)."""
    temp = "TEMPORARY" if conn.dialect.name == "postgresql" else "TEMP"
    conn.execute(
        text(
            f"CREATE {temp} TABLE IF NOT EXISTS rs_change_members (group_id INTEGER, "
            "sourced_id VARCHAR(256), email VARCHAR(256), name VARCHAR(512))"
        )
    )
    conn.execute(text("DELETE FROM rs_change_members"))
    conn.execute(
        text(
            "INSERT INTO rs_change_members (group_id, sourced_id, email, name) "
            "SELECT group_id, sourced_id, email, name FROM group_member"
        )
    )
    conn.execute(
        text("CREATE INDEX IF NOT EXISTS rs_change_members_group ON rs_change_members (group_id)")
    )
    return Snapshot(_groups(conn), _owners(conn))


Member = tuple[str, str | None, str]  # (sourced id, email, name)


def _members(conn: Connection, table: str, ids: Iterable[int]) -> dict[int, dict[str, Member]]:
    out: dict[int, dict[str, Member]] = {}
    sql = f"SELECT group_id, sourced_id, email, name FROM {table} WHERE group_id IN :ids"
    for chunk in chunks(sorted(set(ids))):
        for gid, sid, email, name in conn.execute(
            in_text(sql, "ids", dialect=conn.dialect.name), {"ids": chunk}
        ):
            out.setdefault(int(gid), {})[sid] = (sid, email, name)
    return out


def _member_counts(conn: Connection, table: str, ids: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    sql = f"SELECT group_id, count(*) FROM {table} WHERE group_id IN :ids GROUP BY group_id"
    for chunk in chunks(sorted(set(ids))):
        for gid, n in conn.execute(in_text(sql, "ids", dialect=conn.dialect.name), {"ids": chunk}):
            out[int(gid)] = int(n)
    return out


def _emails(conn: Connection, user_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    sql = 'SELECT id, email, display_name FROM "user" WHERE id IN :ids'
    for chunk in chunks(sorted(set(user_ids))):
        for uid, email, name in conn.execute(
            in_text(sql, "ids", dialect=conn.dialect.name), {"ids": chunk}
        ):
            out[int(uid)] = (email, name)
    return out


def _persons(conn: Connection, source: str, user_ids: Iterable[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    sql = (
        "SELECT user_id, external_id FROM user_identity WHERE source = :src AND user_id IN :ids "
        "ORDER BY external_id"
    )
    for chunk in chunks(sorted(set(user_ids))):
        for uid, ext in conn.execute(
            in_text(sql, "ids", dialect=conn.dialect.name), {"src": source, "ids": chunk}
        ):
            out.setdefault(int(uid), []).append(ext)
    return out


def _why_not_teaching(
    conn: Connection,
    source: str,
    persons: Iterable[str],
    teacher_roles: Sequence[str],
    scoped_out: Set[str] = frozenset(),
) -> dict[str, str]:
    """Why each of these persons is no longer a teacher of the source, as the mirror has it
    after the run (the first of: gone, left out by the source's scope, not active, disabled,
    not of a teacher role, no populated class). ``scoped_out``: the persons the source sent
    and its scope left out, whom the mirror no longer holds either."""
    ids = sorted(set(persons))
    found: dict[str, tuple[str, bool, str]] = {}
    sql = (
        "SELECT sourced_id, status, enabled, roles FROM roster_person "
        "WHERE source = :src AND sourced_id IN :ids"
    )
    for chunk in chunks(ids):
        for sid, status, enabled, roles in conn.execute(
            in_text(sql, "ids", dialect=conn.dialect.name), {"src": source, "ids": chunk}
        ):
            found[sid] = (status, bool(enabled), roles or "")
    wanted = {r.lower() for r in teacher_roles}
    out: dict[str, str] = {}
    for sid in ids:
        if sid in scoped_out:
            out[sid] = "outside the source's scope (its schools setting)"
            continue
        if sid not in found:
            out[sid] = "gone from the source"
            continue
        status, enabled, roles = found[sid]
        held = {r for r in roles.split(",") if r}
        if status != "active":
            out[sid] = f"marked {status} in the source"
        elif not enabled:
            out[sid] = "disabled in the source"
        elif not held & wanted:
            out[sid] = f"no longer of a teacher role (roles: {', '.join(sorted(held)) or 'none'})"
        else:
            out[sid] = "teaches no active class with active students"
    return out


def _user_changes(
    conn: Connection,
    source: str,
    plan: ProvisionPlan,
    teacher_roles: Sequence[str],
    scoped_out: Set[str] = frozenset(),
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(action: str, email: str, name: str, sids: Sequence[str], why: str = "") -> None:
        rows.append(
            {
                "action": action,
                "email": email,
                "display_name": name,
                "sourced_id": sids[0] if sids else None,
                "sourced_ids": list(sids),
                "reason": REASONS[action] + (f": {why}" if why else ""),
            }
        )

    for new in plan.create:
        add("create", new.email, new.display_name[:256], sorted(s for s, _ in new.identities))
    moved = [*plan.archive, *plan.restore]
    users = _emails(conn, [*moved, *(link.user_id for link in plan.link)])
    for link in plan.link:
        known = users.get(link.user_id)
        add("link", link.email, known[1] if known else link.display_name, [link.sourced_id])
    persons = _persons(conn, source, moved)
    why = _why_not_teaching(
        conn,
        source,
        (p for u in plan.archive for p in persons.get(u, [])),
        teacher_roles,
        scoped_out,
    )
    for action, ids in (("archive", plan.archive), ("restore", plan.restore)):
        for uid in sorted(set(ids)):
            email, name = users.get(uid, ("?", ""))
            sids = persons.get(uid, [])
            reasons = sorted({why[p] for p in sids if p in why}) if action == "archive" else []
            add(action, email, name, sids, "; ".join(reasons))
    order = {a: i for i, a in enumerate(USER_ACTIONS)}
    rows.sort(key=lambda r: (order[r["action"]], r["email"], r["sourced_id"] or ""))
    return rows


def _listing(members: Iterable[Member]) -> list[dict[str, str | None]]:
    return [{"sourced_id": s, "email": e, "name": n} for s, e, n in members]


def _whole_group(
    action: str, group: Any, owners: list[str], n_members: int, members: list[Member] | None
) -> dict[str, Any]:
    """The row of a group created (everything added) or removed (everything removed)."""
    src, ext, name, _ = group
    add = action == "create"
    return {
        "action": action,
        "source": src,
        "class_sourced_id": ext,
        "name": name,
        "owners_added": len(owners) if add else 0,
        "owners_removed": 0 if add else len(owners),
        "members_added": n_members if add else 0,
        "members_removed": 0 if add else n_members,
        "owners": {"added": owners if add else [], "removed": [] if add else owners},
        "members": None
        if members is None
        else {
            "added": _listing(members) if add else [],
            "removed": [] if add else _listing(members),
        },
    }


def collect(
    conn: Connection,
    source: str,
    run_id: int,
    before: Snapshot,
    plan: ProvisionPlan,
    *,
    teacher_roles: Sequence[str],
    notes: Sequence[str] = (),
    scoped_out: Set[str] = frozenset(),
) -> ChangeSet:
    """The change set, once the run's provisioning and the resync of its users are applied
    (still inside the transaction that is about to be rolled back). ``scoped_out``: the
    persons the source sent and its scope left out."""
    after = Snapshot(_groups(conn), _owners(conn))
    created = sorted(set(after.groups) - set(before.groups))
    removed = sorted(set(before.groups) - set(after.groups))
    kept = sorted(set(before.groups) & set(after.groups))
    # A group whose owners, name or members changed was stamped (updated_at) by the rebuild.
    touched = [
        g
        for g in kept
        if after.groups[g] != before.groups[g]
        or after.owners.get(g, set()) != before.owners.get(g, set())
    ]
    added_n = _member_counts(conn, "group_member", created)
    removed_n = _member_counts(conn, "rs_change_members", removed)
    now = _members(conn, "group_member", touched)
    was = _members(conn, "rs_change_members", touched)
    total = sum(added_n.values()) + sum(removed_n.values())
    diffs: dict[int, tuple[list[Member], list[Member], int]] = {}
    for g in touched:
        a, b = now.get(g, {}), was.get(g, {})
        plus = [a[s] for s in sorted(a.keys() - b.keys())]
        minus = [b[s] for s in sorted(b.keys() - a.keys())]
        changed = sum(1 for s in a.keys() & b.keys() if a[s] != b[s])
        diffs[g] = (plus, minus, changed)
        total += len(plus) + len(minus)
    listed = total <= MEMBER_DETAIL_MAX
    detail_new = _members(conn, "group_member", created) if listed else {}
    detail_gone = _members(conn, "rs_change_members", removed) if listed else {}
    users = _emails(
        conn,
        {u for g in (*created, *touched) for u in after.owners.get(g, ())}
        | {u for g in (*removed, *touched) for u in before.owners.get(g, ())},
    )

    def emails(ids: Iterable[int]) -> list[str]:
        return sorted(users[u][0] for u in ids if u in users)

    groups: list[dict[str, Any]] = []
    for g in created:
        members = sorted(detail_new.get(g, {}).values()) if listed else None
        owners = emails(after.owners.get(g, ()))
        groups.append(_whole_group("create", after.groups[g], owners, added_n.get(g, 0), members))
    for g in removed:
        members = sorted(detail_gone.get(g, {}).values()) if listed else None
        owners = emails(before.owners.get(g, ()))
        groups.append(
            _whole_group("remove", before.groups[g], owners, removed_n.get(g, 0), members)
        )
    for g in touched:
        src, ext, name, _ = after.groups[g]
        old_name = before.groups[g][2]
        plus, minus, changed = diffs[g]
        owners_now, owners_was = after.owners.get(g, set()), before.owners.get(g, set())
        if name == old_name and not (plus or minus or changed) and owners_now == owners_was:
            continue  # stamped, nothing else (a member re-read that found no change)
        groups.append(
            {
                "action": "rename" if name != old_name else "update",
                "source": src,
                "class_sourced_id": ext,
                "name": name,
                "old_name": old_name if name != old_name else None,
                "owners_added": len(owners_now - owners_was),
                "owners_removed": len(owners_was - owners_now),
                "members_added": len(plus),
                "members_removed": len(minus),
                "members_changed": changed,
                "owners": {
                    "added": emails(owners_now - owners_was),
                    "removed": emails(owners_was - owners_now),
                },
                "members": {"added": _listing(plus), "removed": _listing(minus)}
                if listed
                else None,
            }
        )
    order = {a: i for i, a in enumerate(GROUP_ACTIONS)}
    # The run's own source first; another's groups change when a user it restores or links
    # teaches there too.
    groups.sort(
        key=lambda r: (
            r["source"] != source,
            order[r["action"]],
            r["source"],
            r["class_sourced_id"],
        )
    )
    out_notes = list(notes)
    if not listed:
        out_notes.append(
            f"{total} members are added or removed: more than {MEMBER_DETAIL_MAX}, so they "
            "are counted per group but not listed"
        )
    users_changed = _user_changes(conn, source, plan, teacher_roles, scoped_out)
    return ChangeSet(run_id, users_changed, groups, out_notes, listed)


# -- storage ----------------------------------------------------------------------------------


def save(conn: Connection, changes: ChangeSet) -> None:
    conn.execute(delete(run_change).where(run_change.c.run_id == changes.run_id))
    conn.execute(
        insert(run_change).values(
            run_id=changes.run_id,
            users=changes.users,
            groups=changes.groups,
            notes=changes.notes,
            members_listed=changes.members_listed,
        )
    )


def load(conn: Connection, run_id: int) -> ChangeSet | None:
    row = conn.execute(select(run_change).where(run_change.c.run_id == run_id)).first()
    if row is None:
        return None
    r = row._mapping
    return ChangeSet(
        run_id, list(r["users"]), list(r["groups"]), list(r["notes"]), bool(r["members_listed"])
    )


def forget(conn: Connection, source: str, up_to: int) -> None:
    """A real run of the source succeeded (``up_to``, an approval included): the change sets
    of it and of every earlier run of the source no longer describe anything, nor do those
    of its dry runs (a dry run made after a held run that is approved now included)."""
    stale = runs.stale_run_ids(source, up_to)
    conn.execute(delete(run_change).where(run_change.c.run_id.in_(stale)))


def summary_text(summary: Mapping[str, Mapping[str, int]]) -> str:
    """``users: archive 27; groups: remove 86, update 3`` (actions with none left out)."""
    parts = []
    for kind in ("users", "groups"):
        shown = [f"{a} {n}" for a, n in summary[kind].items() if n]
        parts.append(f"{kind}: {', '.join(shown) or 'no change'}")
    return "; ".join(parts)
