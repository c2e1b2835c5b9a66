"""Set-based SQL the apply step runs inside its one transaction.

Change detection compares ``row_hash`` between staging and mirror, so a no-op run writes
nothing to the mirror or the directory. The queries are plain SQL that SQLite and PostgreSQL
both understand; values are always bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, text, update
from sqlalchemy.schema import CreateIndex, DropIndex
from sqlmodel import SQLModel, col

from rostersync.config.models import Settings
from rostersync.emails import normalize_email
from rostersync.records import STUDENT
from rostersync.store.db import executemany, in_text, utcnow
from rostersync.store.tables import (
    Role,
    Site,
    User,
)
from rostersync.sync.rules import (
    ExistingUser,
    LinkedUser,
    ProvisionPlan,
    Teacher,
    chunks,
)
from rostersync.sync.staging import COLUMNS, run_scan

#: PostgreSQL channel the daemon LISTENs on for new resync jobs.
RESYNC_CHANNEL = "rostersync_resync"

#: (mirror table, staging table, columns besides the keys)
TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # The staging column list is the one truth; quoted, since "primary" is a keyword.
    kind: (f"roster_{kind}", f"staging_{kind}", tuple(f'"{c}"' for c in cols if c != "sourced_id"))
    for kind, cols in COLUMNS.items()
}

#: A class (alias ``c``) with at least one active student who is an active person.
POPULATED = """
EXISTS (SELECT 1 FROM roster_enrollment se
        JOIN roster_person sp ON sp.source = se.source AND sp.sourced_id = se.user_id
        WHERE se.source = c.source AND se.class_id = c.sourced_id AND se.role = 'student'
          AND se.status = 'active' AND sp.status = 'active')
"""


def teacher_role(conn: Connection, roles: Sequence[str], alias: str = "tp") -> str:
    """SQL true when the person (alias ``alias``) has any of ``roles`` (lower-case names) among
    its stored ``roles`` (lower-case, comma-joined). The names are bound as ``:teacher_role_N``
    (see :func:`teacher_role_params`)."""
    find = "strpos" if conn.dialect.name == "postgresql" else "instr"
    tests = [
        f"{find}(',' || {alias}.roles || ',', :teacher_role_{i}) > 0" for i in range(len(roles))
    ]
    return "(" + " OR ".join(tests or ["1 = 0"]) + ")"


def teacher_role_params(roles: Sequence[str]) -> dict[str, str]:
    return {f"teacher_role_{i}": f",{role},".lower() for i, role in enumerate(roles)}


def teaches_populated(conn: Connection, roles: Sequence[str]) -> str:
    """An active teacher enrollment (alias ``te``) in an active, populated class, by an active,
    enabled person of a teacher role (alias ``tp``): the definition of "teaches a populated
    class". Binds ``:yes`` and the :func:`teacher_role_params`."""
    return f"""
te.role = 'teacher' AND te.status = 'active'
AND tp.status = 'active' AND tp.enabled = :yes AND {teacher_role(conn, roles)}
AND EXISTS (SELECT 1 FROM roster_class c
            WHERE c.source = te.source AND c.sourced_id = te.class_id AND c.status = 'active'
              AND {POPULATED})
"""


def ids_in(conn: Connection, sql: str, values: Iterable[Any], **params: Any) -> set[Any]:
    """First column of ``sql`` (which has ``IN :ids``) over ``values``, in bounded chunks.

    PostgreSQL takes all the values at once, as one array (``= ANY(:ids)``): one statement
    planned once instead of one per 500 values, each of which scanned its table against its
    list.
    """
    out: set[Any] = set()
    if conn.dialect.name == "postgresql":
        if ids := sorted(values):
            stmt = text(sql.replace("IN :ids", "= ANY(:ids)"))
            out = {r[0] for r in conn.execute(stmt, {**params, "ids": ids}) if r[0] is not None}
        return out
    stmt = in_text(sql, "ids")
    for chunk in chunks(sorted(values)):
        out |= {r[0] for r in conn.execute(stmt, {**params, "ids": chunk}) if r[0] is not None}
    return out


def _ids(rows: Iterable[Any]) -> set[str]:
    return {r[0] for r in rows if r[0] is not None}


# -- change detection -------------------------------------------------------------------------


def new_and_changed(
    conn: Connection, kind: str, source: str, run_id: int
) -> tuple[set[str], set[str]]:
    """Staged rows that are new to the mirror, and those that are new or differ from it: one
    pass over staging (two anti-joins read 210,000 staged people twice)."""
    mirror, staging, _ = TABLES[kind]
    sql = f"""
        SELECT s.sourced_id, CASE WHEN m.sourced_id IS NULL THEN 1 ELSE 0 END
        FROM {run_scan(conn, staging)}
        LEFT JOIN {mirror} m ON m.source = :src AND m.sourced_id = s.sourced_id
        WHERE s.run_id = :run AND (m.sourced_id IS NULL OR m.row_hash <> s.row_hash)
    """
    new: set[str] = set()
    changed: set[str] = set()
    for sid, is_new in conn.execute(text(sql), {"run": run_id, "src": source}):
        changed.add(sid)
        if is_new:
            new.add(sid)
    return new, changed


def nothing_missing(conn: Connection, kind: str, source: str, run_id: int, new_count: int) -> bool:
    """True when every mirror row was staged again: the mirror holds exactly the staged rows
    that are not new. Two counts, where the anti-join costs seconds on a million rows."""
    mirror, staging, _ = TABLES[kind]
    params = {"run": run_id, "src": source}
    in_mirror = conn.execute(text(f"SELECT count(*) FROM {mirror} WHERE source = :src"), params)
    staged = conn.execute(text(f"SELECT count(*) FROM {staging} WHERE run_id = :run"), params)
    return bool(in_mirror.scalar_one() == staged.scalar_one() - new_count)


def missing_ids(conn: Connection, kind: str, source: str, run_id: int, new_count: int) -> set[str]:
    """Mirror rows a full run did not see (to be swept)."""
    if nothing_missing(conn, kind, source, run_id, new_count):
        return set()
    mirror, staging, _ = TABLES[kind]
    sql = f"""
        SELECT m.sourced_id FROM {mirror} m
        WHERE m.source = :src AND NOT EXISTS (
            SELECT 1 FROM {staging} s WHERE s.run_id = :run AND s.sourced_id = m.sourced_id)
    """
    return _ids(conn.execute(text(sql), {"run": run_id, "src": source}))


@dataclass
class Changes:
    """What a run changes in the mirror, found before the merge."""

    #: sourced ids a full run did not see, per kind (empty for delta runs)
    missing: dict[str, set[str]] = field(default_factory=dict)
    #: classes whose group content may change: the class, an enrollment or a person changed
    dirty_classes: set[str] = field(default_factory=set)
    #: classes whose own row changed or went: their groups' members are all re-read
    refresh_classes: set[str] = field(default_factory=set)
    #: (class, person) pairs whose membership may have changed: an enrollment between them,
    #: or the person, changed. Resyncs re-read just these members, not the whole class.
    member_pairs: set[tuple[str, str]] = field(default_factory=set)
    #: dirty classes with a change beyond their students: a teacher enrollment or teacher,
    #: the class row itself. The others' changes only touch members (unless the class loses
    #: its last student), which the sync can apply without rebuilding anyone's groups.
    owner_classes: set[str] = field(default_factory=set)
    #: persons new, changed or gone
    persons: set[str] = field(default_factory=set)
    #: changed rows already in the mirror, per kind: what :func:`merge` may update in place
    in_place: dict[str, set[str]] = field(default_factory=dict)
    #: staged rows new to the mirror or differing from it, per kind: all :func:`merge` has to
    #: write. A kind is absent when it was not collected (a first load of enrollments,
    #: where every staged row is new).
    to_write: dict[str, set[str]] = field(default_factory=dict)
    #: persons whose email address this run would take away, and how many had one
    emails_lost: int = 0
    emails_before: int = 0


def find_changes(
    conn: Connection,
    source: str,
    run_id: int,
    *,
    full: bool,
    grouped: Mapping[str, int],
) -> Changes:
    """Compare staging with the mirror. Old enrollments are still in the mirror, new ones in
    staging, so a moved enrollment dirties both its classes."""
    params = {"run": run_id, "src": source}
    out = Changes()
    new_ids: dict[str, set[str]] = {}
    changed: dict[str, set[str]] = {}
    for kind in TABLES:
        if kind != "enrollment":
            new_ids[kind], changed[kind] = new_and_changed(conn, kind, source, run_id)
            out.to_write[kind] = changed[kind]
    # Enrollments that are new or changed (new and old class).
    new_enrollments = 0
    pairs = out.member_pairs
    # Member marks matter only for classes that have a group (``grouped``, from group_ids;
    # see mark_dirty): on a first run none has, and a million pairs would be collected for
    # nothing.
    sql = f"""
        SELECT s.sourced_id, s.class_id, s.user_id, s.role, m.class_id, m.user_id, m.role
        FROM {run_scan(conn, "staging_enrollment")}
        LEFT JOIN roster_enrollment m ON m.source = :src AND m.sourced_id = s.sourced_id
        WHERE s.run_id = :run AND (m.sourced_id IS NULL OR m.row_hash <> s.row_hash)
    """
    owners = out.owner_classes
    in_place = out.in_place["enrollment"] = set()
    first_load = (
        not grouped
        and conn.execute(
            text("SELECT 1 FROM roster_enrollment WHERE source = :src LIMIT 1"), params
        ).first()
        is None
    )
    if first_load:
        # Every staged enrollment is new and no class has a group: one GROUP BY gives what
        # the loop below would learn, more slowly, from every row in Python.
        per_class = f"""
            SELECT s.class_id,
                max(CASE WHEN COALESCE(s.role, '') <> 'student' THEN 1 ELSE 0 END), count(*)
            FROM {run_scan(conn, "staging_enrollment")} WHERE s.run_id = :run
            GROUP BY s.class_id
        """
        for cls, taught, count in conn.execute(text(per_class), params):
            out.dirty_classes.add(cls)
            if taught:
                owners.add(cls)
            new_enrollments += count
    else:
        rows = conn.execute(text(sql), params)
        to_write = out.to_write["enrollment"] = set()
        for sid, new_cls, new_user, new_role, old_cls, old_user, old_role in rows:
            to_write.add(sid)
            if old_cls:
                in_place.add(sid)
            if new_role != STUDENT or (old_cls and old_role != STUDENT):
                owners.add(new_cls)
                if old_cls:
                    owners.add(old_cls)
            out.dirty_classes.add(new_cls)
            if new_cls in grouped and new_role == STUDENT:
                pairs.add((new_cls, new_user))
            if old_cls:
                out.dirty_classes.add(old_cls)
                if old_cls in grouped and old_role == STUDENT:
                    pairs.add((old_cls, old_user))
            else:
                new_enrollments += 1
    if full:
        # A record the source sent but that was rejected (a course answering 403, a row that
        # breaks the schema) is not gone: its mirror row, and a rejected class's enrollments,
        # stay as they were instead of being swept.
        rejected = rejected_ids(conn, run_id)
        # Sources that list people per class (Classroom) never send the people of a refused
        # class: they stay too.
        rejected["person"] |= persons_of_classes(conn, source, rejected["class"])
        out.missing = {
            kind: missing_ids(conn, kind, source, run_id, len(new_ids[kind])) - rejected[kind]
            for kind in new_ids
        }
        gone_enrollments: set[str] = set()
        if not nothing_missing(conn, "enrollment", source, run_id, new_enrollments):
            sql = """
                SELECT m.sourced_id, m.class_id, m.user_id, m.role FROM roster_enrollment m
                WHERE m.source = :src AND NOT EXISTS (
                    SELECT 1 FROM staging_enrollment s
                    WHERE s.run_id = :run AND s.sourced_id = m.sourced_id)
            """
            for sid, cls, uid, role in conn.execute(text(sql), params):
                if sid in rejected["enrollment"] or cls in rejected["class"]:
                    continue
                if role != STUDENT:
                    owners.add(cls)
                gone_enrollments.add(sid)
                out.dirty_classes.add(cls)
                if cls in grouped and role == STUDENT:
                    pairs.add((cls, uid))
        out.missing["enrollment"] = gone_enrollments
    out.refresh_classes = changed["class"] | out.missing.get("class", set())
    out.dirty_classes |= out.refresh_classes
    owners |= out.refresh_classes
    changed_people = changed["person"]
    out.persons = changed_people | out.missing.get("person", set())
    # New people matter only through their (new) enrollments, counted above.
    existing_changed = changed_people - new_ids["person"]
    out.in_place["person"] = existing_changed
    # A source that stops sending emails (a revoked scope, a changed export) must not
    # silently blank the directory: counted here, judged by the safety rules.
    # One pass over this run's staged people with an empty email, each checked against its
    # mirror row. CROSS JOIN makes SQLite keep staging outside (PostgreSQL plans it freely):
    # joined the other way round, it walks the mirror's whole email index.
    blanked = conn.execute(
        text(
            """
            SELECT s.sourced_id FROM staging_person s CROSS JOIN roster_person m
            WHERE s.run_id = :run AND (s.email IS NULL OR s.email = '')
              AND m.source = :src AND m.sourced_id = s.sourced_id
              AND m.email IS NOT NULL AND m.email <> ''
            """
        ),
        params,
    )
    out.emails_lost = len(_ids(blanked) & existing_changed)
    if out.emails_lost:
        out.emails_before = int(
            conn.execute(
                text(
                    "SELECT count(*) FROM roster_person WHERE source = :src "
                    "AND email IS NOT NULL AND email <> ''"
                ),
                params,
            ).scalar_one()
        )
    touched_people = existing_changed | out.missing.get("person", set())
    if not first_load:
        # A new person may already have enrollments in the mirror (the source sent them a run
        # earlier, or rejected the person then): those classes gain a member or a teacher.
        touched_people |= new_ids["person"]
    person_pairs = enrollments_of_persons(conn, source, touched_people)
    pairs |= {(c, p) for c, p, role in person_pairs if c in grouped and role == STUDENT}
    out.dirty_classes |= {cls for cls, _, _ in person_pairs}
    # A changed person who is, or was, anything but a student may change who owns a group.
    others = non_students(conn, source, run_id, touched_people)
    owners |= {cls for cls, person, _ in person_pairs if person in others}
    return out


def non_students(conn: Connection, source: str, run_id: int, person_ids: set[str]) -> set[str]:
    """Those of these persons whose mirror or staged role is not ``student``."""
    mirror = ids_in(
        conn,
        "SELECT sourced_id FROM roster_person WHERE source = :src AND sourced_id IN :ids "
        "AND role <> 'student'",
        person_ids,
        src=source,
    )
    staged = ids_in(
        conn,
        "SELECT sourced_id FROM staging_person WHERE run_id = :run AND sourced_id IN :ids "
        "AND role <> 'student'",
        person_ids,
        run=run_id,
    )
    return mirror | staged


#: Rejection `entity` names, as connectors report them, to mirror kinds.
_ENTITY_KIND = {"user": "person", "person": "person", "class": "class", "course": "class",
                "enrollment": "enrollment", "org": "org", "school": "org"}  # fmt: skip


def persons_of_classes(conn: Connection, source: str, class_ids: set[str]) -> set[str]:
    # No DISTINCT (ids_in makes a set): with it SQLite walked the (source, user_id) index,
    # every enrollment of the source per query, to get the ids in order.
    sql = "SELECT user_id FROM roster_enrollment WHERE source = :src AND class_id IN :ids"
    return ids_in(conn, sql, class_ids, src=source)


def rejected_ids(conn: Connection, run_id: int) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {kind: set() for kind in TABLES}
    rows = conn.execute(
        text(
            "SELECT entity, sourced_id FROM run_rejection WHERE run_id = :run AND sourced_id IS NOT NULL"
        ),
        {"run": run_id},
    )
    for entity, sid in rows:
        kind = _ENTITY_KIND.get(entity)
        if kind:
            out[kind].add(sid)
    return out


def enrollments_of_persons(
    conn: Connection, source: str, person_ids: set[str]
) -> set[tuple[str, str, str]]:
    """(class, person, role) of these persons' enrollments in the mirror. (Their new
    enrollments in this run's staging are found by the enrollment comparison already.)"""
    # SQLite costs a long IN list above the index on (source, class_id) and scans a million
    # enrollments per query; the index on (source, user_id) answers it in milliseconds.
    hint = "INDEXED BY ix_roster_enr_user" if conn.dialect.name == "sqlite" else ""
    stmt = in_text(
        f"SELECT class_id, user_id, role FROM roster_enrollment {hint} "
        "WHERE source = :src AND user_id IN :ids",
        "ids",
    )
    out: set[tuple[str, str, str]] = set()
    for chunk in chunks(sorted(person_ids)):
        out.update((c, u, r) for c, u, r in conn.execute(stmt, {"src": source, "ids": chunk}))
    return out


def teachers_of_classes(conn: Connection, source: str, class_ids: set[str]) -> set[str]:
    """Person ids teaching these classes in the mirror (any status: old teachers count)."""
    if len(class_ids) > 2000:
        # Many classes (a first run, a big change): one pass over the teacher enrollments
        # beats dozens of IN-list queries.
        rows = conn.execute(
            text(
                "SELECT class_id, user_id FROM roster_enrollment "
                "WHERE source = :src AND role = 'teacher'"
            ),
            {"src": source},
        )
        return {uid for cls, uid in rows if cls in class_ids}
    # No DISTINCT (see persons_of_classes): the sort costs more than the repeats.
    sql = (
        "SELECT user_id FROM roster_enrollment "
        "WHERE source = :src AND role = 'teacher' AND class_id IN :ids"
    )
    return ids_in(conn, sql, class_ids, src=source)


def populated_classes(conn: Connection, source: str, class_ids: set[str]) -> set[str]:
    """Those of these classes that are active and have an active student (in the mirror)."""
    sql = (
        "SELECT c.sourced_id FROM roster_class c WHERE c.source = :src AND c.status = 'active' "
        f"AND c.sourced_id IN :ids AND {POPULATED}"
    )
    return ids_in(conn, sql, class_ids, src=source)


def refresh_statistics(conn: Connection, written: Mapping[str, int]) -> list[str]:
    """Fresh PostgreSQL planner statistics for the mirror tables this merge changed much;
    returns the tables analysed.

    Without them PostgreSQL picks nested loops over sequential scans on a freshly loaded
    table. A table counts as changed much by autovacuum's own rule: 50 rows plus a tenth of
    the rows it had when last analysed (never analysed counts as none). A first load always
    is; a small delta is not, and analysing a large mirror for it would cost more than it
    saves. SQLite plans these queries well without statistics, except one, which names its
    index (see enrollments_of_persons).
    """
    if conn.dialect.name != "postgresql":
        return []
    changed = {TABLES[k][0]: n for k, n in written.items() if n and k != "org"}
    if not changed:
        return []
    sizes: dict[str, float] = dict(
        conn.execute(
            text(
                "SELECT relname, reltuples FROM pg_class "
                "WHERE oid = ANY(CAST(CAST(:tables AS text[]) AS regclass[]))"
            ),
            {"tables": sorted(changed)},
        ).all()
    )
    stale = [t for t, n in sorted(changed.items()) if n >= 50 + 0.1 * max(sizes.get(t, 0), 0)]
    if stale:
        conn.execute(text(f"ANALYZE {', '.join(stale)}"))
    return stale


def refresh_directory_statistics(conn: Connection, *, members: bool = True) -> None:
    """Fresh PostgreSQL statistics for the directory tables (see refresh_statistics).

    A first sync creates thousands of users and its resyncs tens of thousands of groups and
    a million member rows; planned with the statistics of the empty tables, PostgreSQL
    chooses scans where an index answers at once.
    ``members``: include ``group_member``, the one large table (its sample costs most).
    """
    if conn.dialect.name == "postgresql":
        tables = '"user", user_identity, groups, group_owner'
        conn.execute(text(f"ANALYZE {tables}{', group_member' if members else ''}"))


def group_ids(conn: Connection, source: str) -> dict[str, int]:
    """The groups of this source, by class: the classes that have one."""
    return {
        ext: gid
        for gid, ext in conn.execute(
            text("SELECT id, external_id FROM groups WHERE source = :src"), {"src": source}
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

    Only classes that have a group (``grouped``, from :func:`group_ids`) are marked: a new group reads all its members anyway, and
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


# -- merge ---------------------------------------------------------------------------------


#: Below this many staged rows a load keeps the mirror's indexes (the rebuild costs more).
BULK_LOAD_MIN_ROWS = 50_000


def _first_load(
    conn: Connection, mirror: str, staging: str, params: dict[str, Any]
) -> tuple[bool, bool]:
    """(this run loads the source into ``mirror`` for the first time, and that load at least
    doubles the table: its secondary indexes are better built afterwards). The cheap test
    first, so that a delta run does not count a large mirror."""
    mine = conn.execute(text(f"SELECT 1 FROM {mirror} WHERE source = :src LIMIT 1"), params).first()
    if mine is not None:
        return False, False
    staged = conn.execute(
        text(f"SELECT count(*) FROM {staging} WHERE run_id = :run"), params
    ).scalar_one()
    if staged < BULK_LOAD_MIN_ROWS:
        return True, False
    total = conn.execute(text(f"SELECT count(*) FROM {mirror}")).scalar_one()
    return True, staged >= total


def _update_in_place(conn: Connection, kind: str, source: str, run_id: int, ids: set[str]) -> int:
    """SQLite: copy these changed rows' staged values over their mirror rows where no
    indexed column changed, setting only the columns no index holds. SQLite rewrites the
    entries of every index on a column an UPDATE sets, equal or not, and the upsert below
    sets them all: index pages rewritten with the values they held."""
    mirror, staging, cols = TABLES[kind]
    indexed = {
        f'"{c.name}"'
        for index in SQLModel.metadata.tables[mirror].indexes
        for c in index.columns
        if c.name not in ("source", "sourced_id")
    }
    if not ids or not indexed:
        return 0
    sets = ", ".join(f"{c} = s.{c}" for c in cols if c not in indexed)
    same = " AND ".join(f"m.{c} IS s.{c}" for c in sorted(indexed))
    stmt = in_text(
        f"UPDATE {mirror} AS m SET {sets} FROM {staging} s "
        f"WHERE s.run_id = :run AND s.sourced_id IN :ids "
        f"AND m.source = :src AND m.sourced_id = s.sourced_id AND {same}",
        "ids",
    )
    done = 0
    for chunk in chunks(sorted(ids)):
        done += conn.execute(stmt, {"run": run_id, "src": source, "ids": chunk}).rowcount or 0
    return done


#: Up to this many new and changed rows of a kind, the merge upserts them by id (500 per
#: statement); beyond it, one statement over all staged rows costs less.
TARGETED_UPSERT_MAX = 50_000


def merge(
    conn: Connection,
    source: str,
    run_id: int,
    missing: Mapping[str, set[str]],
    in_place: Mapping[str, set[str]] | None = None,
    to_write: Mapping[str, set[str]] | None = None,
) -> dict[str, int]:
    """Upsert changed staged rows into the mirror and sweep what a full run did not see
    (``missing``, from :func:`find_changes`; ``in_place``, its changed rows already in the
    mirror, lets SQLite leave their unchanged index entries alone; ``to_write``, all its new
    and changed rows, lets a run that changed little upsert just those instead of comparing
    every staged row again). Returns rows written per table."""
    written: dict[str, int] = {}
    for kind, (mirror, staging, cols) in TABLES.items():
        params = {"src": source, "run": run_id}
        written[kind] = 0
        if in_place and conn.dialect.name == "sqlite":
            # PostgreSQL compares the values itself and skips unchanged index entries.
            written[kind] = _update_in_place(conn, kind, source, run_id, in_place.get(kind, set()))
        # A source's first load that at least doubles the table goes in faster without the
        # secondary indexes, built again afterwards by one sort each, than with them kept up
        # row by row. Inside the transaction, so a failed run leaves them as they were.
        secondary = [i for i in SQLModel.metadata.tables[mirror].indexes if not i.unique]
        fresh, bulk = _first_load(conn, mirror, staging, params)
        rebuild = secondary if bulk else []
        for index in rebuild:
            conn.execute(DropIndex(index))
        col_list = ", ".join(cols)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols)
        insert = (
            f"INSERT INTO {mirror} (source, sourced_id, {col_list}) "
            f"SELECT CAST(:src AS VARCHAR(64)), s.sourced_id, "
            f"{', '.join('s.' + c for c in cols)} "
        )
        upsert = f"""
            AND NOT EXISTS (
                SELECT 1 FROM {mirror} m WHERE m.source = :src
                AND m.sourced_id = s.sourced_id AND m.row_hash = s.row_hash)
            ON CONFLICT (source, sourced_id) DO UPDATE SET {updates}
        """
        ids = None if fresh or to_write is None else to_write.get(kind)
        if ids is not None and len(ids) <= TARGETED_UPSERT_MAX:
            # The changed rows are known: upsert those by id (the staging key finds each),
            # not all staged rows probed against the mirror again (most of a no-op run).
            # The rows updated in place now carry the staged hash: NOT EXISTS skips them.
            by_id = text(
                f"{insert}FROM {staging} s WHERE s.run_id = :run AND s.sourced_id IN :ids {upsert}"
            ).bindparams(bindparam("ids", expanding=True))
            for chunk in chunks(sorted(ids)):
                written[kind] += conn.execute(by_id, {**params, "ids": chunk}).rowcount or 0
        else:
            # A first load has nothing to compare with and no conflict to resolve (staging
            # holds one row per id): the probe and the conflict check per row are skipped.
            sql = f"{insert}FROM {run_scan(conn, staging)} WHERE s.run_id = :run"
            if not fresh:
                sql += upsert
            written[kind] += conn.execute(text(sql), params).rowcount or 0
        for index in rebuild:
            conn.execute(CreateIndex(index))
        # Delete by id: the ids are known already, and an anti-join over a million-row
        # mirror costs seconds even when nothing is gone.
        for chunk in chunks(sorted(missing.get(kind, ()))):
            stmt = text(
                f"DELETE FROM {mirror} WHERE source = :src AND sourced_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
            written[kind] += conn.execute(stmt, {"src": source, "ids": chunk}).rowcount or 0
    return written


# -- eligibility ------------------------------------------------------------------------------


def _rows_for(
    conn: Connection, sql: str, params: Mapping[str, Any], only: set[str] | None, column: str
) -> Iterable[Any]:
    """Rows of ``sql``, or (``only`` given) just those whose ``column`` is in ``only``."""
    if only is None:
        yield from conn.execute(text(sql), dict(params))
        return
    stmt = in_text(f"{sql} AND {column} IN :only", "only")
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
    sql = f"""
        SELECT tp.sourced_id, tp.email, tp.given_name, tp.family_name, tp.username, tp.org_ids
        FROM roster_person tp {scan}
        WHERE tp.source = :src AND tp.status = 'active' AND tp.enabled = :yes
          -- the role test first: students never teach, and it spares their enrollment probes
          AND {teacher_role(conn, teacher_roles)}
          AND EXISTS (SELECT 1 FROM roster_enrollment te
                      WHERE te.source = tp.source AND te.user_id = tp.sourced_id
                        AND {teaches_populated(conn, teacher_roles)})
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
                display_name=" ".join(p for p in (given, family) if p).strip(),
                username=username,
                school_ids=schools,
                school_names=tuple(orgs[o] for o in schools if o in orgs),
            )
        )
    return out


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
            conn.execute(insert(Role).values(name=spec.name, scope=spec.scope, permissions=perms))
        elif current[1] != spec.scope or list(current[2] or []) != perms:
            conn.execute(
                update(Role)
                .where(col(Role.id) == current[0])
                .values(scope=spec.scope, permissions=perms)
            )
    sites = {name for (name,) in conn.execute(text("SELECT name FROM site"))}
    for site in settings.sites:
        if site not in sites:
            conn.execute(insert(Site).values(name=site))


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
            update(User)
            .where(col(User.id).in_(plan.restore))
            .values(status="active", archived_by_sync=False, updated_at=now)
        )
    if plan.archive:
        conn.execute(
            update(User)
            .where(col(User.id).in_(plan.archive))
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


def groups_to_remove(
    conn: Connection,
    source: str,
    teacher_roles: Sequence[str],
    archived: Iterable[int] = (),
    only_classes: set[str] | None = None,
    *,
    restored: Iterable[int] = (),
    new_owners: Iterable[str] = (),
) -> int:
    """Groups of this source that no eligible, provisioned teacher will own after this run.

    ``archived`` and ``restored``: the users this run archives and restores; ``new_owners``:
    the persons it links or creates accounts for, who take over the classes they teach (the
    count is made before the accounts exist). ``only_classes``: a delta run counts just the
    groups its changes can concern, those of these classes and those of the users it
    archives; no other group's owners changed.
    """
    sql = f"""
        SELECT g.external_id FROM groups g WHERE g.source = :src AND NOT EXISTS (
            SELECT 1 FROM roster_enrollment te
            JOIN roster_person tp ON tp.source = te.source AND tp.sourced_id = te.user_id
            JOIN user_identity i ON i.source = te.source AND i.external_id = te.user_id
            JOIN "user" u ON u.id = i.user_id
            WHERE te.source = g.source AND te.class_id = g.external_id
              AND (u.status = 'active' OR u.id IN :restored) AND u.id NOT IN :archived
              AND {teaches_populated(conn, teacher_roles)})
    """
    params = {
        "src": source,
        "yes": True,
        "archived": sorted(set(archived)) or [-1],
        "restored": sorted(set(restored)) or [-1],
        **teacher_role_params(teacher_roles),
    }
    if only_classes is None:
        classes = {c for (c,) in conn.execute(in_text(sql, "archived", "restored"), params)}
    else:
        candidates = {
            gid
            for gid, ext in conn.execute(
                text("SELECT id, external_id FROM groups WHERE source = :src"), {"src": source}
            )
            if ext in only_classes
        } | ids_in(conn, "SELECT group_id FROM group_owner WHERE user_id IN :ids", set(archived))
        stmt = in_text(f"{sql} AND g.id IN :gids", "archived", "restored", "gids")
        classes = set()
        for chunk in chunks(sorted(candidates)):
            classes |= {c for (c,) in conn.execute(stmt, {**params, "gids": chunk})}
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
            in_text(sql, "ids"), {"src": source, "ids": chunk}
        ):
            name = " ".join(p for p in (given, family) if p).strip()
            out.setdefault(uid, []).append((sid, name))
    return out


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
    conn.execute(
        text(
            "UPDATE source_state SET decided_with = :mark || decided_with "
            "WHERE decided_with IS NOT NULL AND decided_with NOT LIKE :like"
        ),
        {"mark": DIRECTORY_CHANGED, "like": f"{DIRECTORY_CHANGED}%"},
    )


def queue_resync(
    conn: Connection,
    user_ids: Iterable[int],
    *,
    reason: str,
    run_id: int | None,
    live: bool = False,
) -> int:
    """Queue one job per user; a user with a queued job keeps that one.

    A request without a sync run (``run_id`` None: manual, import) re-reads every member of
    the user's groups (``refresh``). The kept job takes the newer reason and the newest sync
    run (whose report its group changes count in); a full re-read or a live one is never
    downgraded by a sync merging into it.
    """
    now = utcnow()
    refresh = run_id is None
    rows = [(uid, live, refresh, reason[:200], run_id, now, now) for uid in sorted(set(user_ids))]
    if not rows:
        return 0
    executemany(
        conn,
        "INSERT INTO resync_job (user_id, state, live, refresh, attempts, reason, run_id, "
        "run_after, created_at, result) VALUES (?, 'queued', ?, ?, 0, ?, ?, ?, ?, '{}') "
        "ON CONFLICT (user_id) WHERE state = 'queued' DO UPDATE SET reason = excluded.reason, "
        "run_id = COALESCE(excluded.run_id, resync_job.run_id), "
        "refresh = (resync_job.refresh OR excluded.refresh), "
        "live = (resync_job.live OR excluded.live)",
        rows,
        timestamps=True,
    )
    if conn.dialect.name == "postgresql":
        # Wakes idle daemon workers at once (delivered when this transaction commits).
        conn.execute(text(f"NOTIFY {RESYNC_CHANNEL}"))
    return len(rows)


def add_counts(current: Mapping[str, int], extra: Mapping[str, int]) -> dict[str, int]:
    out = dict(current)
    for k, v in extra.items():
        out[k] = out.get(k, 0) + v
    return out
