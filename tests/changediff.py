"""Change sets compared with what really happened: the difference between two pictures of the
directory, in the same plain form as a run's change set (``runs show ID --changes``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from rostersync.store.db import Store

Member = tuple[str, str | None, str]  # (sourced id, email, name)
GroupPicture = tuple[str, frozenset[str], frozenset[Member]]  # name, owner emails, members


@dataclass(frozen=True)
class Picture:
    """What the change set speaks of: user statuses, identities and one source's groups."""

    users: dict[str, str]  # email -> status
    identities: frozenset[tuple[str, str, str]]  # (source, person, email)
    groups: dict[str, GroupPicture]  # class sourced id -> group


@dataclass(frozen=True)
class Plain:
    """A change set reduced to what can be compared with a directory difference."""

    users: frozenset[tuple[str, str]]  # (action, email)
    persons: frozenset[tuple[str, str, str]]  # (create | link, email, person)
    groups: dict[str, tuple[Any, ...]]  # class -> (action, name, +owners, -owners, +m, -m)


def picture(store: Store, source: str) -> Picture:
    with store.read() as conn:
        users = {e: s for e, s in conn.execute(text('SELECT email, status FROM "user"'))}
        identities = frozenset(
            (src, ext, email)
            for src, ext, email in conn.execute(
                text(
                    'SELECT i.source, i.external_id, u.email FROM user_identity i JOIN "user" u '
                    "ON u.id = i.user_id"
                )
            )
        )
        owners: dict[int, set[str]] = {}
        for gid, email in conn.execute(
            text('SELECT o.group_id, u.email FROM group_owner o JOIN "user" u ON u.id = o.user_id')
        ):
            owners.setdefault(gid, set()).add(email)
        members: dict[int, set[Member]] = {}
        for gid, sid, email, name in conn.execute(
            text("SELECT group_id, sourced_id, email, name FROM group_member")
        ):
            members.setdefault(gid, set()).add((sid, email, name))
        groups = {
            ext: (name, frozenset(owners.get(gid, ())), frozenset(members.get(gid, ())))
            for gid, ext, name in conn.execute(
                text("SELECT id, external_id, name FROM groups WHERE source = :s"), {"s": source}
            )
        }
    return Picture(users, identities, groups)


def difference(before: Picture, after: Picture, source: str) -> Plain:
    """What happened between two pictures, as a change set would say it."""
    users: set[tuple[str, str]] = set()
    for email, status in after.users.items():
        was = before.users.get(email)
        if was is None:
            users.add(("create", email))
        elif was == "active" and status == "archived":
            users.add(("archive", email))
        elif was == "archived" and status == "active":
            users.add(("restore", email))
    persons: set[tuple[str, str, str]] = set()
    for src, person, email in after.identities - before.identities:
        if src == source:
            persons.add(("link" if email in before.users else "create", email, person))
            if email in before.users:
                users.add(("link", email))
    groups: dict[str, tuple[Any, ...]] = {}
    for ext in before.groups.keys() | after.groups.keys():
        old, new = before.groups.get(ext), after.groups.get(ext)
        if old == new:
            continue
        o_name, o_owners, o_members = old or ("", frozenset(), frozenset())
        n_name, n_owners, n_members = new or ("", frozenset(), frozenset())
        if old is None:
            action, name = "create", n_name
        elif new is None:
            action, name = "remove", o_name
        else:
            action, name = ("rename" if n_name != o_name else "update"), n_name
        o_ids = {m[0] for m in o_members}
        n_ids = {m[0] for m in n_members}
        groups[ext] = (
            action,
            name,
            frozenset(n_owners - o_owners),
            frozenset(o_owners - n_owners),
            frozenset(n_ids - o_ids),
            frozenset(o_ids - n_ids),
        )
    return Plain(frozenset(users), frozenset(persons), groups)


def plain(change_set: dict[str, Any]) -> Plain:
    """A change set's JSON (``as_json(members=True)``) in the form of :func:`difference`."""
    users = frozenset((u["action"], u["email"]) for u in change_set["users"])
    persons = frozenset(
        (u["action"], u["email"], sid)
        for u in change_set["users"]
        if u["action"] in ("create", "link")
        for sid in u["sourced_ids"]
    )
    groups: dict[str, tuple[Any, ...]] = {}
    for g in change_set["groups"]:
        members = g["members"]
        assert members is not None, "member detail missing"
        groups[g["class_sourced_id"]] = (
            g["action"],
            g["name"],
            frozenset(g["owners"]["added"]),
            frozenset(g["owners"]["removed"]),
            frozenset(m["sourced_id"] for m in members["added"]),
            frozenset(m["sourced_id"] for m in members["removed"]),
        )
        counts = (
            g["owners_added"],
            g["owners_removed"],
            g["members_added"],
            g["members_removed"],
        )
        assert counts == tuple(len(x) for x in groups[g["class_sourced_id"]][2:]), g
    return Plain(users, persons, groups)
