"""Change detection: what a run's staged rows change in the mirror.

It compares ``row_hash`` between staging and mirror, so a no-op run writes nothing to the
mirror or the directory, and marks the classes and members the resyncs must re-read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from rostersync.source.records import STUDENT
from rostersync.store.db import in_text
from rostersync.sync.known import KnownRows
from rostersync.sync.mirror import TABLES, ids_in, populated
from rostersync.sync.rules import chunks
from rostersync.sync.staging import run_scan


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
    known: KnownRows | None = None,
) -> Changes:
    """Compare staging with the mirror. Old enrollments are still in the mirror, new ones in
    staging, so a moved enrollment dirties both its classes. ``known``: the rows the fetch
    left out of staging as unchanged (rostersync.sync.known); what a full run did not see is
    then what it neither staged nor left out."""
    params = {"run": run_id, "src": source}
    out = Changes()
    new_ids: dict[str, set[str]] = {}
    changed: dict[str, set[str]] = {}
    for kind in TABLES:
        if kind != "enrollment":
            new_ids[kind], changed[kind] = new_and_changed(conn, kind, source, run_id)
            out.to_write[kind] = changed[kind]
    first_load, new_enrollments = _enrollment_changes(conn, out, params, grouped)
    owners, pairs = out.owner_classes, out.member_pairs
    if full:
        _find_missing(conn, out, source, run_id, new_ids, new_enrollments, grouped, known)
    out.refresh_classes = changed["class"] | out.missing.get("class", set())
    out.dirty_classes |= out.refresh_classes
    owners |= out.refresh_classes
    changed_people = changed["person"]
    out.persons = changed_people | out.missing.get("person", set())
    # New people matter only through their (new) enrollments, counted above.
    existing_changed = changed_people - new_ids["person"]
    out.in_place["person"] = existing_changed
    _count_lost_emails(conn, out, params, existing_changed)
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


def _enrollment_changes(
    conn: Connection, out: Changes, params: Mapping[str, Any], grouped: Mapping[str, int]
) -> tuple[bool, int]:
    """Enrollments that are new or changed (new and old class) into ``out``; returns whether
    this is the source's first load of enrollments, and how many staged ones are new."""
    new_enrollments = 0
    pairs = out.member_pairs
    # Member marks matter only for classes that have a group (``grouped``, from group_ids;
    # see resync.groups.mark_dirty): on a first run none has, and a million pairs would be
    # collected for nothing.
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
    return first_load, new_enrollments


def _find_missing(
    conn: Connection,
    out: Changes,
    source: str,
    run_id: int,
    new_ids: Mapping[str, set[str]],
    new_enrollments: int,
    grouped: Mapping[str, int],
    known: KnownRows | None = None,
) -> None:
    """A full run: what it did not see, per kind, into ``out.missing``; gone enrollments
    dirty their classes."""
    params = {"run": run_id, "src": source}
    owners, pairs = out.owner_classes, out.member_pairs
    # A record the source sent but that was rejected (a course answering 403, a row that
    # breaks the schema) is not gone: its mirror row, and a rejected class's enrollments,
    # stay as they were instead of being swept.
    rejected = rejected_ids(conn, run_id)
    # Sources that list people per class (Classroom) never send the people of a refused
    # class: they stay too.
    rejected["person"] |= persons_of_classes(conn, source, rejected["class"])
    if known is not None:
        out.missing = {kind: known.missing(kind) - rejected[kind] for kind in new_ids}
    else:
        out.missing = {
            kind: missing_ids(conn, kind, source, run_id, len(new_ids[kind])) - rejected[kind]
            for kind in new_ids
        }
    gone_enrollments: set[str] = set()
    if known is not None:
        gone = _enrollments_by_id(conn, source, known.missing("enrollment"))
    elif not nothing_missing(conn, "enrollment", source, run_id, new_enrollments):
        sql = """
            SELECT m.sourced_id, m.class_id, m.user_id, m.role FROM roster_enrollment m
            WHERE m.source = :src AND NOT EXISTS (
                SELECT 1 FROM staging_enrollment s
                WHERE s.run_id = :run AND s.sourced_id = m.sourced_id)
        """
        gone = [(r[0], r[1], r[2], r[3]) for r in conn.execute(text(sql), params)]
    else:
        gone = []
    for sid, cls, uid, role in gone:
        if sid in rejected["enrollment"] or cls in rejected["class"]:
            continue
        if role != STUDENT:
            owners.add(cls)
        gone_enrollments.add(sid)
        out.dirty_classes.add(cls)
        if cls in grouped and role == STUDENT:
            pairs.add((cls, uid))
    out.missing["enrollment"] = gone_enrollments


def _enrollments_by_id(
    conn: Connection, source: str, ids: set[str]
) -> list[tuple[str, str, str, str]]:
    """(sourcedId, class, person, role) of these mirror enrollments."""
    stmt = in_text(
        "SELECT sourced_id, class_id, user_id, role FROM roster_enrollment "
        "WHERE source = :src AND sourced_id IN :ids",
        "ids",
        dialect=conn.dialect.name,
    )
    out: list[tuple[str, str, str, str]] = []
    for chunk in chunks(sorted(ids)):
        out.extend(
            (r[0], r[1], r[2], r[3]) for r in conn.execute(stmt, {"src": source, "ids": chunk})
        )
    return out


def _count_lost_emails(
    conn: Connection, out: Changes, params: Mapping[str, Any], existing_changed: set[str]
) -> None:
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
        dialect=conn.dialect.name,
    )
    out: set[tuple[str, str, str]] = set()
    for chunk in chunks(sorted(person_ids)):
        out.update((c, u, r) for c, u, r in conn.execute(stmt, {"src": source, "ids": chunk}))
    return out


#: Below this many classes, :func:`teachers_of_classes` probes each without counting the
#: source's classes first.
TEACHER_PASS_MIN_CLASSES = 2000


def teachers_of_classes(conn: Connection, source: str, class_ids: set[str]) -> set[str]:
    """Person ids teaching these classes in the mirror (any status: old teachers count)."""
    if len(class_ids) > TEACHER_PASS_MIN_CLASSES and 2 * len(class_ids) > _class_count(
        conn, source
    ):
        # Most of the source's classes (a first run, a big change): one pass over all its
        # teacher enrollments beats probing each class. Short of half, the probes cost less
        # (a district's changed classes in a steady run are a few percent of its classes).
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


def _class_count(conn: Connection, source: str) -> int:
    return int(
        conn.execute(
            text("SELECT count(*) FROM roster_class WHERE source = :src"), {"src": source}
        ).scalar_one()
    )


def populated_classes(conn: Connection, source: str, class_ids: set[str]) -> set[str]:
    """Those of these classes that are active and have an active student (in the mirror)."""
    sql = (
        "SELECT c.sourced_id FROM roster_class c WHERE c.source = :src AND c.status = 'active' "
        f"AND c.sourced_id IN :ids AND {populated(conn)}"
    )
    return ids_in(conn, sql, class_ids, src=source)


def group_ids(conn: Connection, source: str) -> dict[str, int]:
    """The groups of this source, by class: the classes that have one."""
    return {
        ext: gid
        for gid, ext in conn.execute(
            text("SELECT id, external_id FROM groups WHERE source = :src"), {"src": source}
        )
    }
