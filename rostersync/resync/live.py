"""Write a teacher's live roster (``resync --live``) into the mirror before groups are rebuilt.

Live answers carry no enrollment ids the full feed would recognise, so enrollments are matched
by (class, person, role), counting only the answer's active ones: existing rows are kept (and
re-activated when none of the key is active), missing ones are marked ``tobedeleted``, new ones
are added with the connector's ids (OneRoster's ``live:`` ones). What the connector rejected
is not taken for gone (see :class:`_Unread`). Every row written is marked
(``LIVE_HASH``), so the next full run replaces all of it with the source's own view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, bindparam, text

from rostersync.source.records import STUDENT, TEACHER, TeacherRoster
from rostersync.source.rows import class_tuple, enrollment_tuple, fits, person_tuple
from rostersync.store.tables import roster_class, roster_enrollment, roster_person
from rostersync.sync.mirror import ids_in
from rostersync.sync.staging import class_row, enrollment_row, person_row, upsert_rows

# row_hash of every row written here: equals no computed one, so the next sync that reads
# the record re-reads it (a full one replaces it), and so re-reads the groups of others it
# is in, which this resync does not rebuild.
LIVE_HASH = "live"


def apply_teacher_roster(
    conn: Connection, source: str, teacher_id: str, roster: TeacherRoster
) -> set[str]:
    """Write the answer into the mirror; returns the classes whose rows it may have changed:
    the answer's, those the teacher left, and every class of a person it wrote."""
    persons = list(roster.persons)
    if roster.teacher is not None:
        persons.append(roster.teacher)
    # A record with a value longer than its column is rejected on its own, as a run rejects
    # it (PostgreSQL refuses the value, which failed the whole live resync): its row stays.
    persons = [p for p in persons if fits("person", person_tuple(p))]
    upsert_rows(
        conn,
        roster_person,
        [{**person_row(p), "source": source, "row_hash": LIVE_HASH} for p in persons],
        ["source", "sourced_id"],
    )
    upsert_rows(
        conn,
        roster_class,
        [
            {**class_row(c), "source": source, "row_hash": LIVE_HASH}
            for c in roster.classes
            if fits("class", class_tuple(c))
        ],
        ["source", "sourced_id"],
    )
    live_classes = {c.sourced_id for c in roster.classes}
    unread = _Unread.of(roster)
    # Classes the mirror says the teacher teaches but the source no longer does.
    current = {
        r[0]
        for r in conn.execute(
            text(
                "SELECT class_id FROM roster_enrollment WHERE source = :src AND user_id = :t "
                "AND role = :teacher AND status = 'active'"
            ),
            {"src": source, "t": teacher_id, "teacher": TEACHER},
        )
    }
    # A rejected enrollment may be the teacher's own, by which a class missing here is theirs.
    gone = unread.droppable_classes(current - live_classes, teacher_id)
    for cls in sorted(gone):
        conn.execute(
            text(
                "UPDATE roster_enrollment SET status = 'tobedeleted', row_hash = :h, fp = NULL "
                "WHERE source = :src AND user_id = :t AND class_id = :c AND role = :teacher"
            ),
            {"src": source, "t": teacher_id, "c": cls, "teacher": TEACHER, "h": LIVE_HASH},
        )
    # A person's row is part of every class they are enrolled in (their groups' members).
    of_persons = ids_in(
        conn,
        "SELECT DISTINCT class_id FROM roster_enrollment WHERE source = :src AND user_id IN :ids",
        {p.sourced_id for p in persons},
        src=source,
    )
    touched = live_classes | gone | of_persons
    if not live_classes:
        return touched
    # Every row of a (class, person, role): a source may enroll a student twice in a class.
    existing: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    rows = conn.execute(
        text(
            "SELECT sourced_id, class_id, user_id, role, status FROM roster_enrollment "
            "WHERE source = :src AND class_id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"src": source, "ids": sorted(live_classes)},
    )
    for sid, cls, uid, role, status in rows:
        existing.setdefault((cls, uid, role), []).append((sid, status))
    # An enrollment the answer holds as tobedeleted (the memory and CSV connectors pass the
    # statuses on) is one the source has dropped, not one to re-activate.
    live = {
        (e.class_id, e.user_id, e.role): e
        for e in roster.enrollments
        if e.class_id in live_classes and e.status == "active"
    }
    for key, e in list(live.items()):
        if not fits("enrollment", enrollment_tuple(e)):
            del live[key]
            unread.keys.add(key)
    # Rows the answer no longer has go first: a new row may take the id of one of them (an
    # enrollment the source moved to another student keeps its sourcedId).
    for (cls, uid, role), held in existing.items():
        # Students, and the teacher's own row: an answer need not list co-teachers.
        mine = role == STUDENT or (role == TEACHER and uid == teacher_id)
        if mine and (cls, uid, role) not in live and unread.may_drop(cls, uid, role):
            for sid, status in held:
                if status == "active":
                    _set_status(conn, source, sid, "tobedeleted")
    new_rows = []
    for key, e in live.items():
        if key not in existing:
            new_rows.append({**enrollment_row(e), "source": source, "row_hash": LIVE_HASH})
        elif all(status != "active" for _, status in existing[key]):
            for sid, _ in existing[key]:
                _set_status(conn, source, sid, "active")
    upsert_rows(conn, roster_enrollment, new_rows, ["source", "sourced_id"])
    return touched


@dataclass
class _Unread:
    """What the connector could not read of a live answer (the records it rejected), which
    the apply must not take for gone: a sync keeps a rejected record's mirror rows, and the
    next full run decides. ``class_ids`` / ``person_ids``: False when a rejection of that kind
    named no id, so that none of its kind can be told apart from it.

    A rejected enrollment that names its class or its user (the CSV connector reads them
    from the row) keeps only the rows it may be: those of that class, of that user, or of
    both. One that names neither may be any row, and keeps them all."""

    classes: set[str] = field(default_factory=set)
    persons: set[str] = field(default_factory=set)
    keys: set[tuple[str, str, str]] = field(default_factory=set)
    class_ids: bool = True
    person_ids: bool = True
    #: a rejected enrollment named neither its class nor its user
    enrollments: bool = False
    #: rejected enrollments that named both their class and user, the class alone, the user
    #: alone (sets, not one list to scan: a broken export may reject every row)
    enrollment_pairs: set[tuple[str, str]] = field(default_factory=set)
    enrollment_classes: set[str] = field(default_factory=set)
    enrollment_users: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, roster: TeacherRoster) -> _Unread:
        out = cls()
        for r in roster.rejected:
            if r.entity == "class":
                if r.sourced_id is None:
                    out.class_ids = False
                else:
                    out.classes.add(r.sourced_id)
            elif r.entity == "user":
                if r.sourced_id is None:
                    out.person_ids = False
                else:
                    out.persons.add(r.sourced_id)
            elif r.entity == "enrollment":
                # Its id is the connector's (OneRoster's live ones are not the feed's): only
                # the class and user it names, if any, say which rows it may be.
                if r.class_id is not None and r.user_id is not None:
                    out.enrollment_pairs.add((r.class_id, r.user_id))
                elif r.class_id is not None:
                    out.enrollment_classes.add(r.class_id)
                elif r.user_id is not None:
                    out.enrollment_users.add(r.user_id)
                else:
                    out.enrollments = True
        return out

    def _rejected_enrollment(self, cls: str, uid: str) -> bool:
        """Whether a rejected enrollment may be the (class, user) row."""
        return (
            (cls, uid) in self.enrollment_pairs
            or cls in self.enrollment_classes
            or uid in self.enrollment_users
        )

    def droppable_classes(self, missing: set[str], teacher_id: str) -> set[str]:
        """Of the classes the mirror says the teacher teaches and the answer lacks, those
        that may be taken for gone: not one whose class record was rejected, nor one a
        rejected enrollment may tie to the teacher."""
        if not self.class_ids or self.enrollments:
            return set()
        return {c for c in missing - self.classes if not self._rejected_enrollment(c, teacher_id)}

    def may_drop(self, cls: str, uid: str, role: str) -> bool:
        """Whether a mirror enrollment the answer lacks may be marked gone."""
        return (
            self.person_ids
            and not self.enrollments
            and uid not in self.persons
            and (cls, uid, role) not in self.keys
            and not self._rejected_enrollment(cls, uid)
        )


def _set_status(conn: Connection, source: str, sourced_id: str, status: str) -> None:
    """One mirror enrollment's status, as the live answer says (marked LIVE_HASH)."""
    conn.execute(
        text(
            "UPDATE roster_enrollment SET status = :status, row_hash = :h, fp = NULL "
            "WHERE source = :src AND sourced_id = :sid"
        ),
        {"status": status, "h": LIVE_HASH, "src": source, "sid": sourced_id},
    )
