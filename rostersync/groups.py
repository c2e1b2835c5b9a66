"""Group materialisation: rebuild many users' groups from the mirror in one set-based pass.

A group mirrors one class of one source (``groups.source``, ``groups.external_id``): its owners
are the provisioned, active users who teach the class, its members the class's active
students. A user's resync makes the groups of the populated classes they teach exist and be
right, and lets go of the groups of classes they no longer teach; a group left with no owner
is removed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import Connection, DateTime, bindparam, text

from rostersync.store.db import copy_rows, executemany, in_text, utcnow
from rostersync.sync.apply import POPULATED, ids_in, teacher_role, teacher_role_params
from rostersync.sync.plan import chunks

GroupKey = tuple[str, str]  # (source, class sourced_id)


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
      AND c.status = 'active' AND {POPULATED}
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
_MEMBER_VALUES = """NULLIF(LOWER(TRIM(COALESCE(sp.email, ''))), '') AS email,
        TRIM(COALESCE(sp.given_name, '') || ' ' || COALESCE(sp.family_name, '')) AS name"""

#: The members a group should have (alias ``g``): its class's active students, as stored.
#: A student enrolled twice in one class appears twice (no DISTINCT: sorting a million rows
#: to drop a rare repeat cost more than letting the insert's ON CONFLICT skip it).
_DESIRED_MEMBERS = f"""
    SELECT g.id AS group_id, sp.sourced_id AS sourced_id,
        {_MEMBER_VALUES}
    FROM groups g
    JOIN roster_enrollment se ON se.source = g.source AND se.class_id = g.external_id
        AND se.role = 'student' AND se.status = 'active'
    JOIN roster_person sp ON sp.source = se.source AND sp.sourced_id = se.user_id
        AND sp.status = 'active'
    WHERE g.id IN :ids
"""


def _new_members_sql(dialect: str) -> str:
    """Fill just-created groups. A student enrolled twice in a class must not stop the insert:
    SQLite skips the repeat on conflict (cheaper than sorting a million rows to drop it);
    PostgreSQL drops it with DISTINCT ON and inserts plainly, as the groups are new to this
    transaction: its ON CONFLICT inserts speculatively, a fifth slower per row."""
    insert = "INSERT INTO group_member (group_id, sourced_id, email, name) "
    if dialect == "postgresql":
        return (
            f"{insert}SELECT DISTINCT ON (d.group_id, d.sourced_id) d.group_id, d.sourced_id, "
            f"d.email, d.name FROM ({_DESIRED_MEMBERS}) d"
        )
    # WHERE true: SQLite would read ON CONFLICT as part of the SELECT's join.
    return (
        f"{insert}SELECT d.group_id, d.sourced_id, d.email, d.name FROM ({_DESIRED_MEMBERS}) d "
        "WHERE true ON CONFLICT DO NOTHING"
    )


def sync_members(conn: Connection, group_ids: Sequence[int], *, new: bool) -> set[int]:
    """Make these groups' members exactly their classes' active students, inside the database
    (a district's million member rows never travel through Python). ``new``: the groups were
    just created, so there is nothing to compare. Returns the groups whose members changed."""
    changed: set[int] = set()
    for chunk in chunks(sorted(group_ids)):
        params = {"ids": chunk}
        if new:
            conn.execute(in_text(_new_members_sql(conn.dialect.name), "ids"), params)
            continue
        # Existing groups: compare in Python. (Set-based UPDATE ... FROM and anti-join
        # DELETE were slower here: SQLite walked 25 enrollments per member to find one.)
        want: dict[tuple[int, str], tuple[str | None, str]] = {
            (g, sid): (email, name)
            for g, sid, email, name in conn.execute(in_text(_DESIRED_MEMBERS, "ids"), params)
        }
        have: dict[tuple[int, str], tuple[str | None, str]] = {
            (g, sid): (email, name)
            for g, sid, email, name in conn.execute(
                in_text(
                    "SELECT group_id, sourced_id, email, name FROM group_member "
                    "WHERE group_id IN :ids",
                    "ids",
                ),
                params,
            )
        }
        changed |= _apply_member_diff(conn, want, have)
    return changed


_MARKED_MEMBERS = f"""
    SELECT t.gid, sp.sourced_id, {_MEMBER_VALUES}
    FROM rs_member_marks t
    CROSS JOIN roster_enrollment se
    JOIN roster_person sp ON sp.source = se.source AND sp.sourced_id = se.user_id
    WHERE se.source = t.src AND se.user_id = t.person AND se.class_id = t.cls
      AND se.role = 'student' AND se.status = 'active' AND sp.status = 'active'
"""

#: PostgreSQL plans the join above person first and then walks the enrollment index by
#: person (six rows a mark, the class compared afterwards): 250,000 buffers and 0.35-0.38 s
#: for a 1% delta's 19,000 marks. Probing the enrollment first, in a CTE it cannot fold into
#: the join, takes the class index's exact (source, class, role, person) entry: 115,000
#: buffers, 0.15-0.18 s.
_MARKED_MEMBERS_PG = f"""
    WITH m AS MATERIALIZED (
        SELECT t.gid, se.source, se.user_id FROM rs_member_marks t
        JOIN roster_enrollment se ON se.source = t.src AND se.class_id = t.cls
            AND se.role = 'student' AND se.user_id = t.person
        WHERE se.status = 'active'
    )
    SELECT m.gid, sp.sourced_id, {_MEMBER_VALUES}
    FROM m JOIN roster_person sp ON sp.source = m.source AND sp.sourced_id = m.user_id
    WHERE sp.status = 'active'
"""

_HELD_MEMBERS = """
    SELECT gm.group_id, gm.sourced_id, gm.email, gm.name
    FROM rs_member_marks t
    CROSS JOIN group_member gm
    WHERE gm.group_id = t.gid AND gm.sourced_id = t.person
"""


def sync_member_marks(conn: Connection, marks: Sequence[tuple[int, str, str, str]]) -> set[int]:
    """Re-read single members: ``marks`` are (group id, source, class, person) whose
    enrollment or person changed; the rest of each group stays as it is. Returns the groups
    whose members changed.

    The marks go into a temporary table and both reads join it by primary key or index
    (CROSS JOIN keeps it the outer loop on SQLite): one probe per mark. Reading the marked
    groups' whole member lists instead cost 8 s per million rows, and row-value
    ``IN (VALUES ...)`` made SQLite scan the million-row enrollment table.
    """
    if not marks:
        return set()
    temp = "TEMPORARY" if conn.dialect.name == "postgresql" else "TEMP"
    conn.execute(
        text(
            f"CREATE {temp} TABLE IF NOT EXISTS rs_member_marks "
            "(gid INTEGER, src VARCHAR(64), cls VARCHAR(256), person VARCHAR(256))"
        )
    )
    # Emptied after use below; a failed transaction rolls its own rows back.
    rows = sorted(set(marks))
    if conn.dialect.name == "postgresql":
        # COPY: psycopg's executemany sends a statement per row (0.35 s for a 1% delta's
        # 19,450 marks).
        copy_rows(conn, "COPY rs_member_marks (gid, src, cls, person) FROM STDIN", rows)
    else:
        executemany(
            conn, "INSERT INTO rs_member_marks (gid, src, cls, person) VALUES (?, ?, ?, ?)", rows
        )
    marked = _MARKED_MEMBERS_PG if conn.dialect.name == "postgresql" else _MARKED_MEMBERS
    want: dict[tuple[int, str], tuple[str | None, str]] = {
        (gid, sid): (email, name) for gid, sid, email, name in conn.execute(text(marked))
    }
    have: dict[tuple[int, str], tuple[str | None, str]] = {
        (gid, sid): (email, name) for gid, sid, email, name in conn.execute(text(_HELD_MEMBERS))
    }
    conn.execute(text("DELETE FROM rs_member_marks"))
    return _apply_member_diff(conn, want, have)


def update_members(
    conn: Connection, source: str, pairs: set[tuple[str, str]], group_of: Mapping[str, int]
) -> int:
    """Re-read these (class, person) members of the source's groups (``group_of``: group
    id by class), stamping the groups that changed; returns how many did."""
    if not pairs:
        return 0
    marks = [(group_of[c], source, c, p) for c, p in pairs if c in group_of]
    changed = sorted(sync_member_marks(conn, marks))
    _stamp_updated(conn, changed, utcnow())
    return len(changed)


def _stamp_updated(conn: Connection, group_ids: Sequence[int], now: datetime) -> None:
    """Every group gets the same time, so a statement per 500 ids: one statement per group
    through psycopg took 0.48 s for a 1% delta's 15,820 groups on PostgreSQL."""
    stmt = in_text("UPDATE groups SET updated_at = :now WHERE id IN :ids", "ids").bindparams(
        bindparam("now", type_=DateTime(timezone=True))  # stored as the ORM stores it
    )
    for chunk in chunks(sorted(group_ids)):
        conn.execute(stmt, {"now": now, "ids": chunk})


def _apply_member_diff(
    conn: Connection,
    want: dict[tuple[int, str], tuple[str | None, str]],
    have: dict[tuple[int, str], tuple[str | None, str]],
) -> set[int]:
    """Write the difference between members wanted and held; returns the groups changed."""
    added = [k for k in want if k not in have]
    gone = [k for k in have if k not in want]
    updated = [k for k, v in want.items() if k in have and have[k] != v]
    # ON CONFLICT: on PostgreSQL resync batches run side by side, and two that re-read the
    # members of one co-taught group may add the same student at once. The second waits for
    # the first and keeps its row (the same values, read from the same mirror), where a plain
    # INSERT failed the whole batch on the key and retried it after the backoff.
    executemany(
        conn,
        "INSERT INTO group_member (group_id, sourced_id, email, name) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        [(g, sid, *want[(g, sid)]) for g, sid in added],
    )
    executemany(conn, "DELETE FROM group_member WHERE group_id = ? AND sourced_id = ?", gone)
    executemany(
        conn,
        "UPDATE group_member SET email = ?, name = ? WHERE group_id = ? AND sourced_id = ?",
        [(*want[(g, sid)], g, sid) for g, sid in updated],
    )
    return {g for g, _ in (*added, *gone, *updated)}


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
        # One executemany: per-row INSERT ... RETURNING through the ORM layer cost more
        # than the rest of a 10,000-teacher resync together.
        executemany(
            conn,
            "INSERT INTO groups (source, external_id, name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            [(src, ext, names[(src, ext)], now, now) for src, ext in keys],
            timestamps=True,
        )
        return set(keys)
    # One statement with the keys as three arrays: a multi-row VALUES built by SQLAlchemy
    # took 86 ms per 800 groups, this 10 ms. ORDER BY keeps the insert in key order.
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
    """
    uids = sorted(set(user_ids))
    full_refresh = set(refresh_all)
    roles = teacher_role_params(teacher_roles)
    desired_sql = _desired_sql(conn, teacher_roles)
    owners_sql = _owners_sql(conn, teacher_roles)
    result: dict[int, Counter[str]] = {u: Counter() for u in uids}
    if not uids:
        return result
    now = utcnow()

    desired: dict[GroupKey, str] = {}
    wanted_by: dict[GroupKey, set[int]] = defaultdict(set)
    for chunk in chunks(uids):
        for uid, src, cls, title in conn.execute(
            in_text(desired_sql, "uids"), {"uids": chunk, "yes": True, **roles}
        ):
            desired[(src, cls)] = title
            wanted_by[(src, cls)].add(uid)

    # Existing groups: those the batch owns, and those for the classes it wants.
    groups: dict[GroupKey, tuple[int, str]] = {}
    owned_by_batch: dict[int, set[int]] = defaultdict(set)  # group id -> batch owners
    for chunk in chunks(uids):
        rows = conn.execute(
            in_text(
                "SELECT g.id, g.source, g.external_id, g.name, o.user_id FROM groups g "
                "JOIN group_owner o ON o.group_id = g.id "
                "WHERE o.user_id IN :uids AND o.origin = 'roster'",
                "uids",
            ),
            {"uids": chunk},
        )
        for gid, src, ext, name, uid in rows:
            groups[(src, ext)] = (gid, name)
            owned_by_batch[gid].add(uid)
    by_source: dict[str, list[str]] = defaultdict(list)
    for src, cls in desired:
        by_source[src].append(cls)
    for src, classes in by_source.items():
        for chunk in chunks(sorted(classes)):
            rows = conn.execute(
                in_text(
                    "SELECT id, external_id, name FROM groups WHERE source = :src AND external_id IN :ids",
                    "ids",
                ),
                {"src": src, "ids": chunk},
            )
            for gid, ext, name in rows:
                groups[(src, ext)] = (gid, name)

    def credit(key: GroupKey, what: str, fallback: Iterable[int] = ()) -> None:
        who = wanted_by.get(key) or set(fallback) & set(uids) or {uids[0]}
        result[min(who)][what] += 1

    # Create missing groups, rename changed ones.
    touched: set[int] = set()  # group ids whose name, owners or members changed
    created: set[int] = set()
    new_keys = sorted(k for k in desired if k not in groups)
    if new_keys:
        inserted = _insert_groups(conn, new_keys, desired, now)
        by_source_new: dict[str, list[str]] = defaultdict(list)
        for src, ext in new_keys:
            by_source_new[src].append(ext)
        for src, exts in by_source_new.items():
            for chunk in chunks(exts):
                for gid, ext, name in conn.execute(
                    in_text(
                        "SELECT id, external_id, name FROM groups WHERE source = :src AND external_id IN :ids",
                        "ids",
                    ),
                    {"src": src, "ids": chunk},
                ):
                    groups[(src, ext)] = (gid, name)
                    if (src, ext) in inserted:
                        created.add(gid)
        for key in new_keys:
            if key in inserted:
                credit(key, "groups_created")
    renamed = sorted(key for key, title in desired.items() if groups[key][1] != title)
    # One executemany: a 1% delta renames 400 classes, and a statement apiece through
    # SQLAlchemy took 1 ms each on PostgreSQL.
    executemany(
        conn,
        "UPDATE groups SET name = ?, updated_at = ? WHERE id = ?",
        [(desired[key], now, groups[key][0]) for key in renamed],
        timestamps=True,
    )
    for key in renamed:
        groups[key] = (groups[key][0], desired[key])
        touched.add(groups[key][0])

    desired_gids = {groups[k][0]: k for k in desired}
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
    refresh = {
        k for k in desired if k in dirty or groups[k][0] in created or wanted_by[k] & full_refresh
    }
    refresh_gids = {groups[k][0] for k in refresh}

    # Owners of wanted groups: every active provisioned teacher of the class.
    want_owners: set[tuple[int, int]] = set()
    for src, classes in by_source.items():
        for chunk in chunks(sorted(classes)):
            for cls, uid in conn.execute(
                in_text(owners_sql, "ids"), {"src": src, "ids": chunk, "yes": True, **roles}
            ):
                want_owners.add((groups[(src, cls)][0], uid))

    have_owners: set[tuple[int, int]] = set()
    for chunk in chunks(sorted(desired_gids)):
        have_owners |= {
            (g, u)
            for g, u in conn.execute(
                in_text(
                    "SELECT group_id, user_id FROM group_owner "
                    "WHERE group_id IN :ids AND origin = 'roster'",
                    "ids",
                ),
                {"ids": chunk},
            )
        }

    # Wanted groups: owners and members made exact.
    add_owners = sorted(want_owners - have_owners)
    drop_owners = sorted(o for o in have_owners - want_owners if o[0] in desired_gids)
    if add_owners:
        # An owner an admin added by import stays an import owner (its row wins the conflict).
        executemany(
            conn,
            "INSERT INTO group_owner (group_id, user_id, origin) VALUES (?, ?, 'roster') "
            "ON CONFLICT DO NOTHING",
            add_owners,
        )
    executemany(
        conn,
        "DELETE FROM group_owner WHERE group_id = ? AND user_id = ? AND origin = 'roster'",
        drop_owners,
    )
    touched.update(g for g, _ in (*add_owners, *drop_owners))

    touched |= sync_members(conn, sorted(refresh_gids & created), new=True)
    touched |= sync_members(conn, sorted(refresh_gids - created), new=False)
    # The other wanted groups: just the members a sync marked (dirty_member).
    marks: list[tuple[int, str, str, str]] = []
    for src, classes in by_source.items():
        rest = sorted(c for c in classes if (src, c) not in refresh)
        for start in range(0, len(rest), 500):
            rows = conn.execute(
                in_text(
                    "SELECT class_id, person_id FROM dirty_member "
                    "WHERE source = :src AND class_id IN :ids",
                    "ids",
                ),
                {"src": src, "ids": rest[start : start + 500]},
            )
            marks += [(groups[(src, cls)][0], src, cls, person) for cls, person in rows]
    touched |= sync_member_marks(conn, marks)

    # Groups the batch owns but no longer wants: let go; remove those left without owners.
    released: list[tuple[int, int]] = []
    for key, (gid, _name) in groups.items():
        for uid in owned_by_batch.get(gid, ()):
            if uid not in wanted_by.get(key, set()):
                released.append((gid, uid))
    executemany(
        conn,
        "DELETE FROM group_owner WHERE group_id = ? AND user_id = ? AND origin = 'roster'",
        released,
    )
    # Which released groups still have an owner, in a few IN-list statements: three
    # statements per group took 1.6 s for a 1% delta's 393 removed groups on PostgreSQL.
    let_go = {g for g, _ in released}
    kept = ids_in(conn, "SELECT group_id FROM group_owner WHERE group_id IN :ids", let_go)
    removed = let_go - kept
    touched |= kept
    for chunk in chunks(sorted(removed)):
        params = {"ids": chunk}
        conn.execute(in_text("DELETE FROM group_member WHERE group_id IN :ids", "ids"), params)
        conn.execute(in_text("DELETE FROM groups WHERE id IN :ids", "ids"), params)
    key_of = {gid: key for key, (gid, _n) in groups.items()}
    for gid in sorted(removed):
        credit(key_of[gid], "groups_removed", owned_by_batch.get(gid, ()))
    # The marks of the classes refreshed (or whose group is gone) have done their job.
    done = sorted(refresh | {key_of[g] for g in removed})
    executemany(conn, "DELETE FROM dirty_class WHERE source = ? AND class_id = ?", done)
    executemany(conn, "DELETE FROM dirty_member WHERE source = ? AND class_id = ?", done)
    executemany(
        conn,
        "DELETE FROM dirty_member WHERE source = ? AND class_id = ? AND person_id = ?",
        sorted({(src, cls, person) for _, src, cls, person in marks}),
    )
    updated = sorted(touched - created - removed)
    _stamp_updated(conn, updated, now)
    for gid in updated:
        credit(key_of[gid], "groups_updated", owned_by_batch.get(gid, ()))
    return result
