"""Group materialisation: rebuild many users' groups from the mirror in one set-based pass.

A group mirrors one class of one source (``groups.source``, ``groups.external_id``): its owners
are the provisioned, active users who teach the class, its members the class's active
students. A user's resync makes the groups of the populated classes they teach exist and be
right, and lets go of the groups of classes they no longer teach; a group left with no owner
is removed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence, Set
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from rostersync.resync.groupplan import (
    GroupKey,
    OwnerPair,
    Wanted,
    credit_changes,
    groups_to_create,
    groups_to_refresh,
    groups_to_rename,
    owner_changes,
    owners_released,
    wanted_groups,
)
from rostersync.resync.members import stamp_updated, sync_member_marks, sync_members
from rostersync.store.db import executemany, in_text, utcnow
from rostersync.sync.mirror import ids_in, populated, teacher_role, teacher_role_params
from rostersync.sync.rules import chunks


def _desired_sql(conn: Connection, teacher_roles: Sequence[str]) -> str:
    """The groups these users (``:uids``) should own: the populated, active classes each one
    teaches as an active, enabled person of a teacher role, with an active account."""
    return f"""
    SELECT i.user_id, c.source, c.sourced_id, c.title
    FROM user_identity i
    JOIN "user" u ON u.id = i.user_id AND u.status = 'active'
    JOIN roster_enrollment te ON te.source = i.source AND te.user_id = i.external_id
    JOIN roster_person tp ON tp.source = te.source AND tp.sourced_id = te.user_id
    JOIN roster_class c ON c.source = te.source AND c.sourced_id = te.class_id
    WHERE i.user_id IN :uids AND te.role = 'teacher' AND te.status = 'active'
      AND tp.status = 'active' AND tp.enabled = :yes AND {teacher_role(conn, teacher_roles)}
      AND c.status = 'active' AND {populated(conn)}
"""


def _owners_sql(conn: Connection, teacher_roles: Sequence[str]) -> str:
    """Every owner these classes (``:ids`` of ``:src``) should have."""
    return f"""
    SELECT te.class_id, i.user_id
    FROM roster_enrollment te
    JOIN roster_person tp ON tp.source = te.source AND tp.sourced_id = te.user_id
    JOIN user_identity i ON i.source = te.source AND i.external_id = te.user_id
    JOIN "user" u ON u.id = i.user_id AND u.status = 'active'
    WHERE te.source = :src AND te.class_id IN :ids AND te.role = 'teacher'
      AND te.status = 'active' AND tp.status = 'active' AND tp.enabled = :yes
      AND {teacher_role(conn, teacher_roles)}
"""


#: A member's stored email and name, from its person (alias ``sp``): every read of members
#: says it the same way, or a group's comparison would see a change that is not there.
def _insert_groups(
    conn: Connection, keys: Sequence[GroupKey], names: Mapping[GroupKey, str], now: datetime
) -> set[GroupKey]:
    """Create these groups; returns those this transaction created.

    SQLite: one executemany (its writers take turns, so every key is new). PostgreSQL runs
    resync batches side by side, and two of them may create the group of a co-taught class
    at once: ON CONFLICT waits for the other batch and skips the group it created (with its
    members), where a plain INSERT failed the whole batch on the unique key. RETURNING says
    which groups are this batch's own, to fill and to count. Inserted in key order, two
    batches wait on each other's groups in one order and never in a cycle.
    """
    if conn.dialect.name != "postgresql":
        # One executemany, not a per-row INSERT ... RETURNING through the ORM layer.
        executemany(
            conn,
            "INSERT INTO groups (source, external_id, name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            [(src, ext, names[(src, ext)], now, now) for src, ext in keys],
            timestamps=True,
        )
        return set(keys)
    # One statement with the keys as three arrays (cheaper than a multi-row VALUES built by
    # SQLAlchemy). ORDER BY keeps the insert in key order.
    rows = conn.execute(
        text(
            "INSERT INTO groups (source, external_id, name, created_at, updated_at) "
            "SELECT k.s, k.e, k.n, :now, :now FROM unnest(CAST(:src AS text[]), "
            "CAST(:ext AS text[]), CAST(:name AS text[])) AS k(s, e, n) ORDER BY k.s, k.e "
            "ON CONFLICT (source, external_id) DO NOTHING RETURNING source, external_id"
        ),
        {
            "now": now,
            "src": [src for src, _ in keys],
            "ext": [ext for _, ext in keys],
            "name": [names[key] for key in keys],
        },
    )
    return {(src, ext) for src, ext in rows}


def rebuild_groups(
    conn: Connection,
    user_ids: Iterable[int],
    *,
    teacher_roles: Sequence[str],
    refresh_all: Iterable[int] = (),
) -> dict[int, Counter[str]]:
    """Rebuild the groups of these users; returns per-user counts of groups_created,
    groups_updated and groups_removed (each change is credited to one user of the batch).

    Owners are always made exact. Members are compared only for groups whose class a sync
    marked changed (``dirty_class``), new groups, and every group of the users in
    ``refresh_all`` (manual and live resyncs): re-reading 25 students per unchanged class
    was most of the cost of a small delta in a large district.

    Each step reads what a rule of :mod:`rostersync.resync.groupplan` needs, asks it, and
    writes its answer.
    """
    uids = sorted(set(user_ids))
    if not uids:
        return {}
    now = utcnow()
    wanted = _read_wanted(conn, uids, teacher_roles)
    by_source = wanted.classes_by_source()
    groups, owned_by_batch = _read_groups(conn, uids, by_source)

    new_keys = groups_to_create(wanted, set(groups))
    inserted = _create_groups(conn, new_keys, wanted.titles, groups, now)
    created = {groups[key][0] for key in inserted}
    touched = _rename_groups(conn, wanted, groups, now)  # group ids changed in any way

    desired_gids = {groups[key][0] for key in wanted.titles}
    refresh = groups_to_refresh(
        wanted,
        dirty=_read_dirty_classes(conn, by_source),
        created=inserted,
        refresh_all=set(refresh_all),
    )
    refresh_gids = {groups[key][0] for key in refresh}
    touched |= _sync_owners(conn, by_source, groups, desired_gids, teacher_roles)
    touched |= sync_members(conn, sorted(refresh_gids & created), new=True)
    touched |= sync_members(conn, sorted(refresh_gids - created), new=False)
    # The other wanted groups: just the members a sync marked (dirty_member).
    marks = _read_member_marks(conn, by_source, refresh, groups)
    touched |= sync_member_marks(conn, marks)

    ids = {key: gid for key, (gid, _name) in groups.items()}
    kept, removed = _release(conn, owners_released(wanted, ids, owned_by_batch))
    touched |= kept
    # A group that import owners alone keep now follows its class by itself (no teacher's
    # resync will refresh it again): its marks below go with the rest.
    touched |= follow_classes(conn, kept_by_import(conn, kept))
    key_of = {gid: key for key, gid in ids.items()}
    # The marks of the classes refreshed (or whose group is gone) have done their job.
    _clear_marks(conn, sorted(refresh | {key_of[g] for g in removed}), marks)
    updated = sorted(touched - created - removed)
    stamp_updated(conn, updated, now)
    return credit_changes(
        uids,
        wanted,
        owned_by_batch,
        key_of,
        created=[key for key in new_keys if key in inserted],
        updated=updated,
        removed=removed,
    )


def _read_wanted(conn: Connection, uids: Sequence[int], teacher_roles: Sequence[str]) -> Wanted:
    desired_sql = in_text(_desired_sql(conn, teacher_roles), "uids", dialect=conn.dialect.name)
    roles = teacher_role_params(teacher_roles)
    rows: list[Any] = []  # (user id, source, class, title)
    for chunk in chunks(uids):
        rows += conn.execute(desired_sql, {"uids": chunk, "yes": True, **roles})
    return wanted_groups(rows)


def _read_groups(
    conn: Connection, uids: Sequence[int], by_source: Mapping[str, Sequence[str]]
) -> tuple[dict[GroupKey, tuple[int, str]], dict[int, set[int]]]:
    """The existing groups (id and name by key) that the batch's users own, and those of the
    classes they want; and the batch's users who own each (by group id)."""
    groups: dict[GroupKey, tuple[int, str]] = {}
    owned_by_batch: dict[int, set[int]] = defaultdict(set)
    for chunk in chunks(uids):
        rows = conn.execute(
            in_text(
                "SELECT g.id, g.source, g.external_id, g.name, o.user_id FROM groups g "
                "JOIN group_owner o ON o.group_id = g.id "
                "WHERE o.user_id IN :uids AND o.origin = 'roster'",
                "uids",
                dialect=conn.dialect.name,
            ),
            {"uids": chunk},
        )
        for gid, src, ext, name, uid in rows:
            groups[(src, ext)] = (gid, name)
            owned_by_batch[gid].add(uid)
    for src, classes in by_source.items():
        groups.update(_groups_of_classes(conn, src, classes))
    return groups, owned_by_batch


def _groups_of_classes(
    conn: Connection, src: str, classes: Sequence[str]
) -> dict[GroupKey, tuple[int, str]]:
    """The existing groups of these classes of a source: (id, name) by key."""
    found: dict[GroupKey, tuple[int, str]] = {}
    stmt = in_text(
        "SELECT id, external_id, name FROM groups WHERE source = :src AND external_id IN :ids",
        "ids",
        dialect=conn.dialect.name,
    )
    if conn.dialect.name == "postgresql":
        # One statement over an array, not one per 500 classes (see ids_in).
        rows = conn.execute(stmt, {"src": src, "ids": classes})
        return {(src, ext): (gid, name) for gid, ext, name in rows}
    for chunk in chunks(classes):
        for gid, ext, name in conn.execute(stmt, {"src": src, "ids": chunk}):
            found[(src, ext)] = (gid, name)
    return found


def _create_groups(
    conn: Connection,
    keys: Sequence[GroupKey],
    titles: Mapping[GroupKey, str],
    groups: dict[GroupKey, tuple[int, str]],
    now: datetime,
) -> set[GroupKey]:
    """Create the groups of ``keys`` and add them to ``groups`` (with those a concurrent batch
    created meanwhile); returns the keys this transaction created."""
    if not keys:
        return set()
    inserted = _insert_groups(conn, keys, titles, now)
    by_source: dict[str, list[str]] = defaultdict(list)
    for src, ext in keys:
        by_source[src].append(ext)
    for src, exts in by_source.items():
        groups.update(_groups_of_classes(conn, src, exts))
    return inserted


def _rename_groups(
    conn: Connection, wanted: Wanted, groups: dict[GroupKey, tuple[int, str]], now: datetime
) -> set[int]:
    """Give the wanted groups their classes' titles; returns the ids of those renamed."""
    renamed = groups_to_rename(wanted, {key: groups[key][1] for key in wanted.titles})
    # One executemany: a delta run may rename hundreds of classes.
    executemany(
        conn,
        "UPDATE groups SET name = ?, updated_at = ? WHERE id = ?",
        [(wanted.titles[key], now, groups[key][0]) for key in renamed],
        timestamps=True,
    )
    for key in renamed:
        groups[key] = (groups[key][0], wanted.titles[key])
    return {groups[key][0] for key in renamed}


def _read_dirty_classes(conn: Connection, by_source: Mapping[str, Sequence[str]]) -> set[GroupKey]:
    """The wanted classes that a sync marked changed (``dirty_class``)."""
    dirty: set[GroupKey] = set()
    for src, classes in by_source.items():
        dirty |= {
            (src, c)
            for c in ids_in(
                conn,
                "SELECT class_id FROM dirty_class WHERE source = :src AND class_id IN :ids",
                classes,
                src=src,
            )
        }
    return dirty


def _sync_owners(
    conn: Connection,
    by_source: Mapping[str, Sequence[str]],
    groups: Mapping[GroupKey, tuple[int, str]],
    desired_gids: Set[int],
    teacher_roles: Sequence[str],
) -> set[int]:
    """Make the wanted groups' roster owners every active provisioned teacher of their class;
    returns the ids of the groups whose owners changed."""
    owners_sql = in_text(_owners_sql(conn, teacher_roles), "ids", dialect=conn.dialect.name)
    roles = teacher_role_params(teacher_roles)
    want: set[OwnerPair] = set()
    for src, classes in by_source.items():
        for chunk in chunks(classes):
            for cls, uid in conn.execute(
                owners_sql, {"src": src, "ids": chunk, "yes": True, **roles}
            ):
                want.add((groups[(src, cls)][0], uid))
    have: set[OwnerPair] = set()
    for chunk in chunks(sorted(desired_gids)):
        have |= {
            (g, u)
            for g, u in conn.execute(
                in_text(
                    "SELECT group_id, user_id FROM group_owner "
                    "WHERE group_id IN :ids AND origin = 'roster'",
                    "ids",
                    dialect=conn.dialect.name,
                ),
                {"ids": chunk},
            )
        }
    add, drop = owner_changes(want, have)
    # An owner an admin added by import stays an import owner (its row wins the conflict).
    if add and conn.dialect.name == "postgresql":
        # One statement over two arrays: psycopg's executemany sends a statement per row
        # (a first load's 800 owners a batch took 50 ms that way). In order, as before.
        conn.execute(
            text(
                "INSERT INTO group_owner (group_id, user_id, origin) SELECT k.g, k.u, 'roster' "
                "FROM unnest(CAST(:g AS integer[]), CAST(:u AS integer[])) AS k(g, u) "
                "ORDER BY k.g, k.u ON CONFLICT DO NOTHING"
            ),
            {"g": [g for g, _ in add], "u": [u for _, u in add]},
        )
    elif add:
        executemany(
            conn,
            "INSERT INTO group_owner (group_id, user_id, origin) VALUES (?, ?, 'roster') "
            "ON CONFLICT DO NOTHING",
            add,
        )
    executemany(
        conn,
        "DELETE FROM group_owner WHERE group_id = ? AND user_id = ? AND origin = 'roster'",
        drop,
    )
    return {g for g, _ in (*add, *drop)}


def _read_member_marks(
    conn: Connection,
    by_source: Mapping[str, Sequence[str]],
    refresh: Set[GroupKey],
    groups: Mapping[GroupKey, tuple[int, str]],
) -> list[tuple[int, str, str, str]]:
    """The members a sync marked (``dirty_member``) in the wanted groups not refreshed in
    full: (group id, source, class, person)."""
    marks: list[tuple[int, str, str, str]] = []
    stmt = in_text(
        "SELECT class_id, person_id FROM dirty_member WHERE source = :src AND class_id IN :ids",
        "ids",
        dialect=conn.dialect.name,
    )
    for src, classes in by_source.items():
        rest = [c for c in classes if (src, c) not in refresh]
        for chunk in chunks(rest):
            rows = conn.execute(stmt, {"src": src, "ids": chunk})
            marks += [(groups[(src, cls)][0], src, cls, person) for cls, person in rows]
    return marks


def _release(conn: Connection, released: Sequence[OwnerPair]) -> tuple[set[int], set[int]]:
    """Drop these roster ownerships and remove the groups left without any owner; returns
    the released groups (ids) kept and those removed."""
    let_go = {g for g, _ in released}
    if let_go and conn.dialect.name == "postgresql":
        # Batches run side by side: two releasing the last two owners of one group each saw
        # the other's ownership (not yet deleted for them) and kept the group, left with no
        # owner. Locked in id order, the second waits and then sees the first's delete.
        for chunk in chunks(sorted(let_go)):
            conn.execute(
                in_text(
                    "SELECT id FROM groups WHERE id IN :ids ORDER BY id FOR UPDATE",
                    "ids",
                    dialect=conn.dialect.name,
                ),
                {"ids": chunk},
            )
    executemany(
        conn,
        "DELETE FROM group_owner WHERE group_id = ? AND user_id = ? AND origin = 'roster'",
        released,
    )
    # Which released groups still have an owner, in a few IN-list statements, not per group.
    kept = ids_in(conn, "SELECT group_id FROM group_owner WHERE group_id IN :ids", let_go)
    removed = let_go - kept
    for chunk in chunks(sorted(removed)):
        params = {"ids": chunk}
        conn.execute(
            in_text(
                "DELETE FROM group_member WHERE group_id IN :ids", "ids", dialect=conn.dialect.name
            ),
            params,
        )
        conn.execute(
            in_text("DELETE FROM groups WHERE id IN :ids", "ids", dialect=conn.dialect.name), params
        )
    return kept, removed


def kept_by_import(conn: Connection, group_ids: Iterable[int]) -> set[int]:
    """Those of these groups that no roster owner holds: the owners an admin added by import
    alone keep them (docs/import.md, "Owners added by import")."""
    return ids_in(
        conn,
        "SELECT g.id FROM groups g WHERE g.id IN :ids AND NOT EXISTS ("
        "SELECT 1 FROM group_owner o WHERE o.group_id = g.id AND o.origin = 'roster')",
        set(group_ids),
    )


def follow_classes(conn: Connection, group_ids: Iterable[int]) -> set[int]:
    """Give groups that import owners alone keep what their class has: its title while the
    mirror holds the class (else the name they had), its active students as members (none
    once it has none, or left the source). Their class's teachers gone, no teacher's resync
    reads them again, so a sync that changes their class, and the resync that releases their
    last teacher, call this. Returns the ids of the groups changed, for the caller to stamp."""
    gids = sorted(set(group_ids))
    if not gids:
        return set()
    titles: list[tuple[int, str, str]] = []
    for chunk in chunks(gids):
        titles += conn.execute(
            in_text(
                "SELECT g.id, g.name, c.title FROM groups g JOIN roster_class c "
                "ON c.source = g.source AND c.sourced_id = g.external_id WHERE g.id IN :ids",
                "ids",
                dialect=conn.dialect.name,
            ),
            {"ids": chunk},
        ).all()
    renamed = [(title, gid) for gid, name, title in titles if title != name]
    executemany(conn, "UPDATE groups SET name = ? WHERE id = ?", renamed)
    return {gid for _, gid in renamed} | sync_members(conn, gids, new=False)


def follow_answered(
    conn: Connection, source: str, class_ids: Iterable[str], now: datetime
) -> set[int]:
    """After a live answer changed these classes in the mirror: the groups of theirs that
    import owners alone keep follow them, as after a sync (docs/import.md, "Owners added by
    import"). Returns the ids of the groups changed, stamped."""
    gids = ids_in(
        conn,
        "SELECT id FROM groups WHERE source = :src AND external_id IN :ids",
        set(class_ids),
        src=source,
    )
    followed = follow_classes(conn, kept_by_import(conn, gids))
    stamp_updated(conn, sorted(followed), now)
    return followed


def _clear_marks(
    conn: Connection, done: Sequence[GroupKey], marks: Sequence[tuple[int, str, str, str]]
) -> None:
    """Delete the sync's marks that this batch has acted on: every mark of the classes in
    ``done``, and the member marks it re-read.

    Only the classes that have marks are deleted, one statement each in key order (so that
    batches side by side lock them in one order): which ones is one read per table, where a
    delete per class cost a first load on PostgreSQL 80 ms a batch finding nothing. No mark
    can appear meanwhile: syncs write marks under the directory lock, exclusively."""
    for table in ("dirty_class", "dirty_member"):
        marked = _marked_classes(conn, table, done)
        executemany(
            conn,
            f"DELETE FROM {table} WHERE source = ? AND class_id = ?",
            [key for key in done if key in marked],
        )
    executemany(
        conn,
        "DELETE FROM dirty_member WHERE source = ? AND class_id = ? AND person_id = ?",
        sorted({(src, cls, person) for _, src, cls, person in marks}),
    )


def _marked_classes(conn: Connection, table: str, keys: Sequence[GroupKey]) -> set[GroupKey]:
    """Which of these classes have a row in ``table`` (dirty_class or dirty_member)."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for src, cls in keys:
        by_source[src].append(cls)
    return {
        (src, cls)
        for src, classes in by_source.items()
        for cls in ids_in(
            conn,
            f"SELECT DISTINCT class_id FROM {table} WHERE source = :src AND class_id IN :ids",
            classes,
            src=src,
        )
    }


def mark_dirty(
    conn: Connection,
    source: str,
    class_ids: set[str],
    pairs: set[tuple[str, str]],
    grouped: Mapping[str, int],
) -> None:
    """Tell the resyncs which classes' members to re-read in full (``class_ids``) and which
    single members to re-read (``pairs`` of class and person). Marks left from runs whose jobs
    are all done (classes nobody teaches any more) are dropped first.

    Only classes that have a group (``grouped``, from :func:`~rostersync.sync.detect.group_ids`) are marked: a new group reads all its members anyway, and
    a first run would otherwise write a mark for every enrollment of the district.
    """
    for table in ("dirty_class", "dirty_member"):
        conn.execute(
            text(
                f"DELETE FROM {table} WHERE source = :src AND NOT EXISTS "
                "(SELECT 1 FROM resync_job WHERE state IN ('queued', 'running'))"
            ),
            {"src": source},
        )
    whole = grouped.keys() & class_ids
    executemany(
        conn,
        "INSERT INTO dirty_class (source, class_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
        [(source, c) for c in sorted(whole)],
    )
    executemany(
        conn,
        "INSERT INTO dirty_member (source, class_id, person_id) VALUES (?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        sorted((source, c, p) for c, p in pairs if c in grouped and c not in whole),
    )
