"""The mirror's tables and the SQL pieces every reader of it shares.

``TABLES`` maps each roster kind to its mirror and staging tables; the predicates define
"teacher role" and "teaches a populated class" once, for change detection, provisioning and
the resyncs' groups. The queries are plain SQL that SQLite and PostgreSQL both understand;
values are always bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from rostersync.store.db import in_text
from rostersync.store.tables import PERSON_MEMBER_INDEX
from rostersync.sync.rules import chunks
from rostersync.sync.staging import COLUMNS

#: (mirror table, staging table, columns besides the keys)
TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # The staging column list is the one truth; quoted, since "primary" is a keyword.
    kind: (f"roster_{kind}", f"staging_{kind}", tuple(f'"{c}"' for c in cols if c != "sourced_id"))
    for kind, cols in COLUMNS.items()
}


def member_person(dialect: str) -> str:
    """``roster_person sp``, for a join that reads a person's key, status and member values
    alone: on SQLite through the index that holds just those
    (store.tables.PERSON_MEMBER_INDEX)."""
    hint = f" INDEXED BY {PERSON_MEMBER_INDEX}" if dialect == "sqlite" else ""
    return f"roster_person sp{hint}"


_POPULATED = """
EXISTS (SELECT 1 FROM roster_enrollment se
        JOIN {person} ON sp.source = se.source AND sp.sourced_id = se.user_id
        WHERE se.source = c.source AND se.class_id = c.sourced_id AND se.role = 'student'
          AND se.status = 'active' AND sp.status = 'active'{fence})
"""


def populated(conn: Connection) -> str:
    """SQL true when the class (alias ``c``) has at least one active student who is an active
    person.

    On PostgreSQL the subquery is fenced (``OFFSET 0``): it stays a probe of the class's
    enrollments that stops at the first such student. Turned into a semi-join, the planner
    joined every student enrollment of the source with its person, once per parallel worker,
    whatever the classes asked about.
    """
    dialect = conn.dialect.name
    return _POPULATED.format(
        person=member_person(dialect), fence=" OFFSET 0" if dialect == "postgresql" else ""
    )


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
              AND {populated(conn)})
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
            stmt = in_text(sql, "ids", dialect="postgresql")
            out = {r[0] for r in conn.execute(stmt, {**params, "ids": ids}) if r[0] is not None}
        return out
    stmt = in_text(sql, "ids")
    for chunk in chunks(sorted(values)):
        out |= {r[0] for r in conn.execute(stmt, {**params, "ids": chunk}) if r[0] is not None}
    return out
