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


def dangling_enrollments(conn: Connection, source: str, changes: Changes) -> Dangling:
    """After the merge, in its transaction: the enrollments this run wrote, or left behind by
    removing their person or class, that name a person or class the mirror does not hold."""
    out = Dangling()
    params: dict[str, object] = {"src": source}
    written = changes.to_write.get("enrollment")
    if written is None:  # a first load of enrollments: every one of the source's is new
        out.add(conn.execute(text(_CHECK.format(where="")), params))
        return out
    by_column = (
        ("e.sourced_id", written),
        ("e.user_id", changes.missing.get("person", set())),
        ("e.class_id", changes.missing.get("class", set())),
    )
    dialect = conn.dialect.name
    for column, ids in by_column:
        if not ids:
            continue
        where = f" AND {column} IN :ids"
        stmt = in_text(_CHECK.format(where=where), "ids", dialect=dialect)
        for chunk in chunks(sorted(ids)):
            out.add(conn.execute(stmt, {**params, "ids": chunk}))
    return out


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
