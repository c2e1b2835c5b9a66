"""Which of a fetched run's records are in scope: a source's `schools` and `terms` settings.

Out of scope is the same as not in the feed. Right after the fetch, a scoped source's staged
rows go through :func:`apply_scope`, once, and the run (and a later approval of it, which
applies the same staged rows) then goes on as if the source had sent only what is left:

* a **full** run drops the rows of other schools, so its sweep removes them from the mirror,
  and the usual rules (groups removed, teachers archived) and safety checks (a held run)
  follow;
* a **delta** run turns such a row whose record the mirror holds into a ``tobedeleted`` one
  (a class moved to an excluded school), so the mirror never keeps a stale in-scope copy, and
  drops the others;
* either run stages a class none of whose terms runs as ``tobedeleted``, and keeps its
  enrollments: when one of its terms comes, the class counts again with its members.

What is in scope:

* a **class** of a school in scope (a class without a school counts) and, with
  ``terms.mode: current``, one of whose terms runs today (``start - grace .. end + grace``;
  a class without terms, or whose terms the source did not send, counts);
* an **enrollment** of a class in scope (a delta run also knows the mirror's classes);
* a **person** with a school in scope among their orgs, or with no school among them
  (district staff), or enrolled in a class in scope (a student of another school taking a
  class here). Terms never leave a person out.

Orgs are never left out: their names resolve the settings and ``site_map``. A school is in
scope when ``include`` is empty or names it or an org above it (by sourcedId or name), and
``exclude`` names neither it nor an org above it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import Connection, text

from rostersync.config.source import ScopedSourceConfig, SourceConfig
from rostersync.scoping import (
    OrgInfo,
    Schools,
    classes_out_of_term,
    person_in_scope,
    resolve_schools,
)
from rostersync.source.records import AcademicSession, TeacherRoster, digest, person_digest
from rostersync.sync.mirror import ids_in
from rostersync.sync.repeats import Repeats, shown
from rostersync.sync.staging import drop_staging_keys, prepare_staging

#: The run report's counts of records left out of scope (also kept in the run's ``fetched``).
SCOPE_COUNT_KEYS = (
    "persons_ignored",
    "classes_ignored",
    "enrollments_ignored",
    "classes_out_of_term",
)

#: Ids named in one warning at most.
SHOWN = 10


@dataclass(frozen=True, slots=True)
class Scope:
    """A source's scope settings, as the engine applies them."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    current_terms: bool = False
    grace_days: int = 14
    fingerprint: int = 0

    @property
    def schools(self) -> bool:
        return bool(self.include or self.exclude)


def scope_for(config: SourceConfig) -> Scope | None:
    """The source's scope, or None when nothing is scoped (the defaults, or a source type
    without schools and terms such as Google Classroom)."""
    if not isinstance(config, ScopedSourceConfig):
        return None
    fingerprint = config.scope_fingerprint()
    if fingerprint == 0:
        return None
    return Scope(
        tuple(config.schools.include),
        tuple(config.schools.exclude),
        config.terms.mode == "current",
        config.terms.grace_days,
        fingerprint,
    )


def fingerprint_of(config: SourceConfig) -> int:
    return config.scope_fingerprint() if isinstance(config, ScopedSourceConfig) else 0


# -- the step ---------------------------------------------------------------------------------


@dataclass
class ScopeResult:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCOPE_COUNT_KEYS, 0))
    warnings: list[str] = field(default_factory=list)
    #: the persons the source sent that the scope left out (their schools)
    persons_out: set[str] = field(default_factory=set)
    #: the ids staging held more than once (SQLite settles them here, before the apply)
    repeats: Repeats = field(default_factory=Repeats)


def _shown(ids: Iterable[str]) -> str:
    return shown(ids, SHOWN)


def _orgs(conn: Connection, source: str, run_id: int) -> dict[str, OrgInfo]:
    """The mirror's orgs of the source, overlaid with those this run staged."""
    orgs: dict[str, OrgInfo] = {}
    for sql, params in (
        (
            "SELECT sourced_id, name, type, parent_id FROM roster_org WHERE source = :k",
            {"k": source},
        ),
        (
            "SELECT sourced_id, name, type, parent_id FROM staging_org WHERE run_id = :k",
            {"k": run_id},
        ),
    ):
        for sid, name, kind, parent in conn.execute(text(sql), params):
            orgs[sid] = OrgInfo(name or "", (kind or "school").lower(), parent)
    return orgs


def _temp_tables(conn: Connection) -> None:
    postgres = conn.dialect.name == "postgresql"
    for name in ("scope_class", "scope_person"):
        if postgres:
            conn.exec_driver_sql(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} "
                "(sourced_id VARCHAR(256) PRIMARY KEY, why CHAR(1) NOT NULL) ON COMMIT DROP"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} "
                "(sourced_id VARCHAR(256) PRIMARY KEY, why CHAR(1) NOT NULL)"
            )
        conn.exec_driver_sql(f"DELETE FROM {name}")


def _drop_temp_tables(conn: Connection) -> None:
    if conn.dialect.name != "postgresql":
        for name in ("scope_class", "scope_person"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{name}")


def _fill(conn: Connection, table: str, rows: Iterable[tuple[str, str]]) -> None:
    values = [{"s": sid, "w": why} for sid, why in rows]
    if values:
        conn.execute(text(f"INSERT INTO {table} (sourced_id, why) VALUES (:s, :w)"), values)


def apply_scope(
    conn: Connection,
    source: str,
    run_id: int,
    *,
    full: bool,
    scope: Scope,
    class_terms: Mapping[str, tuple[str, ...]],
    sessions: Mapping[str, AcademicSession] | None,
    today: date,
) -> ScopeResult:
    """Leave the run's out-of-scope staged rows out (see the module docstring); returns the
    counts of what was left out and the warnings for the run's report."""
    result = ScopeResult()
    # SQLite: one row an id, so that the last version is judged; the repeats go to the apply.
    result.repeats = prepare_staging(conn, run_id)
    counts = result.counts
    params = {"run": run_id, "src": source}
    orgs = _orgs(conn, source, run_id)
    schools = resolve_schools(orgs, scope.include, scope.exclude)
    if scope.schools and schools.unknown:
        result.warnings.append(
            f"schools: {', '.join(schools.unknown)} matches no org of the source (by "
            "sourcedId or name); check the spelling"
        )
    _temp_tables(conn)
    try:
        why = _scope_classes(
            conn,
            params,
            full=full,
            scope=scope,
            schools=schools,
            class_terms=class_terms,
            sessions=sessions,
            today=today,
            result=result,
        )
        counts["classes_ignored"] = sum(1 for w in why.values() if w == "s")
        counts["classes_out_of_term"] = sum(1 for w in why.values() if w == "t")

        # Enrollments go with their class: ignored when it is of another school, or one the
        # source did not send; kept when it is only out of term (see _retire).
        counts["enrollments_ignored"] = int(
            conn.execute(
                text(
                    f"SELECT count(*) FROM staging_enrollment WHERE run_id = :run AND "
                    f"{_OUT['enrollment'].format(t='staging_enrollment')}"
                ),
                params,
            ).scalar_one()
        )

        # Persons: out by their schools, unless enrolled in a class kept.
        out_people = _people_out(conn, params, full=full, scope=scope, orgs=orgs, schools=schools)
        counts["persons_ignored"] = len(out_people)
        result.persons_out = out_people

        _retire(
            conn,
            "class",
            "s.sourced_id IN (SELECT sourced_id FROM scope_class WHERE why = 't')",
            params,
        )
        if full:
            _drop_full(conn, params)
        else:
            _turn_delta(conn, params)
    finally:
        _drop_temp_tables(conn)
    # This step commits: a held run's staging stays for its approval, and with the key
    # index kept, later fetches would replace repeated ids unseen (the apply builds it again).
    drop_staging_keys(conn)
    return result


def _scope_classes(
    conn: Connection,
    params: Mapping[str, Any],
    *,
    full: bool,
    scope: Scope,
    schools: Schools,
    class_terms: Mapping[str, tuple[str, ...]],
    sessions: Mapping[str, AcademicSession] | None,
    today: date,
    result: ScopeResult,
) -> dict[str, str]:
    """Fill ``scope_class``; returns why each staged class is out ('s' school, 't' terms) or
    kept ('k'). Warnings go to ``result``."""
    staged = {
        sid: school
        for sid, school in conn.execute(
            text("SELECT sourced_id, school_id FROM staging_class WHERE run_id = :run"),
            params,
        )
    }
    why = {
        sid: "s" if school is not None and not schools.in_scope(school) else "k"
        for sid, school in staged.items()
    }
    if scope.current_terms:
        terms = {c: t for c, t in class_terms.items() if why.get(c) == "k"}
        out, unknown = classes_out_of_term(terms, sessions or {}, today, scope.grace_days)
        for cid in out:
            why[cid] = "t"
        if unknown:
            term_ids = set().union(*unknown.values())
            result.warnings.append(
                f"terms: {len(unknown)} classes name academic sessions the source did not "
                f"send ({_shown(term_ids)}), so they count as current: "
                f"{_shown(unknown)}"
            )
    _fill(conn, "scope_class", why.items())
    if not full:
        # A delta run's enrollments may be of classes it did not fetch: the mirror's.
        conn.execute(
            text(
                "INSERT INTO scope_class (sourced_id, why) SELECT m.sourced_id, 'k' "
                "FROM roster_class m WHERE m.source = :src AND NOT EXISTS "
                "(SELECT 1 FROM scope_class k WHERE k.sourced_id = m.sourced_id)"
            ),
            params,
        )
    return why


def _people_out(
    conn: Connection,
    params: Mapping[str, Any],
    *,
    full: bool,
    scope: Scope,
    orgs: Mapping[str, OrgInfo],
    schools: Schools,
) -> set[str]:
    """The staged persons out by their schools and not enrolled in a class kept (they are
    left in ``scope_person``)."""
    out_people = set()
    if scope.schools:
        for sid, org_ids in conn.execute(
            text("SELECT sourced_id, org_ids FROM staging_person WHERE run_id = :run"),
            params,
        ):
            if not person_in_scope((org_ids or "").split(","), orgs, schools):
                out_people.add(sid)
    if out_people:
        _fill(conn, "scope_person", ((sid, "s") for sid in out_people))
        enrolled = (
            "SELECT DISTINCT e.user_id FROM {table} e "
            "JOIN scope_person p ON p.sourced_id = e.user_id "
            "JOIN scope_class k ON k.sourced_id = e.class_id AND k.why <> 's' "
            "WHERE {where}"
        )
        kept = {
            r[0]
            for r in conn.execute(
                text(
                    enrolled.format(
                        table="staging_enrollment",
                        where="e.run_id = :run AND e.status = 'active'",
                    )
                ),
                params,
            )
        }
        if not full:
            kept |= {
                r[0]
                for r in conn.execute(
                    text(
                        enrolled.format(
                            table="roster_enrollment",
                            where="e.source = :src AND e.status = 'active'",
                        )
                    ),
                    params,
                )
            }
        if kept:
            conn.execute(
                text("DELETE FROM scope_person WHERE sourced_id = :s"),
                [{"s": sid} for sid in kept],
            )
        out_people -= kept
    return out_people


_OUT = {
    "class": "{t}.sourced_id IN (SELECT sourced_id FROM scope_class WHERE why = 's')",
    "enrollment": (
        "NOT EXISTS (SELECT 1 FROM scope_class k WHERE k.sourced_id = {t}.class_id "
        "AND k.why <> 's')"
    ),
    "person": "{t}.sourced_id IN (SELECT sourced_id FROM scope_person)",
}
_STAGING = {
    "class": "staging_class",
    "enrollment": "staging_enrollment",
    "person": "staging_person",
}
_MIRROR = {"class": "roster_class", "enrollment": "roster_enrollment", "person": "roster_person"}


def _drop_full(conn: Connection, params: Mapping[str, Any]) -> None:
    for kind, table in _STAGING.items():
        where = _OUT[kind].format(t=table)
        conn.execute(text(f"DELETE FROM {table} WHERE run_id = :run AND {where}"), params)


def _hash(kind: str, row: Mapping[str, Any]) -> str:
    """The ``row_hash`` of a staged row turned ``tobedeleted`` (as its record would hash)."""
    if kind == "class":
        return digest(row["title"], row["class_code"], row["school_id"], "tobedeleted")
    if kind == "enrollment":
        return digest(
            row["class_id"], row["user_id"], row["role"], "tobedeleted", bool(row["primary"])
        )
    org_ids = tuple(row["org_ids"].split(",")) if row["org_ids"] else ()
    return person_digest(
        row["role"],
        row["roles"] or row["role"].lower(),
        row["given_name"],
        row["family_name"],
        row["email"],
        row["username"],
        bool(row["enabled"]),
        org_ids,
        "tobedeleted",
    )


def _retire(conn: Connection, kind: str, where: str, params: Mapping[str, Any]) -> None:
    """Turn this run's staged rows of ``kind`` matching ``where`` (staging's alias is ``s``)
    into ``tobedeleted`` ones, each with the hash its record would have."""
    table = _STAGING[kind]
    rows = [
        dict(r._mapping)
        for r in conn.execute(
            text(
                f"SELECT s.* FROM {table} s WHERE s.run_id = :run "
                f"AND s.status <> 'tobedeleted' AND {where}"
            ),
            params,
        )
    ]
    if rows:
        conn.execute(
            text(
                f"UPDATE {table} SET status = 'tobedeleted', row_hash = :h, fp = NULL "
                "WHERE run_id = :run AND sourced_id = :s"
            ),
            [{"h": _hash(kind, r), "s": r["sourced_id"], "run": params["run"]} for r in rows],
        )


def _turn_delta(conn: Connection, params: Mapping[str, Any]) -> None:
    """Out-of-scope rows the mirror holds become ``tobedeleted``; the others are dropped."""
    for kind, table in _STAGING.items():
        known = (
            f"EXISTS (SELECT 1 FROM {_MIRROR[kind]} m WHERE m.source = :src "
            "AND m.sourced_id = s.sourced_id)"
        )
        _retire(conn, kind, f"{_OUT[kind].format(t='s')} AND {known}", params)
        conn.execute(
            text(
                f"DELETE FROM {table} WHERE run_id = :run AND {_OUT[kind].format(t=table)} "
                f"AND NOT EXISTS (SELECT 1 FROM {_MIRROR[kind]} m WHERE m.source = :src "
                f"AND m.sourced_id = {table}.sourced_id)"
            ),
            params,
        )


def _records(fetched: Mapping[str, int], kinds: Sequence[str]) -> dict[str, int]:
    """Records received of each kind, each counted once however often it was sent."""
    return {k: int(fetched.get(k, 0)) - int(fetched.get(f"{k}_repeated", 0)) for k in kinds}


def ratio_counts(
    fetched: Mapping[str, int], last: Mapping[str, Any] | None, fingerprint: int
) -> tuple[dict[str, int], dict[str, int] | None]:
    """What ``min_source_ratio`` compares: (this run, the last successful full run).

    With the same ``schools`` settings as then, the records in scope by school are compared,
    so that a shrunken part of the source in scope is not hidden by the schools around it.
    When the settings changed, what the source sent is compared, so that narrowing the scope
    does not look like a shrunken source (the removal limits judge what it removes). Terms
    never count here: a semester's end is a large removal, held by the removal limits.
    A record the source sent more than once counts once (``{kind}_repeated``: the copies)."""
    kinds = ("persons", "classes", "enrollments")
    raw = _records(fetched, kinds)
    if not last:
        return raw, None
    if int(last.get("scope", 0)) != fingerprint:
        return raw, {k: int(last.get(k, 0)) for k in kinds}
    kept = {k: raw[k] - int(fetched.get(f"{k}_ignored", 0)) for k in kinds}
    return kept, {k: int(last.get(f"kept_{k}", last.get(k, 0))) for k in kinds}


def last_counts(fetched: Mapping[str, int], fingerprint: int) -> dict[str, int]:
    """A successful full run's counts kept for the next run's ``min_source_ratio`` check."""
    kinds = ("persons", "classes", "enrollments")
    out = _records(fetched, kinds)
    out.update({f"kept_{k}": out[k] - int(fetched.get(f"{k}_ignored", 0)) for k in kinds})
    if fingerprint:
        out["scope"] = fingerprint
    return out


def keep_mirrored_classes(conn: Connection, source: str, roster: TeacherRoster) -> TeacherRoster:
    """A scoped source's live roster (``resync --live``) without the classes the mirror does
    not hold: a live read knows neither the schools' names nor the terms, and the last sync
    judged which classes are in scope. A class new since then arrives with the next sync."""
    ids = {c.sourced_id for c in roster.classes}
    # An answer without any class still filters: it may hold the enrollments and students of
    # a class the source no longer lists, which are in scope no more than the class is.
    held = ids_in(
        conn,
        "SELECT sourced_id FROM roster_class WHERE source = :src AND status = 'active' "
        "AND sourced_id IN :ids",
        ids,
        src=source,
    )
    enrollments = [e for e in roster.enrollments if e.class_id in held]
    members = {e.user_id for e in enrollments}
    return TeacherRoster(
        teacher=roster.teacher,
        classes=[c for c in roster.classes if c.sourced_id in held],
        enrollments=enrollments,
        persons=[p for p in roster.persons if p.sourced_id in members],
        rejected=roster.rejected,
    )
