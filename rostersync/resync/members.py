"""Group members: a group's members are its class's active students, read from the mirror.

The member reads and writes of a resync (rostersync.resync.groups): the members of new
groups in one statement, those of groups whose class changed compared with the mirror and
written as a diff, and the members a sync marked dirty updated in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, DateTime, bindparam, text

from rostersync.resync.groupplan import MemberKey, MemberValues, member_changes
from rostersync.store.db import copy_rows, executemany, in_text, utcnow
from rostersync.sync.mirror import member_person
from rostersync.sync.rules import chunks

#: PostgreSQL's random_page_cost for the member fill of new groups (see sync_members).
MEMBER_FILL_PAGE_COST = 1.1

#: A member's values, as the person's stored columns hold them (store.tables.MEMBER_EMAIL_SQL).
_MEMBER_VALUES = "sp.member_email AS email, sp.member_name AS name"


def _desired_members(dialect: str) -> str:
    """The members groups should have (alias ``g``, ``IN :ids``): their classes' active
    students, as stored. A student enrolled twice in one class appears twice (no DISTINCT:
    sorting a million rows to drop a rare repeat cost more than letting the insert's ON
    CONFLICT skip it)."""
    return f"""
    SELECT g.id AS group_id, sp.sourced_id AS sourced_id,
        {_MEMBER_VALUES}
    FROM groups g
    JOIN roster_enrollment se ON se.source = g.source AND se.class_id = g.external_id
        AND se.role = 'student' AND se.status = 'active'
    JOIN {member_person(dialect)} ON sp.source = se.source AND sp.sourced_id = se.user_id
        AND sp.status = 'active'
    WHERE g.id IN :ids
"""


def _new_members_sql(dialect: str) -> str:
    """Fill just-created groups. A student enrolled twice in a class must not stop the insert:
    SQLite skips the repeat on conflict (cheaper than sorting a million rows to drop it);
    PostgreSQL drops it with DISTINCT ON and inserts plainly, as the groups are new to this
    transaction: its ON CONFLICT inserts speculatively, which costs more per row."""
    insert = "INSERT INTO group_member (group_id, sourced_id, email, name) "
    if dialect == "postgresql":
        return (
            f"{insert}SELECT DISTINCT ON (d.group_id, d.sourced_id) d.group_id, d.sourced_id, "
            f"d.email, d.name FROM ({_desired_members(dialect)}) d"
        )
    # WHERE true: SQLite would read ON CONFLICT as part of the SELECT's join.
    return (
        f"{insert}SELECT d.group_id, d.sourced_id, d.email, d.name FROM ({_desired_members(dialect)}) d "
        "WHERE true ON CONFLICT DO NOTHING"
    )


def sync_members(conn: Connection, group_ids: Sequence[int], *, new: bool) -> set[int]:
    """Make these groups' members exactly their classes' active students, inside the database
    (a district's million member rows never travel through Python). ``new``: the groups were
    just created, so there is nothing to compare. Returns the groups whose members changed."""
    changed: set[int] = set()
    if new and conn.dialect.name == "postgresql":
        # One statement over an array for all the new groups: each statement hashes every
        # person of the source, once per 500 groups in IN-list chunks.
        sql = in_text(_new_members_sql("postgresql"), "ids", dialect="postgresql")
        # Costed at the default random_page_cost (4, a disk's seek), a batch's 800 classes
        # were found by hashing every enrollment of the source (a first load's drain read
        # them all once per batch); the class index's probes cost what a page in memory does.
        conn.execute(text(f"SET LOCAL random_page_cost = {MEMBER_FILL_PAGE_COST}"))
        conn.execute(sql, {"ids": sorted(group_ids)})
        conn.execute(text("SET LOCAL random_page_cost TO DEFAULT"))
        return changed
    for chunk in chunks(sorted(group_ids)):
        params = {"ids": chunk}
        if new:
            conn.execute(in_text(_new_members_sql(conn.dialect.name), "ids"), params)
            continue
        # Existing groups: compare in Python, which beat set-based SQL here (see the
        # benchmarks README's history).
        want: dict[MemberKey, MemberValues] = {
            (g, sid): (email, name)
            for g, sid, email, name in conn.execute(
                in_text(_desired_members(conn.dialect.name), "ids", dialect=conn.dialect.name),
                params,
            )
        }
        have: dict[MemberKey, MemberValues] = {
            (g, sid): (email, name)
            for g, sid, email, name in conn.execute(
                in_text(
                    "SELECT group_id, sourced_id, email, name FROM group_member "
                    "WHERE group_id IN :ids",
                    "ids",
                    dialect=conn.dialect.name,
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
    JOIN {member_person("sqlite")} ON sp.source = se.source AND sp.sourced_id = se.user_id
    WHERE se.source = t.src AND se.user_id = t.person AND se.class_id = t.cls
      AND se.role = 'student' AND se.status = 'active' AND sp.status = 'active'
"""

#: PostgreSQL: probe the enrollment first, in a CTE the planner cannot fold into the join, so
#: each mark takes the class index's exact (source, class, role, person) entry instead of
#: walking the enrollment index by person.
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
    (CROSS JOIN keeps it the outer loop on SQLite): one probe per mark, where reading the
    marked groups' whole member lists, or a row-value ``IN (VALUES ...)``, scans.
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
        # COPY: psycopg's executemany sends a statement per row.
        copy_rows(conn, "COPY rs_member_marks (gid, src, cls, person) FROM STDIN", rows)
    else:
        executemany(
            conn, "INSERT INTO rs_member_marks (gid, src, cls, person) VALUES (?, ?, ?, ?)", rows
        )
    marked = _MARKED_MEMBERS_PG if conn.dialect.name == "postgresql" else _MARKED_MEMBERS
    want: dict[MemberKey, MemberValues] = {
        (gid, sid): (email, name) for gid, sid, email, name in conn.execute(text(marked))
    }
    have: dict[MemberKey, MemberValues] = {
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
    stamp_updated(conn, changed, utcnow())
    return len(changed)


def stamp_updated(conn: Connection, group_ids: Sequence[int], now: datetime) -> None:
    """Every group gets the same time, so a statement per 500 ids, not one per group."""
    stmt = in_text(
        "UPDATE groups SET updated_at = :now WHERE id IN :ids", "ids", dialect=conn.dialect.name
    ).bindparams(
        bindparam("now", type_=DateTime(timezone=True))  # stored as the ORM stores it
    )
    for chunk in chunks(sorted(group_ids)):
        conn.execute(stmt, {"now": now, "ids": chunk})


def _apply_member_diff(
    conn: Connection,
    want: dict[MemberKey, MemberValues],
    have: dict[MemberKey, MemberValues],
) -> set[int]:
    """Write the difference between members wanted and held; returns the groups changed."""
    diff = member_changes(want, have)
    # ON CONFLICT: on PostgreSQL resync batches run side by side, and two that re-read the
    # members of one co-taught group may add the same student at once. The second waits for
    # the first and keeps its row (the same values, read from the same mirror), where a plain
    # INSERT failed the whole batch on the key and retried it after the backoff.
    added = sorted((g, sid, *want[(g, sid)]) for g, sid in diff.added)
    updated = sorted((g, sid, *want[(g, sid)]) for g, sid in diff.updated)
    gone = sorted(diff.gone)
    if conn.dialect.name == "postgresql":
        _write_member_diff_pg(conn, added, gone, updated)
        return diff.groups
    executemany(
        conn,
        "INSERT INTO group_member (group_id, sourced_id, email, name) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        added,
    )
    executemany(conn, "DELETE FROM group_member WHERE group_id = ? AND sourced_id = ?", gone)
    executemany(
        conn,
        "UPDATE group_member SET email = ?, name = ? WHERE group_id = ? AND sourced_id = ?",
        [(email, name, g, sid) for g, sid, email, name in updated],
    )
    return diff.groups


#: The member rows of a PostgreSQL write, as arrays: one statement for all the rows, where
#: psycopg's executemany sends one per row (a delta at district M: 0.15 s for each of the
#: deletes and the updates).
_PG_MEMBERS = (
    "unnest(CAST(:gid AS integer[]), CAST(:sid AS text[]), CAST(:email AS text[]), "
    "CAST(:name AS text[])) AS u(gid, sid, email, name)"
)


def _member_arrays(rows: Sequence[tuple[int, str, str | None, str]]) -> dict[str, list[Any]]:
    return {
        "gid": [r[0] for r in rows],
        "sid": [r[1] for r in rows],
        "email": [r[2] for r in rows],
        "name": [r[3] for r in rows],
    }


def _write_member_diff_pg(
    conn: Connection,
    added: Sequence[tuple[int, str, str | None, str]],
    gone: Sequence[MemberKey],
    updated: Sequence[tuple[int, str, str | None, str]],
) -> None:
    """The member diff on PostgreSQL, a statement each for the rows added, gone and updated,
    in key order (batches side by side then lock shared rows in one order)."""
    if added:
        conn.execute(
            text(
                "INSERT INTO group_member (group_id, sourced_id, email, name) "
                f"SELECT u.gid, u.sid, u.email, u.name FROM {_PG_MEMBERS} "
                "ORDER BY u.gid, u.sid ON CONFLICT DO NOTHING"
            ),
            _member_arrays(added),
        )
    if gone:
        conn.execute(
            text(
                "DELETE FROM group_member gm USING unnest(CAST(:gid AS integer[]), "
                "CAST(:sid AS text[])) AS u(gid, sid) "
                "WHERE gm.group_id = u.gid AND gm.sourced_id = u.sid"
            ),
            {"gid": [g for g, _ in gone], "sid": [sid for _, sid in gone]},
        )
    if updated:
        conn.execute(
            text(
                f"UPDATE group_member gm SET email = u.email, name = u.name FROM {_PG_MEMBERS} "
                "WHERE gm.group_id = u.gid AND gm.sourced_id = u.sid"
            ),
            _member_arrays(updated),
        )
