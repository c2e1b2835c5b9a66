"""Enrollments that name a person or class the mirror does not hold.

A source may send an enrollment whose person or class it did not send (a feed filtered by
permissions, a person it rejected, a class deleted before its enrollments). The enrollment
is kept in the mirror, as sent, and counts for no group until its person and class arrive;
the run that writes such an enrollment, or removes the person or class one names, says so
in its report instead of leaving groups short without a word.

Only those enrollments are looked at: the ones the run wrote (all of them on a first load)
and those of the persons and classes a full run removed, so a run that changes little pays
for what it changed, not for the district.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection, text

from rostersync.store.db import in_text
from rostersync.sync.detect import Changes
from rostersync.sync.repeats import shown
from rostersync.sync.rules import chunks

__all__ = ["Dangling", "dangling_enrollments", "warnings"]

_PERSON = "SELECT 1 FROM roster_person p WHERE p.source = e.source AND p.sourced_id = e.user_id"
_CLASS = "SELECT 1 FROM roster_class c WHERE c.source = e.source AND c.sourced_id = e.class_id"
#: The source's enrollments (``{where}``: which) naming a person or class the mirror does not
#: hold: (sourcedId, user, class, no such person, no such class).
_CHECK = f"""
    SELECT e.sourced_id, e.user_id, e.class_id, NOT EXISTS ({_PERSON}), NOT EXISTS ({_CLASS})
    FROM roster_enrollment e
    WHERE e.source = :src{{where}} AND (NOT EXISTS ({_PERSON}) OR NOT EXISTS ({_CLASS}))"""


@dataclass
class Dangling:
    """Enrollments naming a person (``no_person``) or a class (``no_class``) the mirror
    does not hold, each as ``enrollment sourcedId -> the id it names``."""

    no_person: dict[str, str] = field(default_factory=dict)
    no_class: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.no_person or self.no_class)

    def add(self, rows: Iterable[tuple[str, str, str, object, object]]) -> None:
        for sid, user, cls, no_person, no_class in rows:
            if no_person:
                self.no_person[sid] = user
            if no_class:
                self.no_class[sid] = cls


#: From this many written enrollments, the ids the source's enrollments name are checked
#: instead of each written enrollment: one pass over two covering indexes, where a probe per
#: enrollment read each one's row (a first load at M: 0.1 s against 1.1-1.5 s).
WHOLE_SOURCE_MIN = 20_000

#: The ids the source's enrollments name in ``{column}`` that ``{table}`` does not hold.
_MISSING_REFS = """
    SELECT r.ref FROM (SELECT DISTINCT {column} AS ref FROM roster_enrollment WHERE source = :src) r
    WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.source = :src AND t.sourced_id = r.ref)"""


def dangling_enrollments(conn: Connection, source: str, changes: Changes) -> Dangling:
    """After the merge, in its transaction: the enrollments this run wrote, or left behind by
    removing their person or class, that name a person or class the mirror does not hold."""
    out = Dangling()
    written = changes.to_write.get("enrollment")  # None: a first load, every one written
    gone = {"e.user_id": changes.missing.get("person", set())}
    gone["e.class_id"] = changes.missing.get("class", set())
    if written is not None and len(written) < WHOLE_SOURCE_MIN:
        _check(conn, source, "e.sourced_id", written, out)
        for column, ids in gone.items():
            _check(conn, source, column, ids, out)
        return out
    found = Dangling()
    for column, table in (("e.user_id", "roster_person"), ("e.class_id", "roster_class")):
        sql = _MISSING_REFS.format(column=column.removeprefix("e."), table=table)
        refs = {ref for (ref,) in conn.execute(text(sql), {"src": source})}
        _check(conn, source, column, refs, found)
    if written is None:
        return found
    people, classes = gone["e.user_id"], gone["e.class_id"]
    keep = {
        sid
        for sid in found.no_person.keys() | found.no_class.keys()
        if sid in written
        or found.no_person.get(sid) in people
        or found.no_class.get(sid) in classes
    }
    out.no_person = {sid: ref for sid, ref in found.no_person.items() if sid in keep}
    out.no_class = {sid: ref for sid, ref in found.no_class.items() if sid in keep}
    return out


def _check(conn: Connection, source: str, column: str, ids: set[str], out: Dangling) -> None:
    """Into ``out``: the source's enrollments whose ``column`` is one of ``ids`` that dangle."""
    if not ids:
        return
    stmt = in_text(_CHECK.format(where=f" AND {column} IN :ids"), "ids", dialect=conn.dialect.name)
    for chunk in chunks(sorted(ids)):
        out.add(conn.execute(stmt, {"src": source, "ids": chunk}))


def warnings(found: Dangling) -> list[str]:
    """The report's warning: how many, and a few of each as ``enrollment -> id``."""
    parts = []
    for kind, named in (("person", found.no_person), ("class", found.no_class)):
        if named:
            n = len(named)
            examples = shown(f"{sid} -> {ref}" for sid, ref in named.items())
            parts.append(
                f"{n} name{'s' if n == 1 else ''} a {kind} the source has not sent, or sent "
                f"and had rejected ({examples})"
            )
    if not parts:
        return []
    return [
        f"enrollments: {'; '.join(parts)}; they are kept, and give no group an owner or member "
        "until that person or class arrives"
    ]
